"""SmolLM2 through a P and a D engine gives greedy output token-identical to one mixed engine,
for ipc and tcp, streamed and not, with and without a prefix already cached on D."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.engine.conftest import Engine, wait_until
from tests.engine.disagg.pd_client import at_baseline, pd_complete, post
from tests.engine.test_real_model import MODEL

pytestmark = pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} not fetched")
FLAGS = ("--block-size", "16", "--num-gpu-blocks", "256", "--max-model-len", "2048",
         "--cpu-threads", "1")
SYSTEM = ("You are a careful assistant. Answer in one short sentence, and never make up facts "
          "you do not know. ") * 2


@pytest.fixture(scope="module")
def smol_mixed(start_engine: Callable[..., Engine]) -> Engine:
    return start_engine(*FLAGS, model=str(MODEL), ready_timeout=180)


@pytest.fixture(scope="module")
def smol_pair(start_pd: Callable[..., tuple[Engine, Engine]]) -> tuple[Engine, Engine]:
    return start_pd("ipc,tcp", *FLAGS, model=str(MODEL))


def _body(prompt: str, stream: bool) -> dict[str, object]:
    return {"prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": stream,
            "stream_options": {"include_usage": True} if stream else None}


@pytest.mark.parametrize("protocol", ["ipc", "tcp"])
@pytest.mark.parametrize("stream", [False, True])
def test_smollm2_pd_equals_mixed(smol_mixed: Engine, smol_pair: tuple[Engine, Engine],
                                 protocol: str, stream: bool) -> None:
    p, d = smol_pair
    for question in (f"Q ({protocol}, {stream}): what is the capital of France? A:",
                     f"Q ({protocol}, {stream}): name a primary colour. A:"):
        # The second question finds the system prompt's blocks in D's prefix cache.
        prompt = SYSTEM + question
        body = {k: v for k, v in _body(prompt, stream).items() if v is not None}
        expected = post(smol_mixed, body).text
        d_answer, p_answer = pd_complete(p, d, body, protocol, timeout=180)
        assert d_answer.status == 200 and p_answer.status == 200, (d_answer, p_answer)
        assert d_answer.text == expected
    wait_until(lambda: at_baseline(p) and at_baseline(d))
