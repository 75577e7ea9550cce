"""Fuzzing every engine endpoint: schemathesis from the engine's own ``/openapi.json``, then
hostile HTTP it would not generate (:mod:`tests.fuzz.hostile`). Every request gets an answer
under 500, a 4xx carries a JSON error body, and afterwards the engine still generates and every
KV block is free again."""

from __future__ import annotations

import asyncio
import socket
from typing import cast

import pytest
import requests
import schemathesis
from schemathesis import BaseSchema

from fdcore.engine.app import build_app
from fdcore.engine.engine import Engine
from fdcore.engine.openai_protocol import ChatCompletionRequest, CompletionRequest
from fdcore.engine.openapi import engine_document
from fdcore.testing.cluster import wait_until
from tests.fuzz.conftest import CHAT, EngineUnderTest, free_blocks
from tests.fuzz.hostile import HostileHTTP, Target
from tests.fuzz.schema_cases import (
    app_operations,
    fuzz_operation,
    operations,
)

OPERATIONS = operations(engine_document())


@pytest.fixture(scope="module")
def target(fuzz_engine: EngineUnderTest) -> Target:
    """The engine's POST endpoints with a valid body each, for :class:`HostileHTTP`."""
    return Target(
        port=fuzz_engine.port,
        bodies={
            "/v1/chat/completions": CHAT,
            "/v1/completions": {"prompt": "hi", "max_tokens": 2},
            "/v1/abort_requests": {"req_ids": ["fuzz"]},
        },
        fields={
            "/v1/chat/completions": sorted(ChatCompletionRequest.model_fields),
            "/v1/completions": sorted(CompletionRequest.model_fields),
            "/v1/abort_requests": ["req_ids", "abort_all"],
        },
    )


@pytest.fixture(scope="module")
def engine_schema(fuzz_engine: EngineUnderTest) -> BaseSchema:
    """The engine's published document, loaded over HTTP."""
    return schemathesis.openapi.from_url(f"{fuzz_engine.engine.url}/openapi.json")


def test_schema_lists_every_route(engine_schema: BaseSchema) -> None:
    """The served document is this one, and it lists every route the app has."""
    assert operations(engine_schema.raw_schema) == OPERATIONS
    # The routes only: no engine starts, and no handler runs to read it.
    app = build_app(cast(Engine, None))
    assert app_operations(app) == OPERATIONS


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_openapi_cases(engine_schema: BaseSchema, method: str, path: str) -> None:
    fuzz_operation(engine_schema, method, path)


@pytest.mark.parametrize("sampling", [{"top_p": 5e-324}, {"top_p": 1e-46},
                                      {"temperature": 5e-324}, {"temperature": 1e-40}])
def test_tiny_sampling_values_generate(fuzz_engine: EngineUnderTest,
                                       sampling: dict[str, float]) -> None:
    """Found by fuzzing: values that round to 0 in the float32 sampler made its probabilities
    NaN, and the failed step answered 500 for every request in the batch."""
    answer = requests.post(f"{fuzz_engine.engine.url}/v1/completions",
                           json={"prompt": "e", "max_tokens": 2, **sampling}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 2


def test_client_gone_mid_body_is_no_engine_failure(fuzz_engine: EngineUnderTest) -> None:
    """Found by fuzzing: a body cut off (or refused by hypercorn's parser) raised
    ClientDisconnect into the 500 handler, which logged an engine failure with a traceback."""
    raw = (b"POST /v1/completions HTTP/1.1\r\nhost: fuzz\r\ncontent-type: application/json\r\n"
           b"content-length: 100\r\n\r\n{\"prompt\"")
    with socket.create_connection(("127.0.0.1", fuzz_engine.port), timeout=30) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        answer = sock.recv(65536)  # a half-closed client may still read one
    # hypercorn's own 400 or the app's 499; before the fix, sometimes the app's 500
    assert answer == b"" or int(answer.split(b" ", 2)[1]) < 500, answer[:100]
    after = requests.post(f"{fuzz_engine.engine.url}/v1/completions",
                          json={"prompt": "e", "max_tokens": 1}, timeout=30)
    assert after.status_code == 200, after.text
    assert "engine.request_failed" not in fuzz_engine.engine.proc.output()


class TestHostileHTTP(HostileHTTP):
    """:class:`HostileHTTP` against the engine."""


async def test_serves_after_fuzz(fuzz_engine: EngineUnderTest) -> None:
    """Runs last in this module: the fuzzed engine still generates, every KV block it lent
    comes back, and it logged no unhandled exception."""
    url = fuzz_engine.engine.url
    answer = await asyncio.to_thread(requests.post, f"{url}/v1/chat/completions", json=CHAT,
                                     timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == CHAT["max_tokens"]

    async def blocks_back() -> bool:
        return await asyncio.to_thread(free_blocks, fuzz_engine.port) == fuzz_engine.free_blocks

    await wait_until(blocks_back)
    assert "Traceback" not in fuzz_engine.engine.proc.output()
