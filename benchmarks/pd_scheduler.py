"""PD through the router against PD through the ``splitwise`` scheduler, on one sim cluster.

The same 2 prefill + 2 decode sim engines (the profile and flags of ``pd_grid.py``) either
register with ``fdcore serve --splitwise`` (clients call the router) or run
``--scheduler-name splitwise`` against a redis-server started here (clients call the four
engines in turn, as FastDeploy's router-less deployment has them do). Same workload for both:
Poisson arrivals of streamed completions, ``ignore_eos``. Reported: TTFT and TPOT p50/p99, and
for the scheduler the Redis commands per request (``INFO commandstats`` delta over the run,
background included) and the background alone (commands per second with nothing running).

Run (numbers in benchmarks/RESULTS.md): ``.venv/bin/python -m benchmarks.pd_scheduler``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import tempfile
import time
from itertools import cycle
from pathlib import Path
from typing import Any

import aiohttp
import redis

from benchmarks.global_scheduler import commands
from benchmarks.pd_grid import ENGINE_FLAGS, PROFILE, PROMPTS, Run, fmt, log, one, prompt_of
from fdcore.testing import free_port
from fdcore.testing.cluster import EngineFactory, RouterFactory

CELLS = (("short", 64, 8.0), ("2k", 64, 2.0), ("2k", 64, 4.0))
ROLES = ("prefill", "prefill", "decode", "decode")


def pd_flags(role: str) -> list[str]:
    return [*ENGINE_FLAGS, "--splitwise-role", role, "--pd-comm-port", str(free_port()),
            "--cache-transfer-protocol", "ipc"]


async def drive(urls: list[str], prompt: str, out: int, rate: float, n: int, seed: int,
                mode: str) -> Run:
    rng = random.Random(seed)
    run = Run(mode, f"{prompt}/{out}", rate)
    targets = cycle(urls)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        tasks = []
        for _ in range(n):
            tasks.append(asyncio.ensure_future(
                one(session, next(targets), prompt_of(PROMPTS[prompt], rng), out)))
            await asyncio.sleep(rng.expovariate(rate))
        run.samples = list(await asyncio.gather(*tasks))
    return run


async def router_mode(workdir: Path, n: int) -> list[Run]:
    (workdir / "r").mkdir(parents=True, exist_ok=True)
    routers, engines = RouterFactory(workdir / "r"), EngineFactory(workdir / "r")
    router = routers(server={"splitwise": True},
                     scheduler={"prefill-policy": "process_tokens", "decode-policy": "request_num"},
                     log={"level": "warning", "format": "json"})
    try:
        for role in ROLES:
            engines(1, router=router, flags=pd_flags(role), profile=PROFILE)
        await router.wait_healthy(4, timeout=120)
        return [await drive([router.url], p, o, r, n, i, "router")
                for i, (p, o, r) in enumerate(CELLS)]
    finally:
        routers.stop_all()
        engines.stop_all()


async def scheduler_mode(workdir: Path, n: int) -> tuple[list[Run], list[float], float]:
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL)
    (workdir / "s").mkdir(parents=True, exist_ok=True)
    engines = EngineFactory(workdir / "s")
    client = redis.Redis(port=port)
    try:
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        started = [engines(1, profile=PROFILE, flags=[
            *pd_flags(role), "--scheduler-name", "splitwise", "--scheduler-port", str(port),
            "--scheduler-topic", "bench"])[0] for role in ROLES]
        while client.hlen("bench.cluster") < len(ROLES):
            await asyncio.sleep(0.1)
        before, at = commands(client), time.monotonic()
        await asyncio.sleep(5.0)
        idle = (commands(client) - before) / (time.monotonic() - at)
        runs, per_request = [], []
        for i, (p, o, r) in enumerate(CELLS):
            before = commands(client)
            runs.append(await drive([h.url for h in started], p, o, r, n, i, "scheduler"))
            per_request.append((commands(client) - before) / n)
        return runs, per_request, idle
    finally:
        engines.stop_all()
        client.close()
        server.kill()
        server.wait()


def pct(run: Run, name: str, q: float) -> str:
    return fmt(run.pct(name, q))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32, help="requests per point")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        routed = await router_mode(Path(tmp), args.requests)
        log("router mode done")
        scheduled, per_request, idle = await scheduler_mode(Path(tmp), args.requests)
    print("| cell | rate (req/s) | mode | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | failed | "
          "Redis commands per request |")
    print("|---|---|---|---|---|---|---|")
    rows: list[tuple[Run, Any]] = [(r, "-") for r in routed]
    rows += [(r, f"{c:.0f}") for r, c in zip(scheduled, per_request, strict=True)]
    for run, cmds in sorted(rows, key=lambda rc: (CELLS.index(
            next(c for c in CELLS if f"{c[0]}/{c[1]}" == rc[0].cell and c[2] == rc[0].rate)),
            rc[0].mode)):
        failed = sum(not s.ok for s in run.samples)
        print(f"| {run.cell} | {run.rate:g} | {run.mode} | {pct(run, 'ttft', .5)} / "
              f"{pct(run, 'ttft', .99)} | {pct(run, 'tpot', .5)} / {pct(run, 'tpot', .99)} | "
              f"{failed} | {cmds} |")
    print(f"\nBackground with nothing running: {idle:.0f} Redis commands per second "
          f"({len(ROLES)} instances).")


if __name__ == "__main__":
    asyncio.run(main())
