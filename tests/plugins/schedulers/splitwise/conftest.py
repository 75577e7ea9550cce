"""Fixtures for the ``splitwise`` scheduler: a real redis-server per test, sim engines in P, D
and mixed roles sharing it (no router)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fdcore.testing import ServerProcess, free_port
from fdcore.testing.processes import python_module
from tests.engine.conftest import Engine
from tests.engine.disagg.conftest import FIRST_CONTACT_SECS, HOLD_SECS
from tests.plugins.schedulers.global_.conftest import RedisServer, redis_server

__all__ = ["redis_server"]

# Short liveness deadlines so a killed instance is noticed within a test's patience.
EXPIRE_MS = 1500
StartSplitwise = Callable[..., Engine]


@pytest.fixture
def start_splitwise(
    redis_server: RedisServer, sim_profile: object
) -> Iterator[StartSplitwise]:
    """``start_splitwise(role, *flags, model="sim")``: an engine on the ``splitwise``
    scheduler of the test Redis; a prefill or decode one gets a connector port (``pd_port``)."""
    procs: list[ServerProcess] = []

    def start(role: str = "mixed", *flags: str, model: str = "sim",
              protocols: str = "ipc,tcp", profile: Path | None = None) -> Engine:
        port = free_port()
        pd: list[str] = []
        pd_port = 0
        if role != "mixed":
            pd_port = free_port()
            pd = ["--splitwise-role", role, "--pd-comm-port", str(pd_port),
                  "--cache-transfer-protocol", protocols, "--pd-hold-secs", str(HOLD_SECS),
                  "--pd-first-contact-secs", str(FIRST_CONTACT_SECS)]
        argv = python_module(
            "fdcore.engine", "--model", model, "--host", "127.0.0.1", "--port", str(port),
            "--block-size", "16", "--num-gpu-blocks", "256",
            "--scheduler-name", "splitwise", "--scheduler-port", str(redis_server.port),
            "--scheduler-topic", "test", "--scheduler-expire-period", str(EXPIRE_MS),
            *pd, *flags)
        if model == "sim":
            argv += ["--sim-profile", str(profile or sim_profile)]
        proc = ServerProcess(argv, ready_url=f"http://127.0.0.1:{port}/health",
                             ready_timeout=120)
        procs.append(proc.start())
        engine = Engine(proc, port)
        engine.pd_port = pd_port
        return engine

    yield start
    for proc in procs:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.terminate()
    for proc in procs:
        proc.stop()
