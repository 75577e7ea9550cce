"""Helpers shared by the fdcore benchmarks: processes, loopback HTTP, CPU accounting, wrk.

Everything here talks to 127.0.0.1 only; HTTP goes through an opener with no proxies, so
``http_proxy`` settings in the environment never divert a local request.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_request(
    url: str, payload: Mapping[str, Any] | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    """GET ``url`` (or POST ``payload`` as JSON); return ``(status, body)``, 0 on no answer."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


def wait_until(
    check: Callable[[], bool],
    what: str,
    timeout: float,
    proc: ManagedProcess | None = None,
    interval: float = 0.1,
) -> float:
    """Poll ``check`` until it is true; return the seconds waited.

    Raises ``RuntimeError`` at once if ``proc`` exits, ``TimeoutError`` after ``timeout``.
    """
    t0 = time.monotonic()
    while True:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.returncode()}) before {what}")
        if check():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(interval)


def taskset_prefix(cpus: str | None) -> list[str]:
    """``["taskset", "-c", cpus]`` when pinning is asked for and possible, else ``[]``."""
    if not cpus:
        return []
    if shutil.which("taskset") is None:
        raise RuntimeError("taskset not found (util-linux); run without pinning")
    return ["taskset", "-c", cpus]


@dataclass
class ManagedProcess:
    """A server subprocess in its own process group, logging to a file.

    ``stop()`` sends SIGTERM to the whole group (the process and anything it forked), then
    SIGKILL after a grace period, so no worker outlives a benchmark.
    """

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    cpus: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> ManagedProcess:
        """Spawn the process."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                taskset_prefix(self.cpus) + self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(self.env or {})},
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        """The process id (also its process group id)."""
        assert self.proc is not None, f"{self.name} not started"
        return self.proc.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        """The exit status, None while running."""
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the process's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def cpu_seconds(self) -> float:
        """User + system CPU time of every live process in this process group."""
        if self.proc is None:
            return 0.0
        return group_cpu_seconds(self.pid)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, wait up to ``grace`` seconds, then SIGKILL it."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        if self.proc.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(pgid, signal.SIGKILL)
                self.proc.wait()
        # Children that ignored SIGTERM, or outlived their parent, go too.
        _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to a process group this module created; ignore a group already gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_cpu_seconds(pgid: int) -> float:
    """Sum of utime + stime (all threads) over the processes whose process group is ``pgid``."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp ... utime(14) stime(15).
        rest = stat[stat.rfind(b")") + 2 :].split()
        if int(rest[2]) == pgid:
            total += int(rest[11]) + int(rest[12])
    return total / _CLK_TCK


@dataclass
class WrkResult:
    """One wrk run: request count, duration, errors and (µs) latency percentiles."""

    connections: int
    duration_s: float
    requests: int
    errors: dict[str, int]
    latency_us: dict[str, float]
    cpu_s: float = 0.0  # CPU seconds the measured server groups used during the run
    commands: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        """Completed requests per second."""
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        """Connect, read, write, timeout and non-2xx/3xx errors together."""
        return sum(self.errors.values())

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, with ``rps`` included."""
        out = asdict(self)
        out["rps"] = round(self.rps, 1)
        return out


def _wrk_argv(url: str, connections: int, duration_s: int, script: Path) -> list[str]:
    return [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration_s}s",  # wrk takes whole seconds
        "--timeout",
        "5s",
        "-s",
        str(script),
        url,
    ]


def _parse_wrk(out: str, connections: int, command: str) -> WrkResult:
    for line in out.splitlines():
        if line.startswith("WRK_JSON "):
            data = json.loads(line[len("WRK_JSON ") :])
            return WrkResult(
                connections=connections,
                duration_s=data["duration_us"] / 1e6,
                requests=int(data["requests"]),
                errors={k: int(v) for k, v in data["errors"].items()},
                latency_us={k: float(v) for k, v in data["latency_us"].items()},
                commands=[command],
            )
    raise RuntimeError(f"wrk printed no WRK_JSON line:\n{out[-2000:]}")


def run_wrk(
    urls: Sequence[str],
    connections: int,
    duration_s: int,
    script: Path,
    cpus: str | None = None,
    measure: Sequence[ManagedProcess] = (),
) -> WrkResult:
    """Run one single-threaded wrk per URL at once, ``connections`` split evenly among them.

    With several URLs the request counts and errors add up and the latency figures are those
    of the first URL. ``cpu_s`` is the CPU time that the ``measure`` process groups used while
    wrk ran.
    """
    share = max(1, connections // len(urls))
    procs: list[tuple[list[str], subprocess.Popen[str]]] = []
    cpu0 = sum(p.cpu_seconds() for p in measure)
    for url in urls:
        argv = _wrk_argv(url, share, duration_s, script)
        procs.append(
            (
                argv,
                subprocess.Popen(
                    taskset_prefix(cpus) + argv,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                ),
            )
        )
    results: list[WrkResult] = []
    try:
        for argv, proc in procs:
            out, _ = proc.communicate(timeout=duration_s + 30)
            results.append(_parse_wrk(out, share, shlex.join(argv)))
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    cpu1 = sum(p.cpu_seconds() for p in measure)
    first = results[0]
    if len(results) > 1:
        errors = {k: sum(r.errors.get(k, 0) for r in results) for k in first.errors}
        first = WrkResult(
            connections=share * len(results),
            duration_s=max(r.duration_s for r in results),
            requests=sum(r.requests for r in results),
            errors=errors,
            latency_us=first.latency_us,
            commands=[c for r in results for c in r.commands],
        )
    first.cpu_s = round(cpu1 - cpu0, 3)
    return first


def proc_usage(pid: int) -> dict[str, float | int | None]:
    """Resident memory (MiB) and open file descriptors of process ``pid`` (None when gone)."""
    rss = None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = round(int(line.split()[1]) / 1024, 1)
        fds: int | None = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = None
    return {"rss_mib": rss, "fds": fds}


def git_state(repo: Path) -> str:
    """``git rev-parse --short HEAD``, plus "with uncommitted changes" when the tree is dirty."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo,
                              capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo,
                               capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    sha = head.stdout.strip()
    return f"{sha} with uncommitted changes" if dirty.stdout.strip() else sha


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg gives them."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def replace_md_section(path: Path, heading: str, section: str) -> None:
    """Replace the ``heading`` section of the Markdown file ``path`` (up to the next ``## ``
    heading) with ``section``, or append it; the rest of the file is left alone."""
    lines = path.read_text().splitlines() if path.exists() else []
    start = next((i for i, ln in enumerate(lines) if ln.strip() == heading), None)
    new = section.rstrip("\n").splitlines()
    if start is None:
        lines += ([""] if lines and lines[-1].strip() else []) + new
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        tail = lines[end:]
        lines = lines[:start] + new + (["", *tail] if tail else [])
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
