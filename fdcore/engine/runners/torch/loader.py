"""``load_model``: a model path in, a ready runner and tokenizer out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fdcore.engine.runner import Allocate

from .config import ModelConfig
from .gguf_loader import read_gguf
from .hf_loader import read_hf_folder
from .llama import LlamaDecoder
from .runner import TorchRunner, kv_bytes_per_block
from .tokenizer import TextTokenizer

__all__ = ["LoadedModel", "load_model"]

# Without an explicit size, the cache aims at this many full-length sequences ...
DEFAULT_CACHE_SEQUENCES = 4
# ... within this budget on CPU, or this fraction of free memory on an accelerator.
DEFAULT_CPU_CACHE_BYTES = 1 << 30
DEFAULT_GPU_CACHE_FRACTION = 0.5

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@dataclass(slots=True)
class LoadedModel:
    """A loaded model: what the engine needs to serve it."""

    runner: TorchRunner
    tokenizer: TextTokenizer
    name: str
    """Served model name: the folder name or the GGUF file's stem."""
    max_model_len: int
    eos_token_ids: list[int]
    config: ModelConfig


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}") from None


def _cache_blocks(
    decoder: LlamaDecoder,
    *,
    block_size: int,
    num_blocks: int | None,
    memory_bytes: int | None,
    max_model_len: int,
    device: torch.device,
    dtype: torch.dtype,
) -> int:
    per_block = kv_bytes_per_block(decoder, block_size, dtype)
    one_sequence = -(-max_model_len // block_size)
    if num_blocks is not None:
        blocks = num_blocks
    elif memory_bytes is not None:
        blocks = memory_bytes // per_block
    else:
        if device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(device)[0] * DEFAULT_GPU_CACHE_FRACTION)
        else:
            budget = DEFAULT_CPU_CACHE_BYTES
        blocks = min(DEFAULT_CACHE_SEQUENCES * one_sequence, budget // per_block)
    if blocks < one_sequence:
        raise ValueError(
            f"a KV cache of {blocks} blocks ({per_block} bytes each) cannot hold one sequence of "
            f"max_model_len={max_model_len} ({one_sequence} blocks); lower max_model_len or give "
            "the cache more blocks or memory"
        )
    return blocks


def load_model(
    model: str,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    block_size: int = 16,
    num_blocks: int | None = None,
    kv_cache_memory_bytes: int | None = None,
    max_model_len: int | None = None,
    allocate: Allocate | None = None,
) -> LoadedModel:
    """Load a Hugging Face folder or a ``.gguf`` file into a :class:`TorchRunner`.

    ``dtype="auto"`` is float32 on CPU and bfloat16 (float16 where unsupported) on CUDA.
    The KV cache gets ``num_blocks`` blocks, else as many as fit ``kv_cache_memory_bytes``, else
    room for a few full-length sequences within a default budget. ``max_model_len`` defaults to
    the model's context length and may not exceed it. Raises ``ValueError`` naming the path for
    a missing, malformed or unsupported model.
    """
    path = Path(model).expanduser()
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    dev = torch.device(device)
    torch_dtype = _resolve_dtype(dtype, dev)
    if path.is_dir():
        cfg, weights, tokenizer = read_hf_folder(path, dev, torch_dtype)
        name = path.resolve().name
    elif path.is_file() and path.suffix == ".gguf":
        cfg, weights, tokenizer = read_gguf(path, dev, torch_dtype)
        name = path.stem
    elif not path.exists():
        raise ValueError(f"{path}: no such model folder or .gguf file")
    else:
        raise ValueError(f"{path}: not a Hugging Face model folder or a .gguf file")
    max_len = max_model_len or cfg.max_position_embeddings
    if max_len > cfg.max_position_embeddings:
        raise ValueError(
            f"{path}: max_model_len={max_len} exceeds the model's context length "
            f"{cfg.max_position_embeddings}"
        )
    decoder = LlamaDecoder(cfg, weights, dev)
    blocks = _cache_blocks(
        decoder,
        block_size=block_size,
        num_blocks=num_blocks,
        memory_bytes=kv_cache_memory_bytes,
        max_model_len=max_len,
        device=dev,
        dtype=torch_dtype,
    )
    runner = TorchRunner(
        decoder,
        block_size=block_size,
        num_blocks=blocks,
        max_model_len=max_len,
        device=dev,
        dtype=torch_dtype,
        allocate=allocate,
    )
    return LoadedModel(
        runner=runner,
        tokenizer=tokenizer,
        name=name,
        max_model_len=max_len,
        eos_token_ids=tokenizer.eos_token_ids,
        config=cfg,
    )
