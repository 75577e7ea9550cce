"""Sampling and incremental detokenization, in process."""

from __future__ import annotations

import torch

from fdcore.engine.detokenizer import IncrementalText
from fdcore.engine.runners.sim.tokenizer import ByteTokenizer
from fdcore.engine.sampling import make_generator, sample
from fdcore.types import SamplingParams

LOGITS = torch.tensor([[0.0, 3.0, 2.9, 1.0, -1.0]] * 2)


def draw(params: SamplingParams, n: int = 200) -> set[int]:
    gen = make_generator(params)
    return {sample(LOGITS[:1], [params], [gen])[0] for _ in range(n)}


def test_greedy_needs_no_generator_and_takes_the_argmax() -> None:
    params = SamplingParams(temperature=0.0)
    assert make_generator(params) is None
    assert sample(LOGITS, [params, params], [None, None]) == [1, 1]
    assert draw(SamplingParams(temperature=1.0, top_k=1)) == {1}


def test_top_k_and_top_p_restrict_the_candidates() -> None:
    assert draw(SamplingParams(temperature=1.0, top_k=2)) <= {1, 2}
    assert draw(SamplingParams(temperature=1.0, top_p=0.5)) <= {1, 2}
    assert len(draw(SamplingParams(temperature=2.0))) >= 4


def test_a_seed_reproduces_the_draws() -> None:
    params = SamplingParams(temperature=1.5, seed=123)
    runs = [[sample(LOGITS[:1], [params], [gen])[0] for _ in range(20)]
            for gen in (make_generator(params), make_generator(params))]
    assert runs[0] == runs[1]


def test_stop_strings_are_held_back_and_trimmed_across_tokens() -> None:
    text = IncrementalText(ByteTokenizer(), stop=["END"])
    emitted = []
    for byte in b"abcEN":
        text.push(byte)
        emitted.append(text.take(final=False))
    assert "".join(emitted) == "abc"  # "EN" may still become "END"
    text.push(ord("D"))
    assert text.stopped and text.take(final=True) == ""
    assert text.text == "abcEN"[:3]


def test_multibyte_characters_wait_for_all_their_bytes() -> None:
    text = IncrementalText(ByteTokenizer(), stop=[])
    deltas = []
    for byte in "né".encode():
        text.push(byte)
        deltas.append(text.take(final=False))
    assert deltas == ["n", "", "é"]
