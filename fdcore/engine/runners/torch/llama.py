"""The Llama-family decoder (Llama, Mistral, SmolLM, Qwen2) over packed tokens and a paged cache."""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
import torch.nn.functional as F
from torch import nn

from .attention import BatchPlan, paged_attention, write_kv
from .config import ModelConfig
from .rope import RotaryEmbedding, apply_rope

__all__ = ["LlamaDecoder"]

Weights = MutableMapping[str, torch.Tensor]


def _take(weights: Weights, name: str) -> nn.Parameter:
    try:
        return nn.Parameter(weights.pop(name), requires_grad=False)
    except KeyError:
        raise ValueError(f"checkpoint lacks tensor {name!r}") from None


def _take_cat(weights: Weights, names: list[str]) -> nn.Parameter:
    return nn.Parameter(torch.cat([_take(weights, n).data for n in names]), requires_grad=False)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 and scale in the model dtype, as the reference implementation does.
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


class DecoderLayer(nn.Module):
    """Pre-norm attention plus SwiGLU MLP; q/k/v and gate/up run as one fused matmul each."""

    def __init__(self, cfg: ModelConfig, weights: Weights, prefix: str) -> None:
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qk_width = (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim
        attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
        qkv = [f"{attn}.{p}_proj" for p in "qkv"]
        self.input_norm = _take(weights, f"{prefix}.input_layernorm.weight")
        self.qkv_weight = _take_cat(weights, [f"{n}.weight" for n in qkv])
        self.qkv_bias = _take_cat(weights, [f"{n}.bias" for n in qkv]) if cfg.qkv_bias else None
        self.o_weight = _take(weights, f"{attn}.o_proj.weight")
        self.o_bias = _take(weights, f"{attn}.o_proj.bias") if cfg.o_bias else None
        self.post_norm = _take(weights, f"{prefix}.post_attention_layernorm.weight")
        gate_up = [f"{mlp}.gate_proj", f"{mlp}.up_proj"]
        self.gate_up_weight = _take_cat(weights, [f"{n}.weight" for n in gate_up])
        self.gate_up_bias = (
            _take_cat(weights, [f"{n}.bias" for n in gate_up]) if cfg.mlp_bias else None
        )
        self.down_weight = _take(weights, f"{mlp}.down_proj.weight")
        self.down_bias = _take(weights, f"{mlp}.down_proj.bias") if cfg.mlp_bias else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: BatchPlan,
        kv_rows: torch.Tensor,
    ) -> torch.Tensor:
        """Advance packed hidden states ``x`` (``[tokens, hidden]``) through this layer;
        ``kv_rows`` is the layer's K and V cache flattened to ``[rows, head_dim]``."""
        tokens = x.shape[0]
        qkv = F.linear(_rms_norm(x, self.input_norm, self.eps), self.qkv_weight, self.qkv_bias)
        # RoPE on q and k together: one rotation over heads + kv_heads.
        qk = qkv[:, : self.qk_width].view(tokens, self.heads + self.kv_heads, self.head_dim)
        qk = apply_rope(qk, cos, sin)
        q, k = qk[:, : self.heads], qk[:, self.heads :]
        v = qkv[:, self.qk_width :].view(tokens, self.kv_heads, self.head_dim)
        write_kv(kv_rows, k, v, plan)
        parts = [paged_attention(q[g.rows], kv_rows, self.kv_heads, g) for g in plan.groups]
        attn = parts[0] if len(parts) == 1 else torch.cat(parts)
        x = x + F.linear(attn, self.o_weight, self.o_bias)
        gate_up = F.linear(
            _rms_norm(x, self.post_norm, self.eps), self.gate_up_weight, self.gate_up_bias
        )
        gate, up = gate_up.chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.down_weight, self.down_bias)


class LlamaDecoder(nn.Module):
    """Embedding, decoder layers, final norm and LM head, built from Hugging Face tensor names.

    ``weights`` (already on the target device and dtype) is consumed as layers take their tensors,
    so peak memory stays near one copy of the model.
    """

    def __init__(self, cfg: ModelConfig, weights: Weights, device: torch.device) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = _take(weights, "model.embed_tokens.weight")
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, weights, f"model.layers.{i}") for i in range(cfg.num_layers)
        )
        self.norm = _take(weights, "model.norm.weight")
        if cfg.tie_word_embeddings:
            # Tied checkpoints may still carry a copy of the head; the embedding is the one used.
            weights.pop("lm_head.weight", None)
            self.lm_head = self.embed
        else:
            self.lm_head = _take(weights, "lm_head.weight")
        self.rope = RotaryEmbedding(cfg, device)

    def forward(self, plan: BatchPlan, kv_rows: list[torch.Tensor]) -> torch.Tensor:
        """float32 logits ``[sequences, vocab]`` for each sequence's last fed token;
        ``kv_rows`` holds each layer's flattened cache."""
        x = F.embedding(plan.tokens, self.embed)
        cos, sin = self.rope.cos_sin(plan.positions, x.dtype)
        for layer, rows in zip(self.layers, kv_rows, strict=True):
            x = layer(x, cos, sin, plan, rows)
        last = _rms_norm(x[plan.last_rows], self.norm, self.cfg.rms_norm_eps)
        return F.linear(last, self.lm_head).float()
