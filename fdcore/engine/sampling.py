"""Choosing each sequence's next token from its logits."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from fdcore.types import SamplingParams


def is_greedy(params: SamplingParams) -> bool:
    """Temperature 0 (or top-k 1) means argmax: deterministic, no generator needed."""
    return params.temperature == 0.0 or params.top_k == 1


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A per-request generator, seeded from ``params.seed`` or at random; None when greedy."""
    if is_greedy(params):
        return None
    generator = torch.Generator()
    generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return generator


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token per row of ``logits`` (``[n, vocab]``, float32 on any device)."""
    logits = logits.float().cpu()
    greedy = logits.argmax(dim=-1).tolist()
    return [
        greedy[row] if gen is None else _sample_row(logits[row], p, gen)
        for row, (p, gen) in enumerate(zip(params, generators, strict=True))
    ]


def _sample_row(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.numel():
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        drop[0] = False  # in float32 a tiny top_p rounds so that even the first would go
        scaled = scaled.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen).item())
