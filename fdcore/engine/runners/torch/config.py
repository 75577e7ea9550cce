"""Architecture hyper-parameters of a Llama-family decoder, read from HF or GGUF metadata."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["GGUF_ARCHITECTURES", "SUPPORTED_ARCHITECTURES", "ModelConfig"]

# Mistral and SmolLM checkpoints use model_type "llama" or "mistral"; all three share one decoder.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
# llama.cpp writes Mistral and SmolLM as "llama"; other GGUF architecture names differ in layout.
GGUF_ARCHITECTURES = ("llama", "qwen2")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """What the decoder needs to know about a checkpoint.

    ``rope_scaling`` follows Hugging Face's ``rope_parameters`` (``rope_type`` plus its keys);
    ``rope_freq_factors`` are per-frequency divisors as GGUF stores them for Llama 3.1+.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: Mapping[str, Any] | None = None
    rope_freq_factors: tuple[float, ...] | None = None
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], path: Path) -> ModelConfig:
        """Read a Hugging Face ``config.json`` dict; ``path`` only names the file in errors."""
        arch = cfg.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{path}: model_type {arch!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            # transformers >= 5 folds rope_theta and rope_scaling into rope_parameters.
            rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
            theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                max_position_embeddings=_hf_max_len(cfg),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
                o_bias=arch != "qwen2" and bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                rope_scaling=_rope_scaling(rope, path),
                torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
            )
        except KeyError as exc:
            raise ValueError(f"{path}: config.json lacks {exc.args[0]!r}") from None

    @classmethod
    def from_gguf(
        cls,
        meta: Mapping[str, Any],
        path: Path,
        *,
        vocab_size: int,
        tied: bool,
        has_qkv_bias: bool,
        rope_freq_factors: tuple[float, ...] | None,
    ) -> ModelConfig:
        """Read ``<arch>.*`` GGUF metadata; tensor-derived facts come in as arguments."""
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ValueError(
                f"{path}: GGUF architecture {arch!r} is not supported "
                f"(supported: {', '.join(GGUF_ARCHITECTURES)})"
            )

        def key(name: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{name}", default)
            if value is None:
                raise ValueError(f"{path}: GGUF metadata lacks {arch}.{name}")
            return value

        heads = int(key("attention.head_count"))
        hidden = int(key("embedding_length"))
        scaling: dict[str, Any] | None = None
        if meta.get(f"{arch}.rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
        return cls(
            architecture=arch,
            vocab_size=int(meta.get(f"{arch}.vocab_size") or vocab_size),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=int(key("attention.head_count_kv", heads)),
            head_dim=int(meta.get(f"{arch}.attention.key_length") or hidden // heads),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            max_position_embeddings=int(key("context_length")),
            tie_word_embeddings=tied,
            qkv_bias=has_qkv_bias,
            rope_scaling=scaling,
            rope_freq_factors=rope_freq_factors,
        )


def _hf_max_len(cfg: Mapping[str, Any]) -> int:
    """Usable context: a sliding window caps it because the decoder attends to every position."""
    max_len = int(cfg.get("max_position_embeddings", 2048))
    window = cfg.get("sliding_window")
    windowed = cfg.get("use_sliding_window", cfg.get("model_type") == "mistral")
    if window and windowed:
        max_len = min(max_len, int(window))
    return max_len


def _rope_scaling(rope: dict[str, Any], path: Path) -> dict[str, Any] | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("linear", "llama3"):
        raise ValueError(
            f"{path}: rope scaling {kind!r} is not supported (default, linear, llama3)"
        )
    return {**rope, "rope_type": kind}
