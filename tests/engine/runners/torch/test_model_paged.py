"""The paged path: mixed prefill/decode batches over shuffled blocks, prefix reuse, cache layout."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from fdcore.engine.runner import SeqInput
from fdcore.engine.runners.torch import TorchRunner, load_model

from .conftest import TinyModel

ATOL = 1e-4
BLOCK = 4
NEW_TOKENS = 8


def _greedy_alone(runner: TorchRunner, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """One sequence at a time: whole prompt, then one token per step."""
    table = list(range(-(-(len(prompt) + NEW_TOKENS) // BLOCK)))
    logits = runner.forward([SeqInput(prompt, 0, table)])[0]
    tokens, seen = [], [logits]
    for _ in range(NEW_TOKENS - 1):
        tokens.append(int(logits.argmax()))
        logits = runner.forward([SeqInput(tokens[-1:], len(prompt) + len(tokens) - 1, table)])[0]
        seen.append(logits)
    tokens.append(int(logits.argmax()))
    return tokens, seen


@dataclass
class _Seq:
    tokens: list[int]
    prompt_len: int
    arrives: int
    fed: int = 0
    table: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


def test_mixed_batches_match_one_sequence_reference(
    tiny_model: Callable[[str], TinyModel],
) -> None:
    path = str(tiny_model("llama-gqa").path)
    alone = load_model(path, block_size=BLOCK, num_blocks=64, max_model_len=128).runner
    batched = load_model(path, block_size=BLOCK, num_blocks=256, max_model_len=128).runner
    rng = random.Random(0)
    prompts = [[rng.randrange(batched.vocab_size) for _ in range(n)] for n in (3, 9, 17, 26, 33, 1)]
    free = list(range(batched.num_blocks))
    rng.shuffle(free)
    seqs = [_Seq(list(p), len(p), arrives=i) for i, p in enumerate(prompts)]
    chunk, step = 5, 0
    while any(len(s.generated) < NEW_TOKENS for s in seqs):
        active = [s for s in seqs if s.arrives <= step and len(s.generated) < NEW_TOKENS]
        rng.shuffle(active)
        feeds = []
        for s in active:
            ids = s.tokens[s.fed : s.fed + chunk]
            while len(s.table) * BLOCK < s.fed + len(ids):
                s.table.append(free.pop())
            feeds.append(SeqInput(ids, s.fed, list(s.table)))
            s.fed += len(ids)
        if active:
            logits = batched.forward(feeds)
            for s, row in zip(active, logits, strict=True):
                if s.fed == len(s.tokens):
                    s.logits.append(row)
                    s.tokens.append(int(row.argmax()))
        step += 1
    for s, prompt in zip(seqs, prompts, strict=True):
        tokens, expected = _greedy_alone(alone, prompt)
        assert s.generated == tokens
        for got, want in zip(s.logits, expected, strict=True):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_cached_prefix_gives_cold_run_logits(tiny_model: Callable[[str], TinyModel]) -> None:
    runner = load_model(
        str(tiny_model("qwen2-bias-tied").path), block_size=BLOCK, num_blocks=64
    ).runner
    rng = random.Random(1)
    first = [rng.randrange(runner.vocab_size) for _ in range(30)]
    second = first[:20] + [rng.randrange(runner.vocab_size) for _ in range(9)]
    first_table = [9, 3, 17, 4, 30, 12, 8, 25]
    runner.forward([SeqInput(first, 0, first_table)])
    # The second sequence shares the first five blocks (positions 0..19) and feeds the rest,
    # batched with a decode step of the first sequence.
    second_table = [*first_table[:5], 40, 41, 42]
    warm = runner.forward([SeqInput([7], 30, first_table), SeqInput(second[20:], 20, second_table)])
    cold = runner.forward([SeqInput(second, 0, [50, 51, 52, 53, 54, 55, 56, 57])])
    torch.testing.assert_close(warm[1], cold[0], atol=ATOL, rtol=0)


def test_cache_layout_and_block_placement(tiny_model: Callable[[str], TinyModel]) -> None:
    loaded = load_model(str(tiny_model("llama-gqa").path), block_size=BLOCK, num_blocks=70)
    runner, cfg = loaded.runner, loaded.config
    caches = runner.kv_caches()
    assert len(caches) == cfg.num_layers
    for k, v in caches:
        for t in (k, v):
            assert t.shape == (70, cfg.num_kv_heads, BLOCK, cfg.head_dim)
            assert t.is_contiguous() and t.dtype == torch.float32
    runner.forward([SeqInput([5, 6, 7, 8, 9, 10], 0, [61, 2])])
    for k, v in caches:
        for t in (k, v):
            assert t[61].abs().sum(dim=(0, 2)).ne(0).tolist() == [True] * 4
            assert t[2].abs().sum(dim=(0, 2)).ne(0).tolist() == [True, True, False, False]
            others = [b for b in range(70) if b not in (2, 61)]
            assert t[others].abs().sum() == 0


def test_empty_batch(tiny_model: Callable[[str], TinyModel]) -> None:
    runner = load_model(str(tiny_model("llama-gqa").path), num_blocks=16).runner
    assert runner.forward([]).shape == (0, runner.vocab_size)


@pytest.mark.parametrize(
    ("seq", "message"),
    [
        (SeqInput([], 0, [0]), "no tokens"),
        (SeqInput([1, 2, 3], 0, []), "block table has 0 blocks"),
        (SeqInput([1] * 5, 0, [0]), "need 2"),
        (SeqInput([1], 4, [0, 99]), "block id outside"),
        (SeqInput([1], -1, [0]), "outside 0..63"),
        (SeqInput([1], 64, [0] * 5), "outside 0..63"),
    ],
)
def test_bad_inputs_are_value_errors(
    tiny_model: Callable[[str], TinyModel], seq: SeqInput, message: str
) -> None:
    runner = load_model(
        str(tiny_model("llama-gqa").path), block_size=BLOCK, num_blocks=20, max_model_len=64
    ).runner
    with pytest.raises(ValueError, match=message):
        runner.forward([SeqInput([1], 0, [0]), seq])
