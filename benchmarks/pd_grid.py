"""Prefill/decode disaggregation against mixed serving on sim engines, through the router.

Three set-ups with the same four sim engines' worth of capacity, each behind `fdcore serve`:

* ``mixed``: 4 mixed engines, `request_num` policy;
* ``pd``: 2 prefill + 2 decode engines, splitwise (`process_tokens` / `request_num`), KV over ipc;
* ``cond``: as ``pd``, with conditional disaggregation (``scheduler.pd-min-prompt-tokens``,
  prompts under it go to a decode engine alone).

Over a grid of prompt lengths (short ~100 tokens, 2k, 8k; the sim tokenizer is byte level, so
N ASCII characters are N tokens) and output lengths (32, 256, ``ignore_eos``), at three Poisson
request rates per cell, every request streamed: TTFT and TPOT p50/p99 and goodput (the highest
tested rate at which at least 90% of requests meet both SLOs, see ``SLO``). For PD the TTFT is
broken down per request from the engines' debug log events (wall clock, one host) and
reported as the p50 of each part: router + P's queue (sent -> P admitted it), P's prefill
(-> its first token), the transfer (-> D adopted the KV: the write, the ``done`` frame and D's
bookkeeping), the hop (-> the client has the first token: D's emit and the router's relay),
and, overlapping those, when D had reserved its blocks (sent -> ``cache_sync``).

The sim's cost model (``SimRunner._cost``) sleeps, per step, ``decode-seconds-per-step +
prefill tokens x prefill-seconds-per-token + decoding sequences x decode-seconds-per-seq``;
every sequence in the step waits for the whole step, so a step that carries prefill tokens
delays every decoding sequence in it: prefill interference, which PD removes from D.

Run (numbers in benchmarks/RESULTS.md): ``.venv/bin/python benchmarks/pd_grid.py``
(``--quick`` for a one-rate smoke run, ``--cells 8k/256,short/32`` for a subset).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from fdcore.testing import free_port
from fdcore.testing.cluster import EngineFactory, EngineHandle, Router, RouterFactory

PROFILE = {"prefill-seconds-per-token": 0.0001, "decode-seconds-per-step": 0.01,
           "decode-seconds-per-seq": 0.0005}
ENGINE_FLAGS = ["--max-model-len", "16384", "--num-gpu-blocks", "4096",
                "--max-num-batched-tokens", "2048", "--max-num-seqs", "32"]
PROMPTS = {"short": 100, "2k": 2000, "8k": 8000}
OUTPUTS = (32, 256)
RATES = {"short": (4.0, 8.0, 16.0), "2k": (2.0, 4.0, 8.0), "8k": (0.75, 1.5, 3.0)}
# TTFT objective per prompt length (seconds); TPOT objective (seconds per token) for all.
SLO_TTFT = {"short": 0.5, "2k": 1.0, "8k": 2.5}
SLO_TPOT = 0.03
MIN_PROMPT_TOKENS = 1000  # conditional disaggregation's threshold (Dynamo's rule)
ROLES: dict[str, str] = {}  # engine url -> its role


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


@dataclass
class Sample:
    ttft: float = 0.0
    tpot: float = 0.0
    ok: bool = False
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive tokens
    rid: str = ""
    sent_at: float = 0.0  # wall clock, to line up with the engines' log events


@dataclass
class Run:
    mode: str
    cell: str
    rate: float
    samples: list[Sample] = field(default_factory=list)
    breakdown: dict[str, float] = field(default_factory=dict)

    def pct(self, name: str, q: float) -> float:
        values = sorted(getattr(s, name) for s in self.samples if s.ok)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(q * len(values)))]

    def itl(self, q: float) -> float:
        """Inter-token latency over every token of every request (where a stalled step shows)."""
        gaps = sorted(g for s in self.samples if s.ok for g in s.gaps)
        return gaps[min(len(gaps) - 1, int(q * len(gaps)))] if gaps else float("nan")

    def good(self, prompt: str) -> float:
        met = [s for s in self.samples
               if s.ok and s.ttft <= SLO_TTFT[prompt] and s.tpot <= SLO_TPOT]
        return len(met) / max(1, len(self.samples))


async def one(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int,
              rid: str = "") -> Sample:
    rid = rid or uuid.uuid4().hex
    body = {"model": "sim", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "temperature": 0, "request_id": rid}
    sent_at = time.time()
    started = time.perf_counter()
    first = last = 0.0
    tokens = 0
    gaps: list[float] = []
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                return Sample()
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                event = orjson.loads(line[6:])
                if "error" in event:
                    return Sample()
                if event["choices"] and event["choices"][0].get("text"):
                    now = time.perf_counter()
                    if first:
                        gaps.append(now - last)
                    first = first or now
                    last = now
                    tokens += 1
    except aiohttp.ClientError:
        return Sample()
    if not tokens:
        return Sample()
    tpot = (last - first) / (tokens - 1) if tokens > 1 else 0.0
    return Sample(first - started, tpot, True, gaps, rid, sent_at)


def prompt_of(tokens: int, rng: random.Random) -> str:
    # A random head so no two prompts share a cached prefix.
    head = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(32))
    return (head + " the quick brown fox jumps over the lazy dog" * (tokens // 44 + 1))[:tokens]


async def run_cell(router: Router, engines: list[EngineHandle], mode: str, prompt: str,
                   out: int, rate: float, n: int, seed: int) -> Run:
    rng = random.Random(seed)
    run = Run(mode, f"{prompt}/{out}", rate)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        tasks = []
        for _ in range(n):
            tasks.append(asyncio.ensure_future(one(session, router.url,
                                                   prompt_of(PROMPTS[prompt], rng), out)))
            await asyncio.sleep(rng.expovariate(rate))
        run.samples = list(await asyncio.gather(*tasks))
    if mode != "mixed":
        run.breakdown = breakdown(run.samples, engine_events(engines))
    return run


PARTS = ("queue", "prefill", "transfer", "hop", "reserved")


def engine_events(engines: list[EngineHandle]) -> dict[str, dict[str, float]]:
    """``request_id -> {event: wall clock}`` of the hand-off's debug events, every engine."""
    found: dict[str, dict[str, float]] = {}
    for engine in engines:
        for line in engine.proc.output().splitlines():
            if '"pd.' not in line:
                continue
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if "at" in doc and "request_id" in doc:
                found.setdefault(doc["request_id"], {})[doc["event"]] = float(doc["at"])
    return found


