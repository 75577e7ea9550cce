"""Routing quality: prefix-cache hit rate, load spread and TTFT per routing policy.

Replays multi-turn chat sessions through a router in front of simulated instances that keep a
real prefix cache (``prefix_cache_server.py``) and compares:

* fdcore (``fdcore serve``, FastDeploy config.yaml + register.yaml) with ``scheduler.policy``
  set to each of ``--policies`` (default round_robin, request_num, cache_aware) and each
  ``--variant``;
* sglang-router 0.3.2's ``cache_aware`` with its defaults (from ``benchmarks/.venv-peers``,
  made by ``benchmarks/setup_peers.sh``).

Workload: ``--groups`` system prompts, each shared by ``--sessions / --groups`` chat sessions;
each session sends ``--turns`` requests, the history growing by one user message and one
assistant reply per turn. ``--concurrency`` sessions run at once, their turns in order,
sessions started in a seeded random order. Every request streams; TTFT is measured at the
client (first content chunk), hit rate is ``sum(cached_tokens) / sum(prompt_tokens)`` from
the usage the instances report, and spread is the requests each instance served.

``--variant POLICY JSON`` adds an fdcore target with its own scheduler options (e.g.
``--variant cache_aware '{"load-factor": 0}'``); ``--repeat N`` runs every target N times,
interleaved, and reports the median and range of each figure.

Run: ``.venv/bin/python benchmarks/routing_quality.py`` (about a minute per repeat). Writes
``benchmarks/out/routing_quality.json`` (or ``--output``) with every run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import aiohttp
from benchlib import ManagedProcess, free_port, http_request, wait_until
from router_overhead import NO_EGRESS_ENV, fdcore_bin

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
# fmt: off
WORDS = [
    "the", "a", "customer", "order", "refund", "policy", "shipping", "delay", "account",
    "password", "reset", "invoice", "warranty", "return", "label", "support", "ticket",
    "priority", "escalate", "agent", "tone", "polite", "concise", "answer", "product",
    "battery", "screen", "laptop", "phone", "charger", "cable", "store", "hours", "discount",
]
# fmt: on


@dataclass(frozen=True)
class Workload:
    """Shape of the replayed traffic."""

    groups: int = 4
    sessions: int = 64
    turns: int = 8
    system_chars: int = 3000
    user_chars: int = 300
    reply_chars: int = 300
    concurrency: int = 16
    seed: int = 0
    hot_group_share: float = 0.0


WORKLOAD_HELP = {"hot_group_share": "share of sessions on group 0's system prompt (skewed mix)"}


@dataclass
class Outcome:
    """One target's measurements."""

    target: str
    launch: str
    requests: int = 0
    errors: int = 0
    hit_rate: float = 0.0
    ttft_p50_ms: float = 0.0
    ttft_p99_ms: float = 0.0
    per_instance: list[int] = field(default_factory=list)
    wall_s: float = 0.0


