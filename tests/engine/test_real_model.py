"""SmolLM2-135M-Instruct (GGUF) through a real engine on the torch runner.

Skipped when the model file is absent (``python -m fdcore.engine.runners.torch.fetch`` puts it in
``models/``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.engine.conftest import Engine

MODEL = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]

pytestmark = pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} not fetched")


@pytest.fixture(scope="module")
def smol(start_engine: Callable[..., Engine]) -> Engine:
    """One SmolLM2 engine for the module."""
    return start_engine("--block-size", "16", "--num-gpu-blocks", "512",
                        model=str(MODEL), ready_timeout=180)


@pytest.fixture
def client(smol: Engine) -> OpenAI:
    """The official client against the SmolLM2 engine."""
    return OpenAI(base_url=smol.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_capital_of_france(client: OpenAI) -> None:
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=30, temperature=0
    )
    assert "Paris" in (reply.choices[0].message.content or "")
    stream = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=30, temperature=0, stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "Paris" in streamed
    assert streamed == reply.choices[0].message.content


def test_batched_greedy_equals_one_at_a_time(smol: Engine) -> None:
    prompts = ["The sky is", "Once upon a time", "def fibonacci(n):", "Water boils at"]

    def one(prompt: str) -> str:
        return str(smol.complete(prompt, max_tokens=12, temperature=0)["choices"][0]["text"])

    alone = [one(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(one, prompts)) == alone


def test_prefix_cache_hit_same_tokens(smol: Engine) -> None:
    prompt = "You are a careful assistant who answers briefly. " * 3 + "Name a color:"
    cold = smol.complete(prompt, max_tokens=10, temperature=0)
    warm = smol.complete(prompt, max_tokens=10, temperature=0)
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]


def test_seeded_sampling_is_reproducible(smol: Engine) -> None:
    def sampled(seed: int) -> str:
        body = smol.complete("My favourite animal is", max_tokens=16, temperature=1.0,
                             top_p=0.9, top_k=50, seed=seed)
        return str(body["choices"][0]["text"])

    assert sampled(7) == sampled(7)
