"""Fixtures for the fuzz suite: one real router (with one test backend) and one sim engine,
each shared by its module's tests."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import yaml

from fdcore.testing.cluster import (
    Backend,
    BackendFactory,
    EngineFactory,
    EngineHandle,
    Router,
    RouterFactory,
)

# Registrations must come from TEST-NET-1 (RFC 5737), which no fuzzed host resolves into: a
# fuzzed payload is refused (403) before the router probes a port someone else is listening on.
ALLOW_NETWORKS = ["192.0.2.0/24"]
BODY_LIMIT = 65536
CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@dataclass
class RouterUnderTest:
    """The fuzzed router and the one backend it routes to."""

    router: Router
    backend: Backend

    @property
    def port(self) -> int:
        """The router's port."""
        return self.router.port


@dataclass
class EngineUnderTest:
    """The fuzzed engine and its KV block count at start-up."""

    engine: EngineHandle
    free_blocks: float

    @property
    def port(self) -> int:
        """The engine's port."""
        return self.engine.port


@pytest.fixture(scope="module")
def fuzz_router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterUnderTest]:
    """``fdcore serve`` with one healthy test backend, shared by a module's fuzz tests."""
    backends = BackendFactory()
    routers = RouterFactory(tmp_path_factory.mktemp("fuzz-router"))
    try:
        (backend,) = backends(1)
        router = routers([backend], server={"max-body-bytes": BODY_LIMIT},
                         manager={"register-allow-networks": ALLOW_NETWORKS})
        yield RouterUnderTest(router, backend)
    finally:
        routers.stop_all()
        backends.stop_all()


@pytest.fixture(scope="module")
def fuzz_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineUnderTest]:
    """``fdcore engine --model sim`` whose steps cost nothing: the fuzzed requests that pass
    validation generate up to the context's 256 tokens, and the suite stays fast."""
    engines = EngineFactory(tmp_path_factory.mktemp("fuzz-engine"))
    engines.profile.write_text(yaml.safe_dump({"decode-seconds-per-step": 0.0,
                                               "decode-seconds-per-seq": 0.0,
                                               "prefill-seconds-per-token": 0.0}))
    try:
        (engine,) = engines(1, flags=["--max-model-len", "256", "--block-size", "16",
                                      "--num-gpu-blocks", "64",
                                      "--max-request-bytes", str(BODY_LIMIT)])
        yield EngineUnderTest(engine, free_blocks(engine.port))
    finally:
        engines.stop_all()


def metrics(port: int) -> dict[str, float]:
    """Unlabelled samples of a server's ``/metrics``."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return {m[1]: float(m[2]) for m in re.finditer(r"^([^\s{#]+) (\S+)$", text, re.M)}


def free_blocks(port: int) -> float:
    """The engine's ``fastdeploy:available_gpu_block_num``."""
    return metrics(port)["fastdeploy:available_gpu_block_num"]
