"""The official ``openai`` client through a splitwise router (SmolLM2 on a prefill and a
decode engine, KV over ipc) gives greedy output token-identical to a mixed router's."""

from __future__ import annotations

import openai
import pytest

from fdcore.testing import free_port
from fdcore.testing.cluster import EngineFactory
from tests.engine.test_real_model import MODEL
from tests.router.conftest import RouterFactory

pytestmark = pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} not fetched")
FLAGS = ["--block-size", "16", "--num-gpu-blocks", "256", "--max-model-len", "2048",
         "--cpu-threads", "1"]
MODEL_NAME = MODEL.stem
QUESTIONS = ["What is the capital of France?", "Name a primary colour.",
             "Write one sentence about the sea."]


async def _answers(client: openai.AsyncOpenAI) -> list[str]:
    out = []
    for question in QUESTIONS:
        chat = await client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": question}], max_tokens=24,
            temperature=0)
        out.append(chat.choices[0].message.content or "")
        stream = await client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": question}], max_tokens=24,
            temperature=0, stream=True)
        out.append("".join([c.choices[0].delta.content or "" async for c in stream
                            if c.choices]))
        completion = await client.completions.create(
            model=MODEL_NAME, prompt=f"Q: {question}\nA:", max_tokens=16, temperature=0)
        out.append(completion.choices[0].text)
    return out


async def test_openai_client_pd_equals_mixed(router: RouterFactory,
                                             engines: EngineFactory) -> None:
    mixed_router = router()
    pd_router = router(server={"splitwise": True})
    engines(1, router=mixed_router, model=str(MODEL), flags=FLAGS, ready_timeout=180)
    for role in ("prefill", "decode"):
        engines(1, router=pd_router, model=str(MODEL), ready_timeout=180,
                flags=[*FLAGS, "--splitwise-role", role, "--pd-comm-port", str(free_port()),
                       "--cache-transfer-protocol", "ipc"])
    await mixed_router.wait_healthy(1, timeout=180)
    await pd_router.wait_healthy(2, timeout=180)
    answers = {}
    for name, r in (("mixed", mixed_router), ("pd", pd_router)):
        client = openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key="unused", max_retries=0,
                                    timeout=180)
        try:
            answers[name] = await _answers(client)
        finally:
            await client.close()
    assert all(answers["mixed"]), answers
    assert answers["pd"] == answers["mixed"]
    _, body = await pd_router.get("/registered")
    assert all(i["in_flight_requests"] == 0 for i in body["prefill"] + body["decode"])
