"""Reading a GGUF file: metadata, (de-quantised) tensors renamed to Hugging Face names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from .config import ModelConfig
from .gguf_tokenizer import tokenizer_from_gguf
from .tokenizer import TextTokenizer

__all__ = ["read_gguf"]

_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(name: str) -> str | None:
    base, _, kind = name.rpartition(".")
    if base.startswith("blk."):
        _, index, part = base.split(".", 2)
        mapped = _LAYER.get(part)
        return f"model.layers.{index}.{mapped}.{kind}" if mapped else None
    mapped = _GLOBAL.get(base)
    return f"{mapped}.{kind}" if mapped else None


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order (rotary pairs interleaved) back to rotate-half order."""
    return (
        w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    )


def _to_torch(t: ReaderTensor) -> torch.Tensor:
    shape = tuple(int(d) for d in reversed(t.shape))
    # Always copy: the reader's arrays are read-only views of the memory-mapped file.
    values = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    return torch.from_numpy(values)


def _metadata(reader: GGUFReader) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items()}


def read_gguf(
    path: Path, device: torch.device, dtype: torch.dtype
) -> tuple[ModelConfig, dict[str, torch.Tensor], TextTokenizer]:
    """Config, weights (Hugging Face names and layout, on ``device`` in ``dtype``), tokenizer."""
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a readable GGUF file: {exc}") from None
    meta = _metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    factors = tensors.pop("rope_freqs.weight", None)
    cfg = ModelConfig.from_gguf(
        meta,
        path,
        vocab_size=len(meta.get("tokenizer.ggml.tokens") or []),
        tied="output.weight" not in tensors,
        has_qkv_bias="blk.0.attn_q.bias" in tensors,
        rope_freq_factors=tuple(_to_torch(factors).tolist()) if factors is not None else None,
    )
    renamed: dict[str, str] = {}
    for name in tensors:
        hf = _hf_name(name)
        if hf is None:
            raise ValueError(f"{path}: tensor {name!r} has no place in a Llama-family decoder")
        renamed[name] = hf
    tokenizer = tokenizer_from_gguf(meta, path)
    # llama.cpp permutes Q/K only for the llama architecture (its RoPE there is interleaved).
    permuted = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}
    if cfg.architecture != "llama":
        permuted = {}
    weights: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        hf = renamed[name]
        w = _to_torch(t)
        heads = permuted.get(hf.split(".")[-2])
        if heads is not None:
            w = _unpermute(w, heads)
        weights[hf] = w.to(device=device, dtype=dtype)
    return cfg, weights, tokenizer
