"""``global`` vs ``local`` scheduler on N sim engines: TTFT, makespan, Redis round-trips.

Each run starts its own redis-server and N ``fdcore engine --model sim`` processes (small
batches, so queues build), fires a burst of streamed completions at them and stops them all.
Workloads: ``uniform`` (same sizes, round-robin), ``heavy-rr`` (prompt and output lengths
spanning 100x, round-robin), ``heavy-skew`` (the same mix, 60% of it sent to one instance).
Then, at low load (one request at a time), the Redis commands ``global`` adds per request,
from ``INFO commandstats`` deltas.

    .venv/bin/python benchmarks/global_scheduler.py [--sizes 4,8] [--per-engine 12]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import redis

from benchmarks.benchlib import ManagedProcess, free_port, http_request, wait_until

PROFILE = {"prefill-seconds-per-token": 0.0001, "decode-seconds-per-step": 0.01,
           "decode-seconds-per-seq": 0.002}
ENGINE_FLAGS = ["--max-num-seqs", "4", "--block-size", "16", "--num-gpu-blocks", "4096"]


def workload(kind: str, n_engines: int, count: int, seed: int = 7) -> list[tuple[int, int, int]]:
    """``(engine index, prompt words, output tokens)`` per request."""
    rng = random.Random(seed)

    def heavy(low: int, high: int) -> int:  # Pareto tail clipped to [low, high]: 100x range
        return min(high, int(low * rng.paretovariate(1.1)))

    jobs = []
    for i in range(count):
        if kind == "uniform":
            jobs.append((i % n_engines, 40, 40))
            continue
        target = 0 if kind == "heavy-skew" and rng.random() < 0.6 else i % n_engines
        jobs.append((target, heavy(4, 400), heavy(4, 400)))
    return jobs


async def one(session: aiohttp.ClientSession, url: str, words: int, tokens: int,
              started: float) -> tuple[float, float]:
    """Stream one completion; return (TTFT, finish time) relative to ``started``."""
    body = {"prompt": "w " * words, "max_tokens": tokens, "stream": True, "temperature": 0}
    first = 0.0
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if not first and line.startswith(b"data: {"):
                first = time.monotonic() - started
    return first, time.monotonic() - started


async def burst(urls: list[str], jobs: list[tuple[int, int, int]]) -> dict[str, float]:
    """Fire every job at once; TTFT percentiles and makespan in seconds."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.monotonic()
        done = await asyncio.gather(*(one(session, urls[e], w, t, started) for e, w, t in jobs))
    ttfts = sorted(t for t, _ in done)
    return {"ttft_p50": statistics.median(ttfts),
            "ttft_p99": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))],
            "makespan": max(end for _, end in done)}


def commands(client: redis.Redis) -> int:
    """Commands Redis has executed (all kinds, scripts counted once per call)."""
    stats: dict[str, Any] = client.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_info",))


class Cluster:
    """redis-server plus N engines on one scheduler; a context manager that stops them all."""

    def __init__(self, scheduler: str, n: int, workdir: Path) -> None:
        self.redis_port = free_port()
        self.procs: list[ManagedProcess] = []
        self.urls: list[str] = []
        profile = workdir / "profile.yaml"
        profile.write_text("".join(f"{k}: {v}\n" for k, v in PROFILE.items()))
        self.procs.append(ManagedProcess("redis", ["redis-server", "--port", str(self.redis_port),
                          "--save", "", "--appendonly", "no"], workdir / "redis.log"))
        for i in range(n):
            port = free_port()
            flags = ["--scheduler-name", scheduler]
            if scheduler == "global":
                flags += ["--scheduler-port", str(self.redis_port)]
            self.procs.append(ManagedProcess(f"engine{i}", [
                sys.executable, "-m", "fdcore.engine", "--model", "sim", "--sim-profile",
                str(profile), "--host", "127.0.0.1", "--port", str(port), *ENGINE_FLAGS, *flags,
            ], workdir / f"{scheduler}-{n}-engine{i}.log"))
            self.urls.append(f"http://127.0.0.1:{port}")

    def __enter__(self) -> Cluster:
        self.procs[0].start()
        wait_until(lambda: self.redis().ping(), "redis", 10)
        for proc in self.procs[1:]:
            proc.start()
        for url, proc in zip(self.urls, self.procs[1:], strict=True):
            wait_until(lambda u=url: http_request(u + "/health")[0] == 200, url, 120, proc)
        return self

    def redis(self) -> redis.Redis:
        """A client of this cluster's Redis."""
        return redis.Redis(port=self.redis_port, socket_connect_timeout=1)

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            proc.stop()


async def low_load(cluster: Cluster, requests: int = 20) -> float:
    """Redis commands per request with one request in flight at a time."""
    client = cluster.redis()
    before = commands(client)
    async with aiohttp.ClientSession() as session:
        for i in range(requests):
            await one(session, cluster.urls[i % len(cluster.urls)], 40, 16, time.monotonic())
    return (commands(client) - before) / requests


def main() -> None:
    """Run every size, scheduler and workload; print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4,8", help="engine counts, comma-separated")
    parser.add_argument("--per-engine", type=int, default=12, help="requests per engine")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="fdcore-bench-global-"))
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        for scheduler in ("local", "global"):
            with Cluster(scheduler, n, workdir) as cluster:
                for kind in ("uniform", "heavy-rr", "heavy-skew"):
                    jobs = workload(kind, n, n * args.per_engine)
                    result = asyncio.run(burst(cluster.urls, jobs))
                    rows.append((n, kind, scheduler, result))
                    print(n, kind, scheduler, result, flush=True)
                if scheduler == "global":
                    per_request = asyncio.run(low_load(cluster))
                    print(f"N={n}: Redis commands per request at low load: {per_request:.1f}")
    print("\n| N | workload | scheduler | TTFT p50 s | TTFT p99 s | makespan s |")
    print("|---|---|---|---|---|---|")
    for n, kind, scheduler, r in rows:
        print(f"| {n} | {kind} | {scheduler} | {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} "
              f"| {r['makespan']:.2f} |")
    print(f"\nlogs: {workdir}")


if __name__ == "__main__":
    main()
