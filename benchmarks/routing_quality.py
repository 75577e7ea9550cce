"""Routing quality: prefix-cache hit rate, load spread and TTFT per routing policy.

Replays multi-turn chat sessions through a router in front of instances that keep a prefix
cache and compares:

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

Instances (``--instance-kind``, see ``routing_instances.py``): ``model`` (default) runs
``prefix_cache_server.py``, test servers whose prefix cache (LRU over 32-character blocks) and
timing model an engine's; ``sim`` runs ``fdcore engine --model sim`` processes, the real engine
(scheduler, continuous batcher, block manager, prefix cache over full blocks of its byte-level
tokens) with a model runner that sleeps ``--sim-prefill-us`` per uncached prompt token and
``--sim-step-ms`` per step. The sim engines are restarted for every target, so each starts
cold; their profile YAML and logs go to ``benchmarks/out/routing_quality/``.

``--variant POLICY JSON`` adds an fdcore target with its own scheduler options (e.g.
``--variant cache_aware '{"load-factor": 0}'``); ``--repeat N`` runs every target N times,
interleaved, and reports the median and range of each figure.

Run: ``.venv/bin/python benchmarks/routing_quality.py`` (about a minute per repeat with six
targets, either kind). Every process it starts is stopped when it ends, also on an error,
Ctrl-C or SIGTERM. Writes ``benchmarks/out/routing_quality.json`` (or ``--output``) with every
run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
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
from routing_instances import MODEL, Instances, ModelInstances, SimInstances, SimSettings

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


WORKLOAD_HELP = {
    "groups": "system prompts",
    "sessions": "chat sessions, spread over the groups",
    "turns": "requests per session",
    "system_chars": "characters per system prompt",
    "user_chars": "characters per user message",
    "reply_chars": "characters per assistant reply in the history",
    "concurrency": "sessions in flight at once",
    "seed": "random seed of texts and session order",
    "hot_group_share": "share of sessions on group 0's system prompt (skewed mix)",
}


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
    instance_stats: list[dict[str, float]] = field(default_factory=list)


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
                    "model": MODEL,
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
    """Send the workload; return per-request records, the error count and the wall time.

    TTFT is the time to the first chunk that carries generated text (an engine may send an
    empty role-only chunk first); the token counts come from the final usage chunk.
    """
    records: list[dict[str, Any]] = []
    errors = 0
    gate = asyncio.Semaphore(w.concurrency)
    timeout = aiohttp.ClientTimeout(total=120)

    async def one(http: aiohttp.ClientSession, body: dict[str, Any]) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        ttft = None
        usage = None
        async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                await resp.read()
                return None
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if ttft is None and any(generated(c) for c in chunk.get("choices") or []):
                    ttft = time.perf_counter() - t0
                usage = chunk.get("usage") or usage
        if ttft is None or usage is None:
            return None
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return {"ttft": ttft, "prompt": usage["prompt_tokens"], "cached": cached}

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


def generated(choice: dict[str, Any]) -> bool:
    """Whether a streamed choice carries generated text (chat delta or completion text)."""
    delta = choice.get("delta") or {}
    return bool(delta.get("content") or choice.get("text"))


def summarize(
    target: str,
    launch: str,
    records: list[dict[str, Any]],
    errors: int,
    wall: float,
    per: list[int],
) -> Outcome:
    """Hit rate, TTFT percentiles and the per-instance request counts of one run."""
    ttfts = sorted(r["ttft"] * 1e3 for r in records)
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
        "model": MODEL,
        "max_tokens": 1,
        "messages": [{"role": "user", "content": "ping"}],
    }

    def answers() -> bool:
        return http_request(f"{url}/v1/chat/completions", probe, timeout=5)[0] == 200

    wait_until(answers, f"{proc.name} routes a request", 90, proc, 0.25)


def run_target(target: Target, instances: Instances, args: argparse.Namespace) -> Outcome:
    """Fresh instances, then start the target's router, replay the workload through it, stop it.

    Every figure counts the replayed requests only: the per-instance counts are the
    difference of the instances' own counters across the replay.
    """
    ports = instances.fresh()
    port = free_port()
    run_dir = instances.run_dir
    if target.policy:
        proc = fdcore_router(target, ports, port, run_dir)
    else:
        proc = sglang_router(args.peers_venv, ports, port, run_dir)
    url = f"http://127.0.0.1:{port}"
    proc.start()
    try:
        wait_ready(proc, url)
        before = instances.served()
        records, errors, wall = asyncio.run(replay(url, args.workload))
        after = instances.served()
        stats = instances.stats()
    except Exception:
        print(proc.log_tail(), instances.log_tail(), sep="\n", file=sys.stderr)
        raise
    finally:
        proc.stop()
    per = [a - b for a, b in zip(after, before, strict=True)]
    outcome = summarize(target.label, " ".join(proc.argv), records, errors, wall, per)
    outcome.instance_stats = stats
    return outcome


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


def stop_on_sigterm() -> None:
    """Turn SIGTERM and SIGHUP into SystemExit, so the ``finally`` blocks stop every process."""

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGHUP, leave)


def make_instances(args: argparse.Namespace, run_dir: Path) -> Instances:
    """The ``--instance-kind`` instances (the ``model`` servers start at once)."""
    if args.instance_kind == "model":
        return ModelInstances(args.instances, run_dir, args.capacity_blocks)
    binary = fdcore_bin()
    if binary is None:
        raise RuntimeError("fdcore console script not found")
    settings = SimSettings(
        prefill_seconds_per_token=args.sim_prefill_us / 1e6,
        decode_seconds_per_step=args.sim_step_ms / 1e3,
        decode_seconds_per_seq=args.sim_seq_ms / 1e3,
        block_size=args.sim_block_size,
        num_gpu_blocks=args.sim_num_gpu_blocks,
        max_num_seqs=args.sim_max_num_seqs,
    )
    return SimInstances(args.instances, run_dir, binary, settings)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; ``args.workload`` holds the Workload."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--instances", type=int, default=4, help="number of instances")
    parser.add_argument(
        "--instance-kind",
        choices=("model", "sim"),
        default="model",
        help="model: prefix_cache_server.py test servers; sim: fdcore engine --model sim",
    )
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
    parser.add_argument(
        "--peers-venv", type=Path, default=HERE / ".venv-peers", help="sglang-router's venv"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="run every target this many times, interleaved"
    )
    model = parser.add_argument_group("--instance-kind model")
    model.add_argument(
        "--capacity-blocks",
        type=int,
        default=2000,
        help="prefix cache per instance, in 32-character blocks",
    )
    sim = parser.add_argument_group("--instance-kind sim (engine flags and sim profile)")
    d = SimSettings()
    sim.add_argument(
        "--sim-prefill-us",
        type=float,
        default=d.prefill_seconds_per_token * 1e6,
        help="microseconds per prefilled (uncached) prompt token",
    )
    sim.add_argument(
        "--sim-step-ms",
        type=float,
        default=d.decode_seconds_per_step * 1e3,
        help="milliseconds per engine step",
    )
    sim.add_argument(
        "--sim-seq-ms",
        type=float,
        default=d.decode_seconds_per_seq * 1e3,
        help="milliseconds per decoding sequence in a step",
    )
    sim.add_argument(
        "--sim-block-size", type=int, default=d.block_size, help="tokens per KV-cache block"
    )
    sim.add_argument(
        "--sim-num-gpu-blocks",
        type=int,
        default=d.num_gpu_blocks,
        help="KV-cache blocks per engine (running sequences and prefix cache together)",
    )
    sim.add_argument(
        "--sim-max-num-seqs", type=int, default=d.max_num_seqs, help="batch size limit"
    )
    workload = parser.add_argument_group("workload")
    for f in fields(Workload):
        workload.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(f.default),
            default=f.default,
            help=WORKLOAD_HELP[f.name],
        )
    parser.add_argument(
        "--output", type=Path, default=OUT / "routing_quality.json", help="JSON report path"
    )
    args = parser.parse_args(argv)
    args.workload = Workload(**{f.name: getattr(args, f.name) for f in fields(Workload)})
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run every target on the same instances ``--repeat`` times and print the tables."""
    args = parse_args(argv)
    stop_on_sigterm()
    targets = parse_targets(args)
    run_dir = OUT / "routing_quality"
    run_dir.mkdir(parents=True, exist_ok=True)
    runs: list[list[Outcome]] = []
    with make_instances(args, run_dir) as instances:
        # Interleaved (all targets, then all again) so slow spells of a shared machine
        # fall on every target alike.
        for _ in range(args.repeat):
            runs.append([])
            for target in targets:
                runs[-1].append(run_target(target, instances, args))
                print(table(runs[-1][-1:]).splitlines()[-1], flush=True)
        described = instances.describe()
    report = {
        "workload": asdict(args.workload),
        "instances": described,
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
