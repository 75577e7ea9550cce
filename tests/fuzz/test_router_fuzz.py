"""Fuzzing every router endpoint: schemathesis from the router's own ``/openapi.json``, then
hostile HTTP it would not generate (:mod:`tests.fuzz.hostile`). Every request gets an answer
under 500, a 4xx carries a JSON error body, and the router still routes afterwards."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from schemathesis import BaseSchema

from fdcore.config import load_router_config
from fdcore.engine.openai_protocol import ChatCompletionRequest, CompletionRequest
from fdcore.router.app import create_app
from fdcore.router.openapi import router_document
from tests.fuzz.conftest import CHAT, RouterUnderTest
from tests.fuzz.hostile import HostileHTTP, Target
from tests.fuzz.schema_cases import (
    app_operations,
    fuzz_operation,
    operations,
)

# Only TEST-NET-1 may register (conftest): this loopback instance is refused with a 403.
REGISTER = {"role": "mixed", "host_ip": "127.0.0.1", "port": 9}
OPERATIONS = operations(router_document())


@pytest.fixture(scope="module")
def target(fuzz_router: RouterUnderTest) -> Target:
    """The router's POST endpoints with a valid body each, for :class:`HostileHTTP`."""
    return Target(
        port=fuzz_router.port,
        bodies={
            "/v1/chat/completions": CHAT,
            "/v1/completions": {"prompt": "hi", "max_tokens": 2},
            "/v1/abort_requests": {"req_ids": ["fuzz"]},
            "/register": REGISTER,
            "/deregister": REGISTER,
        },
        fields={
            "/v1/chat/completions": sorted(ChatCompletionRequest.model_fields),
            "/v1/completions": sorted(CompletionRequest.model_fields),
            "/v1/abort_requests": ["req_ids", "abort_all"],
            "/register": ["role", "host_ip", "port", "metrics_port", "connector_port",
                          "engine_worker_queue_port", "transfer_protocol", "rdma_ports",
                          "device_ids"],
            "/deregister": ["host_ip", "port"],
        },
    )


@pytest.fixture(scope="module")
def router_schema(fuzz_router: RouterUnderTest) -> BaseSchema:
    """The router's published document, loaded over HTTP."""
    return schemathesis.openapi.from_url(f"{fuzz_router.router.url}/openapi.json")


def test_schema_lists_every_route(router_schema: BaseSchema) -> None:
    """The served document is this one, and it lists every route the app has."""
    assert operations(router_schema.raw_schema) == OPERATIONS
    app = create_app(load_router_config(None, environ={}))
    assert app_operations(app.starlette) == OPERATIONS


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_openapi_cases(router_schema: BaseSchema, method: str, path: str) -> None:
    fuzz_operation(router_schema, method, path)


class TestHostileHTTP(HostileHTTP):
    """:class:`HostileHTTP` against the router."""


def test_serves_after_fuzz(fuzz_router: RouterUnderTest) -> None:
    """Runs last in this module: the fuzzed router still routes to its one backend, and it
    logged no unhandled exception."""
    url = fuzz_router.router.url
    answer = requests.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "hello from b0"
    registered = requests.get(f"{url}/registered", timeout=30).json()
    assert [i["url"] for i in registered["mixed"]] == [fuzz_router.backend.url]
    assert "Traceback" not in fuzz_router.router.proc.output()
