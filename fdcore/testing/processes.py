"""Start real server processes on loopback ports and wait until they answer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(
    url: str, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits.

    Polling is the only readiness signal a separate process offers over HTTP; the interval is
    short and the deadline generous, so this never decides a test's outcome by timing.
    """
    deadline = time.monotonic() + timeout
    last: str = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s (last: {last})")


class ServerProcess:
    """A subprocess (``python -m ...`` or a console script) with its output in a log file.

    Use as a context manager; on exit it is sent SIGTERM, then SIGKILL after a grace period.
    ``ready_url`` is polled until it returns 200.
    """

    def __init__(
        self,
        argv: Sequence[str],
        ready_url: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        self.argv = list(argv)
        self.ready_url = ready_url
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.ready_timeout = ready_timeout
        # Closed by stop()/kill(), which keep what was printed for output().
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="fdcore-proc-", suffix=".log", delete=False
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self._final_output: str | None = None

    def start(self) -> ServerProcess:
        """Spawn the process and wait for readiness."""
        self.proc = subprocess.Popen(
            self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd
        )
        if self.ready_url:
            try:
                wait_for_http(self.ready_url, self.ready_timeout, self.proc)
            except Exception as exc:
                self.stop()
                raise RuntimeError(
                    f"{' '.join(self.argv)} failed to start: {exc}\n{self.output()}"
                ) from exc
        return self

    def output(self) -> str:
        """Everything the process printed so far."""
        if self._final_output is not None:
            return self._final_output
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; return the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_log()
        return self.proc.returncode

    def _close_log(self) -> None:
        if self._final_output is None and not self.log.closed:
            self._final_output = self.output()
            self.log.close()
            Path(self.log.name).unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL at once (a crash, as far as peers can tell)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_log()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def python_module(module: str, *args: str) -> list[str]:
    """argv that runs ``python -m module args...`` with this interpreter."""
    return [sys.executable, "-m", module, *args]
