"""Reliability of fdcore's router in front of real engines: overload, slow clients, faults.

One run starts two ``fdcore engine --model sim`` processes (fast sim profile: a 16-token
answer takes tens of ms) and ``fdcore serve`` in front of them (``manager.register-path``,
health checks every second, ``server.header-timeout-secs``, ``proxy.stream-idle-timeout-secs``
and ``server.drain-grace-secs`` from the flags), then runs six phases
(``reliability_phases.py``):

1. ``streams``: ``--streams`` concurrent streaming chats, one connection each;
2. ``slowloris``: ``--slowloris`` slow connections held while closed-loop traffic flows,
   against the same traffic on the idle router;
3. ``kill_engine``: kill -9 of one engine under streaming load;
4. ``stop_engine``: SIGSTOP of one engine under streaming load, SIGCONT after it;
5. ``drain_router``: SIGTERM of the router with streams in flight;
6. ``soak``: ``--soak`` mixed requests, with router RSS, fds, in-flight counters and the
   engines' free blocks sampled along the way.

Output: progress on stdout, ``benchmarks/out/reliability.json``, process logs in
``benchmarks/out/reliability/`` and, with ``--update-results``, the "Reliability" section of
``benchmarks/RESULTS.md`` (``reliability_report.py``; ``--from-json`` rewrites it from a saved
report without running). Modules: ``reliability_cluster.py`` (the processes and what is read from
them), ``reliability_client.py`` (load generators), ``reliability_phases.py`` (the phases).
Everything shares this machine's CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import resource
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import git_state, loadavg, replace_md_section
from reliability_cluster import SIM_PROFILE, Cluster, router_config
from reliability_phases import PHASES, log
from reliability_report import HEADING, section

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

FULL = {"streams": 1000, "slowloris": 2000, "slow_seconds": 20, "fault_seconds": 10,
        "drain_streams": 64, "soak": 20000}
QUICK = {"streams": 100, "slowloris": 200, "slow_seconds": 5, "fault_seconds": 6,
         "drain_streams": 16, "soak": 1000}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags; sizes left unset come from ``--quick`` or the full-size defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"small sizes for a smoke run: {QUICK}")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset, in order")
    p.add_argument("--streams", type=int, help="phase 1 concurrent streams (1000)")
    p.add_argument("--slowloris", type=int, help="phase 2 slow connections (2000)")
    p.add_argument("--slow-seconds", type=float, help="phase 2 seconds per traffic run (20)")
    p.add_argument("--slow-interval", type=float, default=2.0,
                   help="seconds between the bytes of a trickling slow connection")
    p.add_argument("--normal-clients", type=int, default=8, help="phase 2 closed-loop clients")
    p.add_argument("--fault-clients", type=int, default=32, help="phases 3-4 streaming clients")
    p.add_argument("--fault-seconds", type=float, help="phases 3-4 seconds of load (10)")
    p.add_argument("--fault-at", type=float, default=2.0, help="phases 3-4: fault after (s)")
    p.add_argument("--drain-streams", type=int, help="phase 5 streams in flight (64)")
    p.add_argument("--drain-max-tokens", type=int, default=1200,
                   help="phase 5 streams ask for 50 up to this many tokens")
    p.add_argument("--soak", type=int, help="phase 6 requests (20000)")
    p.add_argument("--soak-clients", type=int, default=32)
    p.add_argument("--header-timeout", type=float, default=5, help="server.header-timeout-secs")
    p.add_argument("--idle-timeout", type=float, default=3,
                   help="proxy.stream-idle-timeout-secs")
    p.add_argument("--drain-grace", type=float, default=5, help="server.drain-grace-secs")
    p.add_argument("--max-num-seqs", type=int, default=256, help="engines' --max-num-seqs")
    p.add_argument("--num-gpu-blocks", type=int, default=2048, help="engines' KV blocks")
    p.add_argument("--out", type=Path, default=HERE / "out" / "reliability.json")
    p.add_argument("--update-results", action="store_true",
                   help="rewrite the 'Reliability' section of benchmarks/RESULTS.md")
    p.add_argument("--from-json", type=Path,
                   help="run nothing: rewrite the RESULTS.md section from this report")
    a = p.parse_args(argv)
    for key, value in (QUICK if a.quick else FULL).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    unknown = set(a.phases.split(",")) - set(PHASES)
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}; choose from {', '.join(PHASES)}")
    return a


def raise_fd_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it); return (soft, hard)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _command_line() -> str:
    def rel(path: str) -> str:
        try:
            return str(Path(os.path.abspath(path)).relative_to(REPO))
        except ValueError:
            return path

    return shlex.join([rel(sys.executable), rel(sys.argv[0]), *sys.argv[1:]])


async def run_phases(c: Cluster, a: argparse.Namespace, report: dict[str, Any]) -> None:
    """Run the chosen phases in order; a phase that fails is recorded and the run goes on."""
    for name in a.phases.split(","):
        t0 = time.monotonic()
        try:
            ready_s = await asyncio.to_thread(c.wait_ready)
            before = await asyncio.to_thread(c.ejections)
            report["phases"][name] = await PHASES[name](c, a)
            after = await asyncio.to_thread(c.ejections)
            report["phases"][name]["ready_wait_s"] = ready_s
            report["phases"][name]["ejections"] = {
                i: n - before.get(i, 0) if n >= before.get(i, 0) else n  # a new router: from 0
                for i, n in after.items()}
        except Exception as exc:  # one broken phase must not hide the others
            log(f"  phase {name} FAILED: {exc!r}")
            report["phases"][name] = {"error": repr(exc)}
            await asyncio.to_thread(_recover, c)
        report["phases"][name]["phase_s"] = round(time.monotonic() - t0, 1)
        report["load_average"].append(f"after {name}: {loadavg()}")


def _recover(c: Cluster) -> None:
    """After a failed phase: restart whatever is down, so later phases have a whole cluster."""
    for i, engine in enumerate(c.engines):
        if not engine.alive():
            c.start_engine(i)
    if c.router is None or not c.router.alive():
        c.start_router()
    c.wait_ready()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every phase ran (its figures are in the report)."""
    a = parse_args(argv)
    if a.from_json is not None:
        saved = json.loads(a.from_json.read_text())
        replace_md_section(HERE / "RESULTS.md", HEADING, section(saved, REPO))
        log(f"rewrote the Reliability section of benchmarks/RESULTS.md from {a.from_json}")
        return 0
    nofile = raise_fd_limit()

    def on_signal(signum: int, frame: object) -> None:
        log(f"{signal.Signals(signum).name}: stopping every process")
        raise SystemExit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too: a background
        # job started by a script has SIGINT ignored
        signal.signal(sig, on_signal)
    run_dir = a.out.resolve().parent / "reliability"
    c = Cluster(run_dir, a)
    report: dict[str, Any] = {
        "meta": {"command": _command_line(), "date": dt.datetime.now(dt.UTC).strftime(
            "%Y-%m-%d %H:%M UTC"), "commit": git_state(REPO), "cpus": len(
            os.sched_getaffinity(0)), "nofile": list(nofile)},
        "config": {"args": {k: (str(v) if isinstance(v, Path) else v)
                            for k, v in vars(a).items()}, "sim_profile": SIM_PROFILE},
        "load_average": [f"before: {loadavg()}"],
        "phases": {},
    }
    try:
        log(f"starting 2 sim engines and the router in {run_dir}")
        c.start()
        report["config"]["router_yaml"] = router_config(a, run_dir / "register.yaml")
        report["config"]["engine_argv"] = c.engines[0].argv
        report["config"]["engine_urls"] = [c.engine_url(i) for i in range(2)]
        asyncio.run(run_phases(c, a, report))
    finally:
        c.close()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {a.out}")
    if a.update_results:
        replace_md_section(HERE / "RESULTS.md", HEADING, section(report, REPO))
        log("updated the Reliability section of benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
