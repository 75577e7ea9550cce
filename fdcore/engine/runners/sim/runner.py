"""The ``sim`` model runner: a cost model that sleeps instead of computing.

Its "KV cache" holds one rolling hash per position, so the token it emits depends on every
token before it exactly as far as the cache (and the block tables pointing into it) is right:
the same prompt always gives the same text, and a block-table or prefix-cache mistake changes
the output just as it would with a real model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from pydantic import Field, ValidationError

from fdcore.engine.runner import SeqInput
from fdcore.engine.runners.sim.tokenizer import EOS_ID, VOCAB_SIZE
from fdcore.errors import StartupError
from fdcore.types import StrictModel

_MASK = (1 << 61) - 1
# Emitted text is lowercase words, so sim output reads as text and decodes cleanly.
_ALPHABET = [ord(c) for c in "etaoinshrdlucmfwypvbgkjqxz    "]
_TARGET_LOGIT = 6.0


class SimProfile(StrictModel):
    """Seconds the forward pass of a step sleeps: ``step + prefill tokens + decode sequences``."""

    prefill_seconds_per_token: float = Field(0.00005, ge=0)
    decode_seconds_per_step: float = Field(0.008, ge=0)
    decode_seconds_per_seq: float = Field(0.0002, ge=0)
    eos_probability: float = Field(0.0, ge=0, le=1)

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
    """Implements :class:`fdcore.engine.runner.ModelRunner` with no real KV tensors."""

    vocab_size = VOCAB_SIZE

    def __init__(
        self, profile: SimProfile, block_size: int, num_blocks: int, max_model_len: int
    ) -> None:
        self.profile = profile
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len
        self._state = [[0] * block_size for _ in range(num_blocks)]
        self._eos_cut = int(profile.eos_probability * 1_000_000)
        self._base = torch.full((VOCAB_SIZE,), float("-inf"))
        self._base[_ALPHABET] = 0.0
        self._base[EOS_ID] = 0.0 if self._eos_cut else float("-inf")

    def forward(self, seqs: Sequence[SeqInput]) -> torch.Tensor:
        """Record the fed tokens' hashes, sleep the modelled time, return peaked logits."""
        started = time.perf_counter()
        logits = self._base.repeat(len(seqs), 1)
        for row, seq in enumerate(seqs):
            logits[row, self._next_token(self._feed(seq))] = _TARGET_LOGIT
        remaining = self._cost(seqs) - (time.perf_counter() - started)
        if remaining > 0:
            time.sleep(remaining)
        return logits

    def kv_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """No real cache tensors."""
        return []

    def _feed(self, seq: SeqInput) -> int:
        size = self.block_size
        pos = seq.start_pos
        h = 0 if pos == 0 else self._state[seq.block_table[(pos - 1) // size]][(pos - 1) % size]
        for token in seq.token_ids:
            h = (h * 1_000_003 + token + 1) & _MASK
            self._state[seq.block_table[pos // size]][pos % size] = h
            pos += 1
        return h

    def _next_token(self, h: int) -> int:
        mixed = ((h ^ (h >> 29)) * 0x9E3779B97F4A7C15) & _MASK
        if mixed % 1_000_000 < self._eos_cut:
            return EOS_ID
        return _ALPHABET[(mixed >> 20) % len(_ALPHABET)]

    def _cost(self, seqs: Sequence[SeqInput]) -> float:
        p = self.profile
        decodes = sum(1 for s in seqs if len(s.token_ids) == 1)
        prefill_tokens = sum(len(s.token_ids) for s in seqs) - decodes
        return (
            p.decode_seconds_per_step
            + prefill_tokens * p.prefill_seconds_per_token
            + decodes * p.decode_seconds_per_seq
        )