def breakdown(samples: list[Sample], events: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per disaggregated request, its TTFT in parts (p50 of each over the run's requests):
    router + P's queue (sent -> P admitted it), P's prefill (-> first token sampled), the
    transfer (-> D adopted the KV: write, ``done`` frame, D's bookkeeping), the hop (-> the
    client has the first token: D's emit and the relay), and when D had reserved (sent ->
    ``cache_sync``, overlapping the others)."""
    parts: dict[str, list[float]] = {k: [] for k in PARTS}
    for s in samples:
        e = events.get(s.rid, {})
        need = ("pd.admitted", "pd.prefilled", "pd.adopted", "pd.reserved")
        if not s.ok or any(k not in e for k in need):
            continue
        first = s.sent_at + s.ttft
        parts["queue"].append(e["pd.admitted"] - s.sent_at)
        parts["prefill"].append(e["pd.prefilled"] - e["pd.admitted"])
        parts["transfer"].append(e["pd.adopted"] - e["pd.prefilled"])
        parts["hop"].append(first - e["pd.adopted"])
        parts["reserved"].append(e["pd.reserved"] - s.sent_at)
    return {k: statistics.median(v) if v else float("nan") for k, v in parts.items()}


async def setup(mode: str, workdir: Path) -> tuple[RouterFactory, EngineFactory, Router,
                                                   list[EngineHandle]]:
    routers = RouterFactory(workdir / mode)
    (workdir / mode).mkdir(parents=True, exist_ok=True)
    engines = EngineFactory(workdir / mode)
    scheduler: dict[str, Any] = {"policy": "request_num"}
    if mode != "mixed":
        scheduler = {"prefill-policy": "process_tokens", "decode-policy": "request_num"}
    if mode == "cond":
        scheduler.update({"pd-min-prompt-tokens": MIN_PROMPT_TOKENS, "pd-chars-per-token": 1})
    router = routers(server={"splitwise": mode != "mixed"}, scheduler=scheduler,
                     log={"level": "warning", "format": "json"})
    started: list[EngineHandle] = []
    roles = ["mixed"] * 4 if mode == "mixed" else ["prefill", "prefill", "decode", "decode"]
    for role in roles:
        flags = list(ENGINE_FLAGS)
        if role != "mixed":
            flags += ["--splitwise-role", role, "--pd-comm-port", str(free_port()),
                      "--cache-transfer-protocol", "ipc", "--log-format", "json",
                      "--log-level", "debug"]  # the hand-off's events time each request
        (handle,) = engines(1, router=router, flags=flags, profile=PROFILE)
        ROLES[handle.url] = role
        started.append(handle)
    await router.wait_healthy(4, timeout=120)
    return routers, engines, router, started


def fmt(x: float, scale: float = 1000.0) -> str:
    return "-" if x != x else f"{x * scale:.0f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one rate per cell, 8 requests")
    parser.add_argument("--cells", default="", help="e.g. 8k/256,short/32 (default: all)")
    parser.add_argument("--requests", type=int, default=24, help="requests per point")
    parser.add_argument("--modes", default="mixed,pd,cond")
    args = parser.parse_args()
    cells = [(p, o) for p in PROMPTS for o in OUTPUTS]
    if args.cells:
        wanted = set(args.cells.split(","))
        cells = [(p, o) for p, o in cells if f"{p}/{o}" in wanted]
    n = 8 if args.quick else args.requests
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            routers, engines, router, started = await setup(mode, Path(tmp))
            try:
                for prompt, out in cells:
                    rates = RATES[prompt][:1] if args.quick else RATES[prompt]
                    for index, rate in enumerate(rates):
                        run = await run_cell(router, started, mode, prompt, out, rate, n,
                                             seed=index * 1000 + out)
                        runs.append(run)
                        log(f"{mode:5} {prompt}/{out} rate {rate}: ttft p50 "
                            f"{fmt(run.pct('ttft', .5))} ms, tpot p50 "
                            f"{fmt(run.pct('tpot', .5))} ms, good {run.good(prompt):.0%}, "
                            f"failed {sum(not s.ok for s in run.samples)}")
            finally:
                routers.stop_all()
                engines.stop_all()
    report(runs, cells)


def report(runs: list[Run], cells: list[tuple[str, int]]) -> None:
    print("| cell | rate (req/s) | mode | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | "
          "ITL p99 (ms) | met SLO | PD TTFT p50 parts (ms): queue / prefill / transfer / hop / "
          "D reserved at |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        prompt = run.cell.split("/")[0]
        parts = " / ".join(fmt(run.breakdown[k]) for k in PARTS) \
            if run.breakdown else ""
        print(f"| {run.cell} | {run.rate:g} | {run.mode} | {fmt(run.pct('ttft', .5))} / "
              f"{fmt(run.pct('ttft', .99))} | {fmt(run.pct('tpot', .5))} / "
              f"{fmt(run.pct('tpot', .99))} | {fmt(run.itl(.99))} | {run.good(prompt):.0%} | "
              f"{parts} |")
    print()
    print("| cell | goodput mixed | goodput pd | goodput cond | TPOT p99 pd/mixed at top rate |")
    print("|---|---|---|---|---|")
    for prompt, out in cells:
        cell = f"{prompt}/{out}"
        good = {}
        for mode in ("mixed", "pd", "cond"):
            ok = [r.rate for r in runs if r.cell == cell and r.mode == mode
                  and r.good(prompt) >= 0.9]
            good[mode] = max(ok) if ok else 0.0
        top = {r.mode: r for r in runs if r.cell == cell}
        ratio = (top["pd"].pct("tpot", .99) / top["mixed"].pct("tpot", .99)
                 if "pd" in top and "mixed" in top else float("nan"))
        print(f"| {cell} | {good.get('mixed', 0):g} | {good.get('pd', 0):g} | "
              f"{good.get('cond', 0):g} | {ratio:.2f} |")


if __name__ == "__main__":
    asyncio.run(main())
