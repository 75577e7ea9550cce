"""The system under test of ``benchmarks/reliability.py``: ``fdcore serve`` in front of two
``fdcore engine --model sim`` processes (attached through ``manager.register-path``), and what
the benchmark reads from them (``/registered``, engine ``/metrics``, ``/proc``)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import ManagedProcess, free_port, http_request, proc_usage, wait_until

# FAST_SIM_PROFILE of fdcore/testing/cluster.py: a token every 2 ms of sleep (plus the engine's
# own overhead per step), no prefill cost, so a 16-token stream takes tens of ms.
SIM_PROFILE = {
    "prefill-seconds-per-token": 0.0,
    "decode-seconds-per-step": 0.002,
    "decode-seconds-per-seq": 0.0,
}
_AVAILABLE = re.compile(rb"^fastdeploy:available_gpu_block_num (\S+)$", re.M)


def router_config(a: Namespace, register: Path) -> str:
    """The router's YAML: short health checks and the timeouts under test."""
    return (
        "server:\n"
        "  host: 127.0.0.1\n"
        f"  header-timeout-secs: {a.header_timeout}\n"
        f"  drain-grace-secs: {a.drain_grace}\n"
        "scheduler:\n"
        "  policy: request_num\n"
        "manager:\n"
        "  health-check-interval-secs: 1\n"
        "  health-check-timeout-secs: 1\n"
        f"  register-path: {register}\n"
        "proxy:\n"
        f"  stream-idle-timeout-secs: {a.idle_timeout}\n"
        "outlier:\n"
        "  base-ejection-secs: 5\n"
        "log:\n"
        "  level: warning\n"
    )


