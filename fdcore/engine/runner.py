"""The contract between the batcher and a model runner (``torch`` or ``sim``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the contract names tensors; importing it needs no torch
    import torch


Allocate = Callable[[tuple[int, ...], "torch.dtype"], "torch.Tensor"]
"""Allocates a runner's zeroed KV pool of a shape and dtype (where the KV transports can reach
it: shared memory for ``ipc``); the runner's own allocation when none is given."""


@dataclass(slots=True)
class SeqInput:
    """One sequence's share of a forward step.

    ``token_ids`` are fed at positions ``start_pos .. start_pos + len(token_ids) - 1``;
    positions below ``start_pos`` are already in the cache. ``block_table[i]`` is the cache block
    holding positions ``i * block_size .. (i + 1) * block_size - 1`` and covers every position
    up to the last fed one.
    """

    token_ids: Sequence[int]
    start_pos: int
    block_table: Sequence[int]


class ModelRunner(Protocol):
    """Runs the model over a batch of sequences against a paged KV cache.

    The cache is laid out per layer as ``[num_blocks, num_kv_heads, block_size, head_dim]`` for
    K and for V, so a block id names the same slot in every layer (transports rely on this).
    """

    block_size: int
    num_blocks: int
    vocab_size: int
    max_model_len: int

    def forward(self, seqs: Sequence[SeqInput]) -> torch.Tensor:
        """Write the fed tokens' K/V into the cache and return float32 logits of shape
        ``[len(seqs), vocab_size]`` for each sequence's last fed token."""
        ...

    def kv_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer ``(K, V)`` cache tensors (empty for runners without a real cache)."""
        ...


class Tokenizer(Protocol):
    """Text <-> token ids, plus the model's chat template."""

    eos_token_ids: list[int]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (with the model's BOS where it wants one)."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``, special tokens skipped."""
        ...

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render OpenAI-style messages with the model's chat template."""
        ...
