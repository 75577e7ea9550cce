"""The six phases of ``benchmarks/reliability.py``; each returns a JSON-ready dict.

Every phase leaves the cluster as it found it (both engines up and in selection, the router
running), so phases can run in any order or alone.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import time
from argparse import Namespace
from collections import Counter
from collections.abc import Callable
from typing import Any

from reliability_client import (
    Result,
    burst,
    chat_body,
    closed_loop,
    slowloris_child,
    summarize,
    wait_message,
)
from reliability_cluster import Cluster


def log(msg: str) -> None:
    """Progress on stdout, with a timestamp."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _short(i: int) -> dict[str, Any]:
    return chat_body(i, 16, False)


def _fault_body(i: int) -> dict[str, Any]:
    # 100..800 tokens: streams that last about 0.3 to 3 s, so a fault always finds some in flight
    return chat_body(i, 100 + (i * 137) % 701, True)


async def streams(c: Cluster, a: Namespace) -> dict[str, Any]:
    """Phase 1: ``--streams`` concurrent streams, one connection each."""
    log(f"phase 1: {a.streams} concurrent streams (max_tokens 16)")
    before = c.router_usage()
    t0 = time.monotonic()
    results = await burst(c.url, [chat_body(i, 16, True) for i in range(a.streams)])
    wall = time.monotonic() - t0
    out = {"streams": a.streams, "wall_s": round(wall, 2), **summarize(results),
           "router_before": before, "router_after": c.router_usage(),
           "baseline": await asyncio.to_thread(c.wait_baseline)}
    await asyncio.sleep(5)  # let the router see the clients' closes
    out["router_after_5s"] = c.router_usage()
    log(f"  {out['outcomes']} in {wall:.1f}s; router {before} -> {out['router_after']}")
    return out


async def slowloris(c: Cluster, a: Namespace) -> dict[str, Any]:
    """Phase 2: normal closed-loop traffic on the idle router, then with ``--slowloris``
    slow connections held open (by a separate process, so the client's loop stays free)."""
    log(f"phase 2: {a.normal_clients} clients x {a.slow_seconds}s, idle router")
    idle = summarize(await closed_loop(c.url, a.normal_clients, _short, seconds=a.slow_seconds))
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=slowloris_child, daemon=True,
                       args=(c.router_port, a.slowloris, a.slow_interval, child))
    proc.start()
    try:
        ready = await asyncio.to_thread(wait_message, parent, 120)
        held = c.router_usage()
        log(f"  {ready['ready']} slow connections open (router {held}); same traffic again")
        loaded = summarize(await closed_loop(c.url, a.normal_clients, _short,
                                             seconds=a.slow_seconds))
        during = c.router_usage()
        parent.send("stop")
        stats = await asyncio.to_thread(wait_message, parent, 60)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    ratio = {q: (loaded[q] / idle[q] if idle[q] and loaded[q] else None)
             for q in ("total_p50_ms", "total_p99_ms")}
    log(f"  idle p50/p99 {idle['total_p50_ms']}/{idle['total_p99_ms']} ms, with slowloris "
        f"{loaded['total_p50_ms']}/{loaded['total_p99_ms']} ms; slowloris {stats}")
    return {"slow_connections": a.slowloris, "open_at_start": ready["ready"], "idle": idle,
            "loaded": loaded, "ratio": ratio, "slowloris": stats, "router_held": held,
            "router_during": during, "baseline": await asyncio.to_thread(c.wait_baseline)}


def _groups(results: list[Result], t_fault: float, victim: str) -> dict[str, Any]:
    """Outcomes of the streams in flight at the fault (on the victim, on the other engine)
    and of those started after it, with when the victim's streams ended."""
    groups: dict[str, list[Result]] = {"in flight on victim": [], "in flight on other": [],
                                       "started after": []}
    for r in results:
        if r.start >= t_fault:
            groups["started after"].append(r)
        elif r.end > t_fault:
            on = "victim" if r.instance == victim else "other"
            groups[f"in flight on {on}"].append(r)
    out: dict[str, Any] = {name: summarize(rs) for name, rs in groups.items()}
    ends = sorted(r.end - t_fault for r in groups["in flight on victim"])
    if ends:
        out["victim_end_after_fault_s"] = {"min": round(ends[0], 2), "max": round(ends[-1], 2)}
    after = groups["started after"]
    out["started_after_by_instance"] = dict(Counter(r.instance or "-" for r in after))
    return out


async def _fault(c: Cluster, a: Namespace, name: str, act: Callable[[int], None],
                 victim: int = 0) -> dict[str, Any]:
    """Closed-loop streams; ``act(pid)`` on engine ``victim`` at ``--fault-at``; then where
    requests go once the router's health check has taken the victim out."""
    results: list[Result] = []
    load = asyncio.create_task(closed_loop(c.url, a.fault_clients, _fault_body,
                                           seconds=a.fault_seconds, results=results))
    await asyncio.sleep(a.fault_at)
    at_fault = await asyncio.to_thread(c.in_flight)
    t_fault = time.monotonic()
    act(c.engines[victim].pid)
    log(f"  {name} engine-{victim} (router in flight {at_fault})")
    unhealthy_s = await asyncio.to_thread(c.wait_health, victim, False, 30)
    await load
    probes = await closed_loop(c.url, 4, _short, total=40)
    out = {"in_flight_at_fault": at_fault, "unhealthy_after_s": unhealthy_s,
           **_groups(results, t_fault, c.engine_url(victim)),
           "probes_after_unhealthy": summarize(probes),
           "probes_by_instance": dict(Counter(r.instance for r in probes)),
           "probes_all_on_survivor": all(r.instance == c.engine_url(1 - victim) for r in probes)}
    log(f"  victim's streams {out['in flight on victim']['outcomes']}, others "
        f"{out['in flight on other']['outcomes']}, after {out['started after']['outcomes']}; "
        f"unhealthy after {unhealthy_s}s; probes {out['probes_by_instance']}")
    return out


