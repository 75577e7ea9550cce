"""fdcore's decoder against transformers on tiny random models: same logits, prefill and decode."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fdcore.engine.runner import SeqInput
from fdcore.engine.runners.torch import load_model

from .conftest import VARIANTS, TinyModel

# float32 on CPU; measured max |diff| is about 1e-6 on these models.
ATOL = 1e-4


def _reference_logits(model: TinyModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model.hf(torch.tensor([ids])).logits[0]
    return logits


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_chunked_prefill_and_decode_match_transformers(
    tiny_model: Callable[[str], TinyModel], variant: str
) -> None:
    model = tiny_model(variant)
    loaded = load_model(str(model.path), block_size=4, num_blocks=80)
    runner = loaded.runner
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, runner.vocab_size, (40,), generator=gen).tolist()
    ref = _reference_logits(model, ids)
    table = list(range(10, 20))
    prompt_len, chunk = 29, 8
    for start in range(0, prompt_len, chunk):
        end = min(start + chunk, prompt_len)
        logits = runner.forward([SeqInput(ids[start:end], start, table)])
        assert logits.dtype == torch.float32
        assert logits.shape == (1, runner.vocab_size)
        torch.testing.assert_close(logits[0], ref[end - 1], atol=ATOL, rtol=0)
    for pos in range(prompt_len, len(ids)):
        logits = runner.forward([SeqInput([ids[pos]], pos, table)])
        torch.testing.assert_close(logits[0], ref[pos], atol=ATOL, rtol=0)


def test_whole_prompt_prefill_matches_transformers(tiny_model: Callable[[str], TinyModel]) -> None:
    model = tiny_model("llama-gqa")
    loaded = load_model(str(model.path), num_blocks=32)
    ids = list(range(3, 100))
    logits = loaded.runner.forward([SeqInput(ids, 0, list(range(7)))])
    torch.testing.assert_close(logits[0], _reference_logits(model, ids)[-1], atol=ATOL, rtol=0)


def test_loaded_model_describes_itself(tiny_model: Callable[[str], TinyModel]) -> None:
    model = tiny_model("qwen2-bias-tied")
    loaded = load_model(str(model.path), num_blocks=16, max_model_len=64)
    assert loaded.name == model.path.name
    assert loaded.max_model_len == loaded.runner.max_model_len == 64
    assert loaded.config.architecture == "qwen2"
    assert loaded.config.qkv_bias and loaded.config.tie_word_embeddings
    assert loaded.eos_token_ids == [loaded.tokenizer.backend.token_to_id("<|im_end|>")]
    assert loaded.runner.decoder.lm_head is loaded.runner.decoder.embed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none here")
@pytest.mark.parametrize(("dtype", "atol"), [("float32", 1e-3), ("auto", 0.25)])
def test_cuda_matches_cpu(tiny_model: Callable[[str], TinyModel], dtype: str, atol: float) -> None:
    path = str(tiny_model("llama-gqa").path)
    ids = list(range(3, 40))
    feeds = [[SeqInput(ids[:-1], 0, [0, 1, 2])], [SeqInput(ids[-1:], len(ids) - 1, [0, 1, 2])]]
    cpu = load_model(path, num_blocks=16).runner
    gpu = load_model(path, device="cuda", dtype=dtype, num_blocks=16).runner
    for feed in feeds:
        want, got = cpu.forward(feed), gpu.forward(feed)
        assert got.device.type == "cuda" and got.dtype == torch.float32
        torch.testing.assert_close(got.cpu(), want, atol=atol, rtol=0)