@dataclass(frozen=True)
class Target:
    """One router configuration: an fdcore policy with options, or sglang-router (policy "")."""

    policy: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The row name in the tables."""
        if not self.policy:
            return "sglang-router 0.3.2 cache_aware"
        opts = ", ".join(f"{k}: {v}" for k, v in self.options.items())
        return f"fdcore {self.policy}" + (f" ({opts})" if opts else "")

    @property
    def slug(self) -> str:
        """The label as a file-name part."""
        return "".join(c if c.isalnum() else "-" for c in self.label).strip("-")


def text(rng: random.Random, chars: int) -> str:
    """Pseudo-English of about ``chars`` characters."""
    words: list[str] = []
    length = 0
    while length < chars:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:chars]


def sessions(w: Workload) -> list[list[dict[str, Any]]]:
    """Each session as its list of request bodies, turn by turn."""
    rng = random.Random(w.seed)
    systems = [f"[group {g}] " + text(rng, w.system_chars) for g in range(w.groups)]
    out = []
    for s in range(w.sessions):
        group = 0 if rng.random() < w.hot_group_share else s % w.groups
        history: list[dict[str, str]] = [{"role": "system", "content": systems[group]}]
        bodies = []
        for turn in range(w.turns):
            user = f"[s{s} t{turn}] " + text(rng, w.user_chars)
            history.append({"role": "user", "content": user})
            bodies.append(
                {
                    "model": "prefix-cache-sim",
                    "messages": list(history),
                    "max_tokens": 8,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
            )
            history.append({"role": "assistant", "content": text(rng, w.reply_chars)})
        out.append(bodies)
    rng.shuffle(out)
    return out


async def replay(url: str, w: Workload) -> tuple[list[dict[str, Any]], int, float]:
    """Send the workload; return per-request records, the error count and the wall time."""
    records: list[dict[str, Any]] = []
    errors = 0
    gate = asyncio.Semaphore(w.concurrency)
    timeout = aiohttp.ClientTimeout(total=120)

    async def one(http: aiohttp.ClientSession, body: dict[str, Any]) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        ttft = None
        usage = instance = None
        async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                await resp.read()
                return None
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if ttft is None and chunk.get("choices"):
                    ttft = time.perf_counter() - t0
                usage = chunk.get("usage") or usage
                instance = chunk.get("system_fingerprint") or instance
        if ttft is None or usage is None:
            return None
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return {
            "ttft": ttft,
            "prompt": usage["prompt_tokens"],
            "cached": cached,
            "instance": instance,
        }

    async def session(http: aiohttp.ClientSession, bodies: list[dict[str, Any]]) -> None:
        nonlocal errors
        async with gate:
            for body in bodies:
                try:
                    record = await one(http, body)
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    record = None
                if record is None:
                    errors += 1
                else:
                    records.append(record)

    start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout) as http:
        await asyncio.gather(*(session(http, b) for b in sessions(w)))
    return records, errors, time.perf_counter() - start


def summarize(
    target: str,
    launch: str,
    records: list[dict[str, Any]],
    errors: int,
    wall: float,
    ports: Sequence[int],
) -> Outcome:
    """Hit rate, TTFT percentiles and per-instance counts of one run."""
    ttfts = sorted(r["ttft"] * 1e3 for r in records)
    per = [sum(1 for r in records if r["instance"] == str(p)) for p in ports]
    prompt = sum(r["prompt"] for r in records)
    return Outcome(
        target,
        launch,
        len(records),
        errors,
        sum(r["cached"] for r in records) / prompt if prompt else 0.0,
        statistics.median(ttfts) if ttfts else 0.0,
        ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else 0.0,
        per,
        wall,
    )


def fdcore_router(target: Target, ports: Sequence[int], port: int, run_dir: Path) -> ManagedProcess:
    """``fdcore serve`` with the target's policy and options, register.yaml of the instances."""
    binary = fdcore_bin()
    if binary is None:
        raise RuntimeError("fdcore console script not found")
    register = run_dir / "register.yaml"
    register.write_text(
        "instances:\n"
        + "".join(
            f"  - {{role: mixed, host_ip: 127.0.0.1, port: {p}, metrics_port: {p}}}\n"
            for p in ports
        )
    )
    slug = target.slug
    cfg = run_dir / f"cfg-{slug}.yaml"
    extra = "".join(f"  {k}: {v}\n" for k, v in target.options.items())
    cfg.write_text(
        f"scheduler:\n  policy: {target.policy}\n{extra}"
        f"manager:\n  health-check-interval-secs: 1\n  register-path: {register}\n"
        "log:\n  level: warning\n"
    )
    argv = [binary, "serve", "--config", str(cfg), "--port", str(port), "--host", "127.0.0.1"]
    return ManagedProcess(f"fdcore-{slug}", argv, run_dir / f"fdcore-{slug}.log")