@dataclass
class Cluster:
    """Two sim engines and a router, all in ``run_dir``; ``close()`` stops every process."""

    run_dir: Path
    args: Namespace
    engine_ports: list[int] = field(default_factory=list)
    engines: list[ManagedProcess] = field(default_factory=list)
    total_blocks: dict[int, int] = field(default_factory=dict)
    router: ManagedProcess | None = None
    router_port: int = 0
    started: list[ManagedProcess] = field(default_factory=list)
    router_starts: int = 0

    @property
    def url(self) -> str:
        """The router's base URL."""
        return f"http://127.0.0.1:{self.router_port}"

    def engine_url(self, i: int) -> str:
        """Engine ``i``'s base URL (what the router names it in X-Router-Instance-URL)."""
        return f"http://127.0.0.1:{self.engine_ports[i]}"

    def start(self) -> None:
        """Write the configs, start both engines, then the router; wait until both serve."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        profile = self.run_dir / "sim.yaml"
        profile.write_text("".join(f"{k}: {v}\n" for k, v in SIM_PROFILE.items()))
        self.engine_ports = [free_port(), free_port()]
        self.engines = [self._engine_proc(i, profile) for i in range(2)]
        for i in range(2):
            self.start_engine(i)
        register = self.run_dir / "register.yaml"
        register.write_text("instances:\n" + "".join(
            f"  - role: mixed\n    host_ip: 127.0.0.1\n    port: {p}\n"
            for p in self.engine_ports))
        (self.run_dir / "router.yaml").write_text(router_config(self.args, register))
        self.start_router()

    def _engine_proc(self, i: int, profile: Path) -> ManagedProcess:
        argv = [sys.executable, "-m", "fdcore", "engine", "--model", "sim", "--host",
                "127.0.0.1", "--port", str(self.engine_ports[i]), "--sim-profile", str(profile),
                "--max-num-seqs", str(self.args.max_num_seqs), "--num-gpu-blocks",
                str(self.args.num_gpu_blocks), "--log-level", "warning"]
        return ManagedProcess(f"engine-{i}", argv, self.run_dir / f"engine-{i}.log")

    def start_engine(self, i: int) -> None:
        """(Re)start engine ``i`` on its port; record its free blocks at start as the total."""
        old = self.engines[i]
        log_path = self.run_dir / f"{old.name}.{len(self.started)}.log"
        proc = ManagedProcess(old.name, old.argv, log_path)
        self.engines[i] = proc.start()
        self.started.append(proc)
        wait_until(lambda: http_request(f"{self.engine_url(i)}/health", timeout=2)[0] == 200,
                   f"{proc.name} /health", 120, proc, 0.25)
        blocks = self.blocks(i)
        assert blocks is not None, f"{proc.name}: no fastdeploy:available_gpu_block_num"
        self.total_blocks[i] = blocks

    def start_router(self) -> None:
        """Start (again) the router on a fresh port; wait until both engines are in selection."""
        self.router_port = free_port()
        self.router_starts += 1
        argv = [str(Path(sys.executable).parent / "fdcore"), "serve", "--config",
                str(self.run_dir / "router.yaml"), "--port", str(self.router_port)]
        self.router = ManagedProcess("router", argv,
                                     self.run_dir / f"router.{self.router_starts}.log")
        self.started.append(self.router.start())
        wait_until(lambda: http_request(f"{self.url}/health", timeout=2)[0] == 200,
                   "router /health", 120, self.router, 0.25)
        self.wait_ready()

    def close(self) -> None:
        """Stop every process this cluster started (SIGCONT first: a stopped one cannot die
        of SIGTERM)."""
        for proc in self.started:
            if proc.alive():
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGCONT)
        for proc in self.started:
            proc.stop(grace=3)

    # ------------------------------------------------------------------ reading state

    def registered(self) -> list[dict[str, Any]]:
        """The router's ``/registered`` mixed instances ([] when it does not answer)."""
        status, body = http_request(f"{self.url}/registered", timeout=5)
        if status != 200:
            return []
        return list(json.loads(body).get("mixed", []))

    def instance(self, i: int) -> dict[str, Any] | None:
        """Engine ``i``'s ``/registered`` entry."""
        url = self.engine_url(i)
        return next((e for e in self.registered() if e.get("url") == url), None)

    def in_flight(self) -> dict[str, int]:
        """``in_flight_requests`` per engine URL, as the router counts them."""
        return {str(e["url"]): int(e.get("in_flight_requests", -1)) for e in self.registered()}

    def ejections(self) -> dict[str, int]:
        """Outlier ejections so far per engine name, as the router counts them (a restarted
        router starts again from 0)."""
        return {f"engine-{i}": int((self.instance(i) or {}).get("ejections", 0))
                for i in range(2)}

    def blocks(self, i: int) -> int | None:
        """Engine ``i``'s ``fastdeploy:available_gpu_block_num`` (None when it does not answer)."""
        status, body = http_request(f"{self.engine_url(i)}/metrics", timeout=2)
        match = _AVAILABLE.search(body) if status == 200 else None
        return int(float(match.group(1))) if match else None

    def router_usage(self) -> dict[str, Any]:
        """The router process's RSS (MiB) and open fds."""
        assert self.router is not None
        return proc_usage(self.router.pid)

    def sample(self) -> dict[str, Any]:
        """Router RSS and fds, its in-flight counters, and every engine's free blocks."""
        return {**self.router_usage(), "in_flight": self.in_flight(),
                "free_blocks": {self.engine_url(i): self.blocks(i) for i in range(2)}}

    # ------------------------------------------------------------------ waiting

    def wait_ready(self, timeout: float = 60) -> float:
        """Wait until both engines are healthy and not ejected; return the seconds waited."""

        def ready() -> bool:
            entries = self.registered()
            return len(entries) == 2 and all(
                e.get("healthy") and e.get("circuit", "closed") == "closed" for e in entries)

        return round(wait_until(ready, "both engines healthy in the router", timeout,
                                self.router, 0.25), 2)

    def wait_health(self, i: int, healthy: bool, timeout: float = 30) -> float | None:
        """Seconds until the router shows engine ``i`` with ``healthy``; None if never."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            entry = self.instance(i)
            if entry is not None and bool(entry.get("healthy")) == healthy:
                return round(time.monotonic() - t0, 2)
            time.sleep(0.1)
        return None

    def wait_baseline(
        self, engines: tuple[int, ...] = (0, 1), timeout: float = 30
    ) -> dict[str, Any]:
        """Wait until the router's in-flight counters are all 0 and ``engines`` have all their
        blocks free again; report whether and when that happened, and the last values seen."""
        t0 = time.monotonic()
        while True:
            counts = self.in_flight()
            blocks = {self.engine_url(i): self.blocks(i) for i in engines}
            totals = {self.engine_url(i): self.total_blocks[i] for i in engines}
            reached = bool(counts) and not any(counts.values()) and blocks == totals
            waited = time.monotonic() - t0
            if reached or waited > timeout:
                return {"reached": reached, "waited_s": round(waited, 2), "in_flight": counts,
                        "free_blocks": blocks, "total_blocks": totals}
            time.sleep(0.25)
