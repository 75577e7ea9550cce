"""Fixtures for engine tests: real ``fdcore engine`` processes on loopback, plain HTTP helpers."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from fdcore.testing import ServerProcess, free_port
from fdcore.testing.processes import python_module

# Fast steps so tests finish quickly, but long enough that a long request is still running
# when a test acts on it.
FAST_PROFILE = {
    "prefill-seconds-per-token": 0.0,
    "decode-seconds-per-step": 0.002,
    "decode-seconds-per-seq": 0.0,
}


class Engine:
    """A running engine process and HTTP helpers against it."""

    def __init__(self, proc: ServerProcess, port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.pd_port = 0  # the P-D connector's port, on a prefill or decode engine

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        """Send a request; return ``(status, decoded JSON or text)``."""
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"content-type": "application/json",
                                              **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                status, payload = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, exc.read()
            exc.close()
        try:
            return status, orjson.loads(payload)
        except orjson.JSONDecodeError:
            return status, payload.decode()

    def complete(self, prompt: str | list[int], **fields: Any) -> dict[str, Any]:
        """A successful non-streaming completion."""
        status, body = self.request("POST", "/v1/completions", {"prompt": prompt, **fields})
        assert status == 200, body
        return dict(body)

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of ``/metrics``."""
        status, text = self.request("GET", "/metrics")
        assert status == 200
        return {m[1]: float(m[2]) for m in re.finditer(r"^([^\s{#]+) (\S+)$", text, re.M)}

    def metric(self, name: str) -> float:
        """One unlabelled sample, e.g. ``fastdeploy:available_gpu_block_num``."""
        return self.metrics()[name]


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll ``condition`` until true; the deadline only guards against a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        time.sleep(0.02)


@pytest.fixture(scope="session")
def sim_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sim profile with fast steps."""
    path = tmp_path_factory.mktemp("engine") / "profile.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in FAST_PROFILE.items()))
    return path


@pytest.fixture(scope="session")
def start_engine(sim_profile: Path) -> Iterator[Callable[..., Engine]]:
    """Start sim engines with extra flags; all are stopped at the end of the session."""
    procs: list[ServerProcess] = []

    def start(*flags: str, model: str = "sim", ready_timeout: float = 60.0,
              profile: Path | None = None, env: dict[str, str] | None = None) -> Engine:
        port = free_port()
        argv = python_module("fdcore.engine", "--model", model, "--host", "127.0.0.1",
                             "--port", str(port), *flags)
        if model == "sim":
            argv += ["--sim-profile", str(profile or sim_profile)]
        proc = ServerProcess(argv, ready_url=f"http://127.0.0.1:{port}/health",
                             ready_timeout=ready_timeout, env=env)
        procs.append(proc.start())
        return Engine(proc, port)

    yield start
    for proc in procs:  # signal all first so they shut down side by side
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.terminate()
    for proc in procs:
        proc.stop()


@pytest.fixture(scope="session")
def engine(start_engine: Callable[..., Engine]) -> Engine:
    """A default sim engine shared by tests that leave it as they found it."""
    return start_engine("--block-size", "16", "--num-gpu-blocks", "256")