def sglang_router(venv: Path, ports: Sequence[int], port: int, run_dir: Path) -> ManagedProcess:
    """sglang-router's ``cache_aware`` with its default thresholds."""
    argv = [str(venv / "bin" / "python"), "-m", "sglang_router.launch_router"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--policy", "cache_aware"]
    argv += ["--worker-urls", *[f"http://127.0.0.1:{p}" for p in ports], "--log-level", "warn"]
    argv += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    return ManagedProcess("sglang-router", argv, run_dir / "sglang-router.log", env=NO_EGRESS_ENV)


def wait_ready(proc: ManagedProcess, url: str) -> None:
    """Wait until a short chat request goes through the router."""
    probe = {
        "model": "prefix-cache-sim",
        "max_tokens": 1,
        "messages": [{"role": "user", "content": "ping"}],
    }

    def answers() -> bool:
        return http_request(f"{url}/v1/chat/completions", probe, timeout=5)[0] == 200

    wait_until(answers, f"{proc.name} routes a request", 90, proc, 0.25)


def reset(ports: Sequence[int]) -> None:
    """Empty every instance's cache and counters."""
    for p in ports:
        status, _ = http_request(f"http://127.0.0.1:{p}/reset", {}, timeout=5)
        if status != 200:
            raise RuntimeError(f"instance {p} did not reset (HTTP {status})")


def run_target(
    name: str, proc: ManagedProcess, port: int, ports: Sequence[int], w: Workload
) -> Outcome:
    """Start a router, replay the workload through it, stop it."""
    url = f"http://127.0.0.1:{port}"
    proc.start()
    try:
        wait_ready(proc, url)
        reset(ports)
        records, errors, wall = asyncio.run(replay(url, w))
    except Exception:
        print(proc.log_tail(), file=sys.stderr)
        raise
    finally:
        proc.stop()
    return summarize(name, " ".join(proc.argv), records, errors, wall, ports)


def table(outcomes: Sequence[Outcome]) -> str:
    """One run's results as a Markdown table."""
    rows = [
        "| router / policy | hit rate | TTFT p50 ms | TTFT p99 ms | requests per instance "
        "| errors |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        rows.append(
            f"| {o.target} | {o.hit_rate:.1%} | {o.ttft_p50_ms:.1f} | {o.ttft_p99_ms:.1f} "
            f"| {' / '.join(map(str, o.per_instance))} | {o.errors} |"
        )
    return "\n".join(rows)


def spread(values: Sequence[float], fmt: str) -> str:
    """Median and range of one figure over the repeats: ``median [min-max]``."""
    lo, mid, hi = (format(v, fmt) for v in (min(values), statistics.median(values), max(values)))
    return mid if len(values) == 1 else f"{mid} [{lo}-{hi}]"


def summary_table(runs: Sequence[Sequence[Outcome]]) -> str:
    """Median [range] of every figure per target over the repeats (runs[repeat][target])."""
    rows = [
        f"| router / policy ({len(runs)} runs) | hit rate % | TTFT p50 ms | TTFT p99 ms "
        "| busiest instance (requests) | errors |",
        "|---|---|---|---|---|---|",
    ]
    for per_target in zip(*runs, strict=True):
        rows.append(
            f"| {per_target[0].target} "
            f"| {spread([o.hit_rate * 100 for o in per_target], '.1f')} "
            f"| {spread([o.ttft_p50_ms for o in per_target], '.0f')} "
            f"| {spread([o.ttft_p99_ms for o in per_target], '.0f')} "
            f"| {spread([max(o.per_instance) for o in per_target], '.0f')} "
            f"| {sum(o.errors for o in per_target)} |"
        )
    return "\n".join(rows)


def parse_targets(args: argparse.Namespace) -> list[Target]:
    """fdcore policies, then variants, then sglang-router; ``--fdcore-options`` under each."""
    common = json.loads(args.fdcore_options)
    targets = [Target(p, dict(common)) for p in args.policies.split(",") if p]
    for policy, options in args.variant or []:
        targets.append(Target(policy, {**common, **json.loads(options)}))
    if not args.no_sglang:
        targets.append(Target(""))
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    """Run every target on the same instances ``--repeat`` times and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument(
        "--policies",
        default="round_robin,request_num,cache_aware",
        help="fdcore policies, comma-separated",
    )
    parser.add_argument(
        "--fdcore-options", default="{}", help="JSON object of extra scheduler options for fdcore"
    )
    parser.add_argument(
        "--variant",
        nargs=2,
        action="append",
        metavar=("POLICY", "JSON"),
        help="one more fdcore target: a policy with these scheduler options (repeatable)",
    )
    parser.add_argument("--no-sglang", action="store_true", help="skip sglang-router")
    parser.add_argument("--peers-venv", type=Path, default=HERE / ".venv-peers")
    parser.add_argument(
        "--repeat", type=int, default=1, help="run every target this many times, interleaved"
    )
    parser.add_argument(
        "--capacity-blocks",
        type=int,
        default=2000,
        help="prefix cache per instance, in 32-character blocks",
    )
    for f in fields(Workload):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
            help=WORKLOAD_HELP.get(f.name),
        )
    parser.add_argument(
        "--output", type=Path, default=OUT / "routing_quality.json", help="JSON report path"
    )
    args = parser.parse_args(argv)
    w = Workload(**{f.name: getattr(args, f.name) for f in fields(Workload)})
    targets = parse_targets(args)
    run_dir = OUT / "routing_quality"
    run_dir.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in range(args.instances)]
    server_argv = [sys.executable, str(HERE / "prefix_cache_server.py")]
    server_argv += ["--ports", ",".join(map(str, ports))]
    server_argv += ["--capacity-blocks", str(args.capacity_blocks)]
    server = ManagedProcess("instances", server_argv, run_dir / "instances.log").start()
    runs: list[list[Outcome]] = []
    try:
        wait_until(
            lambda: all(http_request(f"http://127.0.0.1:{p}/health")[0] == 200 for p in ports),
            "instances answer /health",
            30,
            server,
        )
        # Interleaved (all targets, then all again) so slow spells of a shared machine
        # fall on every target alike.
        for _ in range(args.repeat):
            runs.append([])
            for target in targets:
                port = free_port()
                if target.policy:
                    proc = fdcore_router(target, ports, port, run_dir)
                else:
                    proc = sglang_router(args.peers_venv, ports, port, run_dir)
                runs[-1].append(run_target(target.label, proc, port, ports, w))
                print(table(runs[-1][-1:]).splitlines()[-1], flush=True)
    finally:
        server.stop()
    report = {
        "workload": asdict(w),
        "instances": args.instances,
        "capacity_blocks": args.capacity_blocks,
        "command": " ".join(["benchmarks/routing_quality.py", *(argv or sys.argv[1:])]),
        "targets": [asdict(t) | {"label": t.label} for t in targets],
        "runs": [[asdict(o) for o in run] for run in runs],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(summary_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
