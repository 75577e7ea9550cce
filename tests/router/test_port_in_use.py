"""A port already in use ends ``fdcore serve`` and ``fdcore engine`` with one line, no
traceback: every port is bound before any app starts (fdcore/server.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fdcore.testing.cluster import FAST_SIM_PROFILE
from fdcore.testing.processes import free_port


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that this test holds, listening, for its whole run."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _fdcore(*args: str) -> subprocess.CompletedProcess[str]:
    # The timeout only ends a hung run; no outcome depends on it.
    return subprocess.run([sys.executable, "-m", "fdcore", *args], capture_output=True,
                          text=True, timeout=120)


def _assert_one_line(result: subprocess.CompletedProcess[str], port: int) -> None:
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"fdcore: error: cannot listen on 127.0.0.1:{port}: Address already in use; stop what "
        "holds the port or choose another"
    ]


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
def test_serve(server: str, taken_port: int, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"server": {"http-server": server}}))
    result = _fdcore("serve", "--config", str(config), "--host", "127.0.0.1",
                     "--port", str(taken_port))
    _assert_one_line(result, taken_port)


@pytest.mark.parametrize("which", ["port", "metrics-port"])
def test_engine(which: str, taken_port: int, tmp_path: Path) -> None:
    profile = tmp_path / "sim-profile.yaml"
    profile.write_text(yaml.safe_dump(FAST_SIM_PROFILE))
    ports = {"port": free_port(), "metrics-port": free_port(), which: taken_port}
    result = _fdcore("engine", "--model", "sim", "--sim-profile", str(profile),
                     "--host", "127.0.0.1", *(f"--{k}={v}" for k, v in ports.items()))
    _assert_one_line(result, taken_port)
