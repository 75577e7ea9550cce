"""SmolLM2 through a prefill and a decode engine paired by the ``splitwise`` scheduler gives
greedy output token-identical to one mixed engine's, streamed and not."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from openai import OpenAI

from tests.engine.conftest import Engine, wait_until
from tests.engine.disagg.pd_client import at_baseline, received_bytes
from tests.engine.test_real_model import MODEL
from tests.plugins.schedulers.global_.conftest import RedisServer
from tests.plugins.schedulers.splitwise.conftest import StartSplitwise
from tests.plugins.schedulers.splitwise.test_engines import registered

pytestmark = pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} not fetched")
FLAGS = ("--max-model-len", "2048", "--cpu-threads", "1")
QUESTIONS = ("Q: what is the capital of France? A:", "Q: name a primary colour. A:")


def test_smollm2_splitwise_equals_mixed(
    start_splitwise: StartSplitwise, start_engine: Callable[..., Engine],
    redis_server: RedisServer,
) -> None:
    mixed = start_engine("--block-size", "16", "--num-gpu-blocks", "256", *FLAGS,
                         model=str(MODEL), ready_timeout=180)
    p = start_splitwise("prefill", *FLAGS, model=str(MODEL))
    d = start_splitwise("decode", *FLAGS, model=str(MODEL))
    registered(redis_server, 2)
    for stream in (False, True):
        for question, engine in zip(QUESTIONS, (p, d), strict=True):
            answers = []
            for target in (mixed, engine):
                client = OpenAI(base_url=target.url + "/v1", api_key="unused", max_retries=0,
                                timeout=180)
                if stream:
                    chunks = client.completions.create(model=str(MODEL), prompt=question,
                                                       max_tokens=16, temperature=0,
                                                       stream=True)
                    answers.append("".join(c.choices[0].text for c in chunks if c.choices))
                else:
                    answer = client.completions.create(model=str(MODEL), prompt=question,
                                                       max_tokens=16, temperature=0)
                    answers.append(answer.choices[0].text)
            assert answers[0] and answers[1] == answers[0], (question, stream, answers)
    assert received_bytes(d) > 0
    wait_until(lambda: at_baseline(p) and at_baseline(d))