async def kill_engine(c: Cluster, a: Namespace) -> dict[str, Any]:
    """Phase 3: kill -9 of engine-0 under streaming load; then restart it."""
    log(f"phase 3: kill -9 of an engine under {a.fault_clients} streaming clients")
    out = await _fault(c, a, "SIGKILL", lambda pid: os.killpg(pid, signal.SIGKILL))
    out["baseline_survivor"] = await asyncio.to_thread(c.wait_baseline, (1,))
    log(f"  survivor baseline {out['baseline_survivor']}; restarting engine-0")
    await asyncio.to_thread(c.start_engine, 0)
    out["back_in_selection_s"] = await asyncio.to_thread(c.wait_ready)
    return out


async def stop_engine(c: Cluster, a: Namespace) -> dict[str, Any]:
    """Phase 4: SIGSTOP of engine-1 under streaming load, SIGCONT after the load."""
    log(f"phase 4: SIGSTOP of an engine under {a.fault_clients} streaming clients")
    out = await _fault(c, a, "SIGSTOP", lambda pid: os.killpg(pid, signal.SIGSTOP), victim=1)
    os.killpg(c.engines[1].pid, signal.SIGCONT)
    out["baseline_after_sigcont"] = await asyncio.to_thread(c.wait_baseline)
    out["back_in_selection_s"] = await asyncio.to_thread(c.wait_ready)
    log(f"  after SIGCONT {out['baseline_after_sigcont']}")
    return out


async def drain_router(c: Cluster, a: Namespace) -> dict[str, Any]:
    """Phase 5: SIGTERM of the router with ``--drain-streams`` streams in flight, of lengths
    spread so that some finish within the drain grace and some cannot; then a new router."""
    assert c.router is not None
    router = c.router
    log(f"phase 5: SIGTERM of the router with {a.drain_streams} streams in flight")
    bodies = [chat_body(i, 50 + i * (a.drain_max_tokens - 50) // max(1, a.drain_streams - 1),
                        True) for i in range(a.drain_streams)]
    task = asyncio.create_task(burst(c.url, bodies))
    await asyncio.sleep(1.0)
    at_term = await asyncio.to_thread(c.in_flight)
    t_term = time.monotonic()
    os.kill(router.pid, signal.SIGTERM)
    await asyncio.sleep(1.0)
    late = await burst(c.url, [chat_body(0, 16, True)])
    results = await task
    assert router.proc is not None
    try:
        code: int | None = await asyncio.to_thread(router.proc.wait, a.drain_grace + 30)
    except subprocess.TimeoutExpired:  # reported as no exit code; stopped below
        code = None
    exit_s = round(time.monotonic() - t_term, 2)
    log_text = router.log_path.read_text(errors="replace")
    in_flight = [r for r in results if r.end > t_term]
    ends = sorted(r.end - t_term for r in in_flight) or [0.0]
    out = {"streams": a.drain_streams, "in_flight_at_sigterm": at_term,
           "ended_before_sigterm": len(results) - len(in_flight), **summarize(in_flight),
           "stream_end_after_sigterm_s": {"min": round(ends[0], 2), "max": round(ends[-1], 2)},
           "new_request_during_drain": late[0].outcome, "exit_code": code,
           "exited_after_s": exit_s, "tracebacks": log_text.count("Traceback"),
           "log_tail": router.log_tail(8)}
    log(f"  {out['outcomes']}; exit code {code} after {exit_s}s; tracebacks {out['tracebacks']}")
    router.stop(grace=1)
    await asyncio.to_thread(c.start_router)
    out["baseline_after_restart"] = await asyncio.to_thread(c.wait_baseline)
    return out


def _soak_body(i: int) -> dict[str, Any]:
    return chat_body(i, 4 + i % 29, stream=i % 2 == 0)


async def soak(c: Cluster, a: Namespace) -> dict[str, Any]:
    """Phase 6: ``--soak`` requests, streaming and not, ``--soak-clients`` at a time; samples
    at the start, when half are done, at the end of the load and once idle."""
    log(f"phase 6: soak of {a.soak} requests, {a.soak_clients} clients")
    samples = {"start": await asyncio.to_thread(c.sample)}
    results: list[Result] = []
    t0 = time.monotonic()
    load = asyncio.create_task(closed_loop(c.url, a.soak_clients, _soak_body, total=a.soak,
                                           results=results))
    while not load.done():
        if "middle" not in samples and len(results) >= a.soak // 2:
            samples["middle"] = await asyncio.to_thread(c.sample)
            log(f"  middle: {samples['middle']}")
        await asyncio.sleep(0.2)
    await load
    wall = time.monotonic() - t0
    samples["end of load"] = await asyncio.to_thread(c.sample)
    baseline = await asyncio.to_thread(c.wait_baseline)
    samples["idle"] = await asyncio.to_thread(c.sample)
    out = {"requests": a.soak, "wall_s": round(wall, 1), "rps": round(len(results) / wall, 1),
           **summarize(results), "samples": samples, "baseline": baseline}
    log(f"  {out['outcomes']} in {wall:.0f}s; idle sample {samples['idle']}")
    return out


PHASES: dict[str, Callable[[Cluster, Namespace], Any]] = {
    "streams": streams,
    "slowloris": slowloris,
    "kill_engine": kill_engine,
    "stop_engine": stop_engine,
    "drain_router": drain_router,
    "soak": soak,
}
