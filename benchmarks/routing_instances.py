"""The instances behind the routers in ``routing_quality.py``: test servers or ``sim`` engines.

Two kinds, one interface (:class:`Instances`):

* ``model`` (:class:`ModelInstances`): ``prefix_cache_server.py``, one process serving every
  port, whose prefix cache and timing are a model of an engine's. ``fresh()`` empties the
  caches and counters through ``POST /reset``.
* ``sim`` (:class:`SimInstances`): N ``fdcore engine --model sim`` processes, i.e. the real
  engine (API, scheduler, continuous batcher, block manager, prefix cache with LRU reuse of
  full blocks) with a model runner that sleeps for a modelled time. The engine has no way to
  empty its cache, so ``fresh()`` stops the engines and starts new ones on new ports.

Both report the requests each instance completed (``served()``) and a few of its own figures
after a run (``stats()``), in port order.
"""

from __future__ import annotations

import json
import sys
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from benchlib import ManagedProcess, free_port, http_request, wait_until

HERE = Path(__file__).resolve().parent
MODEL = "prefix-cache-sim"  # the model name every request carries and every instance serves
# Figures read from a sim engine's /metrics after each run.
SIM_STATS = (
    "request_success_total",
    "prompt_tokens_total",
    "prefix_cache_hits_total",
    "request_preempted_total",
    "free_gpu_block_num",
)


class Instances(ABC):
    """A set of instances for a router to route to."""

    kind: str = ""

    def __init__(self, count: int, run_dir: Path) -> None:
        self.count = count
        self.run_dir = run_dir
        self.ports: list[int] = []

    @abstractmethod
    def fresh(self) -> list[int]:
        """Make every instance start from an empty cache and zero counters; return the ports."""

    @abstractmethod
    def served(self) -> list[int]:
        """Requests each instance has completed since ``fresh()``, in port order."""

    @abstractmethod
    def stats(self) -> list[dict[str, float]]:
        """Each instance's own counters (cache, requests), in port order."""

    @abstractmethod
    def close(self) -> None:
        """Stop every process this object started."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What the instances are, for the JSON report."""

    def log_tail(self) -> str:
        """The end of the instances' logs, for a failure message."""
        return ""

    def __enter__(self) -> Instances:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ModelInstances(Instances):
    """``prefix_cache_server.py`` instances (one process, one port each)."""

    kind = "model"

    def __init__(self, count: int, run_dir: Path, capacity_blocks: int) -> None:
        super().__init__(count, run_dir)
        self.capacity_blocks = capacity_blocks
        self.ports = [free_port() for _ in range(count)]
        argv = [sys.executable, str(HERE / "prefix_cache_server.py")]
        argv += ["--ports", ",".join(map(str, self.ports))]
        argv += ["--capacity-blocks", str(capacity_blocks)]
        self.proc = ManagedProcess("instances", argv, run_dir / "instances.log").start()
        try:
            wait_until(
                lambda: all(
                    http_request(f"http://127.0.0.1:{p}/health")[0] == 200 for p in self.ports
                ),
                "instances answer /health",
                30,
                self.proc,
            )
        except BaseException:
            self.close()
            raise

    def fresh(self) -> list[int]:
        """Empty every instance's cache and counters (``POST /reset``)."""
        for p in self.ports:
            status, _ = http_request(f"http://127.0.0.1:{p}/reset", {}, timeout=5)
            if status != 200:
                raise RuntimeError(f"instance {p} did not reset (HTTP {status})")
        return self.ports

    def stats(self) -> list[dict[str, float]]:
        """``GET /stats`` of each instance: requests, prompt and cached tokens, cache blocks."""
        out = []
        for p in self.ports:
            status, body = http_request(f"http://127.0.0.1:{p}/stats")
            out.append(json.loads(body) if status == 200 else {})
        return out

    def served(self) -> list[int]:
        """The ``requests`` figure of each instance's ``/stats``."""
        return [int(s.get("requests", 0)) for s in self.stats()]

    def close(self) -> None:
        """Stop the server process."""
        self.proc.stop()

    def describe(self) -> dict[str, Any]:
        """Kind, count, cache size and the launch line."""
        return {
            "kind": self.kind,
            "count": self.count,
            "capacity_blocks": self.capacity_blocks,
            "launch": " ".join(self.proc.argv),
        }

    def log_tail(self) -> str:
        """The end of the server's log."""
        return self.proc.log_tail()


