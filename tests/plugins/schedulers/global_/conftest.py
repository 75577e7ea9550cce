"""Fixtures for the ``global`` scheduler: a real redis-server per test, sim engines using it."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis
from fdcore_plugins.schedulers.global_ import GlobalScheduler
from fdcore_plugins.schedulers.global_.config import GlobalConfig
from redis.asyncio import Redis

from fdcore.testing import ServerProcess, free_port
from fdcore.testing.processes import python_module
from fdcore.types import SchedulerContext
from tests.engine.conftest import Engine, wait_until

# Steps slow enough, and batches small enough, that queues build up behind a busy engine.
SLOW_PROFILE = {
    "prefill-seconds-per-token": 0.0,
    "decode-seconds-per-step": 0.01,
    "decode-seconds-per-seq": 0.0,
}


class RedisServer:
    """``redis-server`` without persistence on a fixed port; it can be stopped and restarted."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = tempfile.mkdtemp(prefix="fdcore-redis-")

    def start(self) -> RedisServer:
        """Start and wait until it answers PING."""
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        wait_until(lambda: self._answers(client), timeout=10)
        client.close()
        return self

    def _answers(self, client: redis.Redis) -> bool:
        assert self.proc is not None and self.proc.poll() is None, "redis-server exited"
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        """Kill it (its data goes with it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def client(self) -> redis.Redis:
        """A synchronous client for assertions."""
        return redis.Redis(port=self.port)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server for one test."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def make_scheduler(
    redis_server: RedisServer,
) -> Iterator[Callable[..., GlobalScheduler]]:
    """Build (not start) schedulers named ``127.0.0.1:<n>`` against the test Redis."""

    def make(name: str, **options: object) -> GlobalScheduler:
        config = GlobalConfig.model_validate({"port": redis_server.port, **options})
        host, port = name.rsplit(":", 1)
        return GlobalScheduler(config, SchedulerContext(name, host, int(port), 16))

    yield make


@pytest.fixture
async def raw_redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """An asyncio client on the test Redis."""
    client = Redis(port=redis_server.port)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def slow_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sim cost profile of these tests."""
    path = tmp_path_factory.mktemp("global") / "profile.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in SLOW_PROFILE.items()))
    return path


@pytest.fixture
def start_engines(
    redis_server: RedisServer, slow_profile: Path
) -> Iterator[Callable[..., list[Engine]]]:
    """Start ``n`` sim engines on the ``global`` scheduler; all are stopped after the test."""
    procs: list[ServerProcess] = []

    def start(n: int, *flags: str) -> list[Engine]:
        engines = []
        for _ in range(n):
            port = free_port()
            argv = python_module(
                "fdcore.engine", "--model", "sim", "--sim-profile", str(slow_profile),
                "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", "2",
                "--block-size", "16", "--num-gpu-blocks", "256",
                "--scheduler-name", "global", "--scheduler-port", str(redis_server.port),
                "--scheduler-alive-ttl", "3", "--scheduler-lost-timeout", "3", *flags,
            )
            proc = ServerProcess(argv, ready_url=f"http://127.0.0.1:{port}/health")
            procs.append(proc.start())
            engines.append(Engine(proc, port))
        return engines

    yield start
    for proc in procs:
        proc.stop()


def generated(engine: Engine) -> float:
    """Tokens this engine generated (for its own clients or for others)."""
    return engine.metrics().get("fastdeploy:generation_tokens_total", 0.0)

