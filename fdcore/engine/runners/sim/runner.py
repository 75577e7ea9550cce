"""The ``sim`` model runner: a cost model that sleeps instead of computing.

Its state lives in a real KV pool (:mod:`.pool`) laid out like the torch runner's: each step
writes its fed tokens' slots through the block tables and derives the next token from what it
reads back for the whole sequence, so the same prompt always gives the same text, and a
block-table, prefix-cache or transfer mistake (a wrong, missing or altered block) changes the
output just as it would with a real model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from pydantic import Field, ValidationError

from fdcore.engine.runner import SeqInput
from fdcore.engine.runners.sim.pool import BYTES_PER_HEAD_DIM, MASK, Allocate, SimPool
from fdcore.engine.runners.sim.tokenizer import EOS_ID, VOCAB_SIZE
from fdcore.errors import StartupError
from fdcore.types import StrictModel

# Emitted text is lowercase words, so sim output reads as text and decodes cleanly.
_ALPHABET = [ord(c) for c in "etaoinshrdlucmfwypvbgkjqxz    "]
_TARGET_LOGIT = 6.0
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # as int64


class SimProfile(StrictModel):
    """Seconds the forward pass of a step sleeps: ``step + prefill tokens + decode sequences``;
    and the bytes each token takes in the KV pool (a multiple of 32: 2 layers, K and V, int64)."""

    prefill_seconds_per_token: float = Field(0.00005, ge=0)
    decode_seconds_per_step: float = Field(0.008, ge=0)
    decode_seconds_per_seq: float = Field(0.0002, ge=0)
    eos_probability: float = Field(0.0, ge=0, le=1)
    kv_bytes_per_token: int = Field(64, ge=BYTES_PER_HEAD_DIM, multiple_of=BYTES_PER_HEAD_DIM)

    @classmethod
    def load(cls, path: str | None) -> SimProfile:
        """Read a profile YAML file (kebab or snake keys); None gives the defaults."""
        if path is None:
            return cls.model_validate({})
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise StartupError(f"{path}: cannot read sim profile: {exc}") from exc
        if not isinstance(data, dict):
            raise StartupError(f"{path}: a sim profile must be a mapping")
        try:
            return cls.model_validate({str(k).replace("_", "-"): v for k, v in data.items()})
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(part) for part in err["loc"])
            raise StartupError(f"{path}: {key}: {err['msg']}") from None


class SimRunner:
    """Implements :class:`fdcore.engine.runner.ModelRunner` over a :class:`SimPool`.

    ``allocate`` makes the pool tensor (zeroed, shape and dtype given); the default is
    ``torch.zeros``.
    """

    vocab_size = VOCAB_SIZE

    def __init__(
        self,
        profile: SimProfile,
        block_size: int,
        num_blocks: int,
        max_model_len: int,
        *,
        allocate: Allocate | None = None,
    ) -> None:
        self.profile = profile
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len
        self.pool = SimPool(num_blocks=num_blocks, block_size=block_size,
                            bytes_per_token=profile.kv_bytes_per_token,
                            max_model_len=max_model_len, allocate=allocate)
        self._eos_cut = int(profile.eos_probability * 1_000_000)
        self._alphabet = torch.tensor(_ALPHABET)
        self._base = torch.full((VOCAB_SIZE,), float("-inf"))
        self._base[_ALPHABET] = 0.0
        self._base[EOS_ID] = 0.0 if self._eos_cut else float("-inf")

    def forward(self, seqs: Sequence[SeqInput]) -> torch.Tensor:
        """Write the fed tokens into the pool, sleep the modelled time, return peaked logits."""
        started = time.perf_counter()
        logits = self._base.repeat(len(seqs), 1)
        if seqs:
            logits[torch.arange(len(seqs)), self._next_tokens(self.pool.step(seqs))] = (
                _TARGET_LOGIT
            )
        remaining = self._cost(seqs) - (time.perf_counter() - started)
        if remaining > 0:
            time.sleep(remaining)
        return logits

    def kv_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer ``(K, V)`` views, each ``[num_blocks, kv_heads, block_size, head_dim]``."""
        return list(self.pool.caches)

    def _next_tokens(self, h: torch.Tensor) -> torch.Tensor:
        mixed = ((h ^ (h >> 29)) * _GOLDEN) & MASK
        tokens = self._alphabet[(mixed >> 20) % len(_ALPHABET)]
        return torch.where(mixed % 1_000_000 < self._eos_cut, EOS_ID, tokens)

    def _cost(self, seqs: Sequence[SeqInput]) -> float:
        p = self.profile
        decodes = sum(1 for s in seqs if len(s.token_ids) == 1)
        prefill_tokens = sum(len(s.token_ids) for s in seqs) - decodes
        return (
            p.decode_seconds_per_step
            + prefill_tokens * p.prefill_seconds_per_token
            + decodes * p.decode_seconds_per_seq
        )