@dataclass(frozen=True)
class SimSettings:
    """Cost model and engine flags of the ``sim`` instances."""

    prefill_seconds_per_token: float = 20e-6
    decode_seconds_per_step: float = 0.003
    decode_seconds_per_seq: float = 0.0001
    block_size: int = 64
    num_gpu_blocks: int = 1024
    max_num_seqs: int = 16

    def profile_yaml(self) -> str:
        """The ``--sim-profile`` file's text."""
        return (
            f"prefill-seconds-per-token: {self.prefill_seconds_per_token}\n"
            f"decode-seconds-per-step: {self.decode_seconds_per_step}\n"
            f"decode-seconds-per-seq: {self.decode_seconds_per_seq}\n"
            "eos-probability: 0.0\n"
        )


def parse_metrics(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """The unlabelled ``fastdeploy:<name>`` samples of a Prometheus text page."""
    wanted = {f"fastdeploy:{n}": n for n in names}
    out: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in wanted:
            out[wanted[parts[0]]] = float(parts[1])
    return out


class SimInstances(Instances):
    """N ``fdcore engine --model sim`` processes, restarted by every ``fresh()``."""

    kind = "sim"

    def __init__(self, count: int, run_dir: Path, binary: str, settings: SimSettings) -> None:
        super().__init__(count, run_dir)
        self.binary = binary
        self.settings = settings
        self.profile = run_dir / "sim-profile.yaml"
        self.profile.parent.mkdir(parents=True, exist_ok=True)
        self.profile.write_text(settings.profile_yaml())
        self.procs: list[ManagedProcess] = []

    def argv(self, port: int) -> list[str]:
        """One engine's command line."""
        s = self.settings
        return [
            self.binary, "engine", "--model", "sim", "--sim-profile", str(self.profile),
            "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port),
            "--cpu-threads", "1", "--block-size", str(s.block_size),
            "--num-gpu-blocks", str(s.num_gpu_blocks), "--enable-prefix-caching",
            "--max-num-seqs", str(s.max_num_seqs),
        ]  # fmt: skip

    def fresh(self) -> list[int]:
        """Stop the running engines, start new ones on new ports, wait for their /health."""
        self.close()
        self.ports = [free_port() for _ in range(self.count)]
        self.procs = [
            ManagedProcess(f"engine-{i}", self.argv(p), self.run_dir / f"engine-{i}.log").start()
            for i, p in enumerate(self.ports)
        ]
        for proc, port in zip(self.procs, self.ports, strict=True):
            url = f"http://127.0.0.1:{port}/health"
            try:
                wait_until(lambda u=url: http_request(u)[0] == 200, f"{proc.name} /health",
                           120, proc, 0.2)  # fmt: skip
            except Exception:
                print(proc.log_tail(), file=sys.stderr)
                raise  # the engines stop in close(), called by the owner (or __exit__)
        return self.ports

    def stats(self) -> list[dict[str, float]]:
        """Selected counters and gauges (``SIM_STATS``) from each engine's /metrics."""
        out = []
        for p in self.ports:
            status, body = http_request(f"http://127.0.0.1:{p}/metrics")
            out.append(parse_metrics(body.decode(), SIM_STATS) if status == 200 else {})
        return out

    def served(self) -> list[int]:
        """``fastdeploy:request_success_total`` of each engine."""
        return [int(s.get("request_success_total", 0)) for s in self.stats()]

    def close(self) -> None:
        """SIGTERM every engine at once, then wait for each (SIGKILL after the grace period)."""
        for proc in self.procs:
            if proc.proc is not None and proc.alive():
                proc.proc.terminate()
        for proc in self.procs:
            proc.stop()
        self.procs = []

    def describe(self) -> dict[str, Any]:
        """Kind, count, cost model, cache size and one engine's launch line."""
        return {
            "kind": self.kind,
            "count": self.count,
            "settings": asdict(self.settings),
            "profile": self.settings.profile_yaml(),
            "launch": " ".join(self.argv(0)).replace("--port 0", "--port PORT"),
        }

    def log_tail(self) -> str:
        """The end of every engine's log."""
        return "\n".join(f"[{p.name}]\n{p.log_tail(10)}" for p in self.procs)
