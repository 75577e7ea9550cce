"""Router overhead: fdcore's router against sglang-router and vllm-router on the same backends.

One run starts two fast local backends (``fast_backend.py``) and, in front of those same two
backends, every router under test (all round_robin), then measures for each target:

* latency at concurrency 1 (non-streaming ``POST /v1/chat/completions``): p50 and p99, and the
  router's *added* latency = routed percentile - direct-to-backend percentile of the same round;
* requests/s at concurrency 32 and 128 (closed loop: a fixed number of keep-alive connections);
* CPU time the router's processes spent per request at each concurrency.

Targets: ``direct`` (the backends themselves, no router), ``fdcore`` (``fdcore serve``),
``sglang-router`` and ``vllm-router`` (from ``benchmarks/.venv-peers``, made by
``benchmarks/setup_peers.sh``). All routers run at once, idle while another is measured; the
measurement order rotates each round and every figure is the median over rounds.

Load generator: ``wrk`` (one thread, ``wrk_chat.lua``) for every measurement, including the
concurrency-1 percentiles. Direct throughput runs one wrk per backend, connections split
between them; direct latency uses the first backend.

Everything (wrk, the backends, the routers) shares this machine's CPUs; the figures are for
comparing targets within one run, not absolute capacity. ``--client-cpus``/``--server-cpus``
pin the load generator and the servers with ``taskset``.

``--profile N`` samples fdcore with py-spy for N seconds under c=32 load after the rounds and
summarises the hot spots.

Output: a table on stdout, ``benchmarks/out/router_overhead.json`` and, with
``--update-results``, the "Router overhead" section of ``benchmarks/RESULTS.md``. Process logs
and the generated router configs are kept in ``benchmarks/out/router_overhead/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    ManagedProcess,
    WrkResult,
    free_port,
    http_request,
    run_wrk,
    wait_until,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WRK_SCRIPT = HERE / "wrk_chat.lua"
DEFAULT_OUT = HERE / "out" / "router_overhead.json"
RESULTS_MD = HERE / "RESULTS.md"
RESULTS_HEADING = "## Router overhead"
RESULTS_INTRO = "# fdcore benchmark results\n"

PIN_NONE = "none (the kernel schedules everything on all CPUs)"

PEERS = ("sglang-router", "vllm-router")
ALL_TARGETS = ("direct", "fdcore", *PEERS)
ROUTERS = ("fdcore", *PEERS)

PROBE = {
    "model": "fast-backend",
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 16,
    "stream": False,
}

# Peer routers are Rust programs that may reach for the Hugging Face Hub (sglang-router loads a
# tokenizer for any model_path a worker reports). Point every proxy at a closed local port and
# exempt loopback, so nothing they try leaves the machine; workers are on 127.0.0.1 anyway.
NO_EGRESS_ENV = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "ALL_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "all_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
    "HF_HUB_OFFLINE": "1",
}


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


@dataclass
class Target:
    """A measured endpoint: the backends themselves or a router in front of them."""

    name: str
    url: str = ""
    launch: str = ""  # the shell line that started it (routers)
    version: str = ""
    notes: list[str] = field(default_factory=list)
    proc: ManagedProcess | None = None
    error: str | None = None
    ready_s: float | None = None
    log_tail: str = ""  # the process's last output lines when it failed
    rounds: list[dict[str, WrkResult]] = field(default_factory=list)

    @property
    def measured(self) -> bool:
        """True when at least one full round was measured."""
        return bool(self.rounds)


# --------------------------------------------------------------------------- launching


def _peer_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _package_version(python: Path, dist: str) -> str:
    """The installed version of ``dist`` in the interpreter ``python``, or ``"?"``."""
    try:
        out = subprocess.run(
            [str(python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def sglang_argv(venv: Path, workers: Sequence[str], port: int, prom_port: int) -> list[str]:
    """``sglang-router`` command line: round_robin, quiet logs, its own Prometheus port."""
    return [
        str(_peer_python(venv)),
        *f"-m sglang_router.launch_router --host 127.0.0.1 --port {port}".split(),
        "--worker-urls",
        *workers,
        *["--policy", "round_robin", "--log-level", "warn", "--prometheus-host", "127.0.0.1"],
        *f"--prometheus-port {prom_port}".split(),
    ]


def vllm_argv(venv: Path, workers: Sequence[str], port: int, prom_port: int) -> list[str]:
    """``vllm-router`` command line: round_robin, quiet logs, its own Prometheus port."""
    return [
        str(venv / "bin" / "vllm-router"),
        *f"--host 127.0.0.1 --port {port}".split(),
        "--worker-urls",
        *workers,
        *["--policy", "round_robin", "--log-level", "warning", "--prometheus-host", "127.0.0.1"],
        *f"--prometheus-port {prom_port}".split(),
    ]


def write_fdcore_config(run_dir: Path, backend_ports: Sequence[int]) -> Path:
    """Write FastDeploy-format ``cfg.yaml`` and ``register.yaml``; return the config path."""
    register = run_dir / "register.yaml"
    lines = ["instances:"]
    for port in backend_ports:
        lines += ["  - role: mixed", "    host_ip: 127.0.0.1", f"    port: {port}"]
    register.write_text("\n".join(lines) + "\n")
    cfg = run_dir / "cfg.yaml"
    cfg.write_text(
        "scheduler:\n"
        "  policy: round_robin\n"
        "manager:\n"
        "  health-check-interval-secs: 5\n"
        f"  register-path: {register}\n"
        "log:\n"
        "  level: warning\n"
    )
    return cfg


def fdcore_bin() -> str | None:
    """The ``fdcore`` console script next to this interpreter, or on PATH."""
    local = Path(sys.executable).parent / "fdcore"
    return str(local) if local.exists() else shutil.which("fdcore")


def fdcore_argv(
    binary: str, cfg: Path, port: int, extra: Sequence[str]
) -> tuple[list[str] | None, str]:
    """``fdcore serve`` command line, or ``(None, reason)`` when ``fdcore serve`` cannot run."""
    try:
        help_out = subprocess.run(
            [binary, "serve", "--help"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"`fdcore serve --help` failed: {exc}"
    if help_out.returncode != 0:
        tail = (help_out.stderr or help_out.stdout).strip().splitlines()[-3:]
        return None, f"`fdcore serve --help` exited {help_out.returncode}: {' | '.join(tail)}"
    argv = [binary, "serve", "--config", str(cfg), "--port", str(port)]
    if "--host" in help_out.stdout:
        argv += ["--host", "127.0.0.1"]
    return argv + list(extra), ""


def _registered_count(body: bytes) -> int:
    """The largest integer in a ``/registered_number`` answer (JSON object or a bare number)."""
    try:
        data = json.loads(body)
    except ValueError:
        return 0
    if isinstance(data, bool):
        return 0
    if isinstance(data, int):
        return data
    if isinstance(data, dict):
        counts = [v for v in data.values() if isinstance(v, int) and not isinstance(v, bool)]
        nested = [len(v) for v in data.values() if isinstance(v, list)]  # {"mixed": [...]}
        return max([*counts, *nested, 0])
    if isinstance(data, list):
        return len(data)
    return 0


def backend_counts(ports: Sequence[int]) -> list[int]:
    """Completions answered so far by each fast backend (from its ``/metrics``)."""
    counts = []
    for port in ports:
        status, body = http_request(f"http://127.0.0.1:{port}/metrics", timeout=2)
        value = -1
        if status == 200:
            for line in body.decode().splitlines():
                if line.startswith("fast_backend_completions_total "):
                    value = int(line.split()[1])
        counts.append(value)
    return counts


def wait_router_ready(target: Target, backend_ports: Sequence[int], timeout: float) -> float:
    """Wait until the router answers /health and spreads probe chat requests over every backend.

    For fdcore, ``/registered_number`` must also show all backends. Returns seconds waited.
    """
    assert target.proc is not None
    proc = target.proc
    t0 = time.monotonic()

    def healthy() -> bool:
        return http_request(f"{target.url}/health", timeout=2)[0] == 200

    wait_until(healthy, f"{target.name} GET /health 200", timeout, proc)
    if target.name == "fdcore":

        def registered() -> bool:
            status, body = http_request(f"{target.url}/registered_number", timeout=2)
            return status == 200 and _registered_count(body) >= len(backend_ports)

        wait_until(registered, f"fdcore /registered_number >= {len(backend_ports)}", timeout, proc)

    last: list[str] = ["no probe sent"]

    def spreads() -> bool:
        before = backend_counts(backend_ports)
        for _ in range(4 * len(backend_ports)):
            status, body = http_request(f"{target.url}/v1/chat/completions", PROBE, timeout=5)
            if status != 200 or b'"choices"' not in body:
                last[0] = f"probe answered HTTP {status}: {body[:200]!r}"
                return False
        after = backend_counts(backend_ports)
        hits = [a - b for a, b in zip(after, before, strict=True)]
        last[0] = f"probe hits per backend: {hits}"
        return all(h > 0 for h in hits)

    remaining = max(1.0, timeout - (time.monotonic() - t0))
    try:
        wait_until(spreads, f"{target.name} routes to every backend", remaining, proc, 0.25)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc} ({last[0]})") from None
    return time.monotonic() - t0


# --------------------------------------------------------------------------- measuring


def measure(
    target: Target,
    urls: Sequence[str],
    args: argparse.Namespace,
    servers: Sequence[ManagedProcess],
) -> dict[str, WrkResult]:
    """Warm up, then c=1 latency and one throughput run per ``--concurrency`` level."""

    def wrk(targets: Sequence[str], conns: int, secs: int) -> WrkResult:
        return run_wrk(targets, conns, secs, WRK_SCRIPT, cpus=args.client_cpus, measure=servers)

    if args.warmup > 0:
        wrk(urls, max(args.concurrency), args.warmup)
    out = {"c1": wrk(urls[:1], 1, args.duration)}
    for conns in args.concurrency:
        out[f"c{conns}"] = wrk(urls, conns, args.duration)
    bad = {k: r.errors for k, r in out.items() if r.error_count}
    if bad:
        print(f"  ! {target.name}: wrk errors {bad}", file=sys.stderr)
    return out


def summarize(targets: dict[str, Target], concurrency: Sequence[int]) -> dict[str, Any]:
    """Medians over rounds, added latency against direct, and ratios of fdcore to the peers."""
    direct = targets["direct"]
    summary: dict[str, Any] = {}
    for name, t in targets.items():
        if not t.measured:
            summary[name] = {"error": t.error or "not measured"}
            continue
        s: dict[str, Any] = {
            "p50_ms": _median([r["c1"].latency_us["p50"] / 1000 for r in t.rounds]),
            "p99_ms": _median([r["c1"].latency_us["p99"] / 1000 for r in t.rounds]),
            "errors": sum(r[k].error_count for r in t.rounds for k in r),
        }
        if name != "direct" and direct.measured:
            for pct in ("p50", "p99"):
                added = [
                    (r["c1"].latency_us[pct] - d["c1"].latency_us[pct]) / 1000
                    for r, d in zip(t.rounds, direct.rounds, strict=False)
                ]
                s[f"added_{pct}_ms"] = _median(added)
        for c in concurrency:
            key = f"c{c}"
            s[f"rps_{key}"] = _median([r[key].rps for r in t.rounds])
            s[f"rps_{key}_rounds"] = [round(r[key].rps, 1) for r in t.rounds]
            s[f"cpu_us_per_req_{key}"] = _median(
                [1e6 * r[key].cpu_s / max(1, r[key].requests) for r in t.rounds]
            )
        summary[name] = s

    fd = summary.get("fdcore", {})
    ratios: dict[str, Any] = {}
    if "p50_ms" in fd:
        for peer in PEERS:
            ps = summary.get(peer, {})
            if "p50_ms" not in ps:
                continue
            r: dict[str, float] = {}
            for pct in ("p50", "p99"):
                if ps.get(f"added_{pct}_ms", 0) > 0:
                    r[f"added_{pct}"] = fd[f"added_{pct}_ms"] / ps[f"added_{pct}_ms"]
            for c in concurrency:
                key = f"rps_c{c}"
                if ps.get(key):
                    r[key] = fd[key] / ps[key]
            ratios[peer] = r
    checks: dict[str, Any] = {}
    if "added_p50_ms" in fd:
        checks["added_p50_le_1ms"] = {
            "value_ms": fd["added_p50_ms"],
            "target_ms": 1.0,
            "pass": fd["added_p50_ms"] <= 1.0,
        }
    peer_rps = [summary[p]["rps_c32"] for p in PEERS if "rps_c32" in summary.get(p, {})]
    if "rps_c32" in fd and peer_rps:
        best = max(peer_rps)
        checks["rps_c32_ge_half_best_peer"] = {
            "value": fd["rps_c32"],
            "best_peer": best,
            "ratio": fd["rps_c32"] / best,
            "target_ratio": 0.5,
            "pass": fd["rps_c32"] >= 0.5 * best,
        }
    return {"targets": summary, "fdcore_vs_peers": ratios, "checks": checks}


def summarize_collapsed(raw: Path, top: int = 20) -> dict[str, Any]:
    """Self time by package and by function, and fdcore's own lines, from py-spy raw stacks.

    Under uvloop, py-spy sees coroutine stacks cut at each await boundary, so self time is the
    reliable figure; time inside uvloop's C loop (polling, callbacks, socket I/O it does itself)
    shows up as ``Runner.run``.
    """
    by_func: Counter[str] = Counter()
    by_pkg: Counter[str] = Counter()
    fd_lines: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        # --subprocesses prefixes each stack with a 'process PID:"cmdline"' frame.
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        leaf = frames[-1] if frames else "(no Python frame: native code, GC or idle)"
        by_func[leaf] += n
        m = re.search(r"\(([^/:)]+)", leaf)
        pkg = m.group(1) if m else (leaf or "?")
        if leaf.startswith("Runner.run") or "uvloop" in leaf:
            pkg = "uvloop (C event loop)"
        by_pkg[pkg] += n
        for f in set(frames):
            if "fdcore/" in f or "fdcore_plugins/" in f or "plugins/" in f:
                fd_lines[f] += n

    def pct(c: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / max(1, total), 1)) for k, v in c.most_common(top)]

    return {
        "samples": total,
        "self_by_package_pct": pct(by_pkg),
        "self_by_function_pct": pct(by_func),
        "fdcore_frames_inclusive_pct": pct(fd_lines),
    }


def profile_fdcore(t: Target, args: argparse.Namespace, run_dir: Path) -> dict[str, Any] | None:
    """Record fdcore with py-spy during a c=32 wrk run; return a summary of the hot spots."""
    pyspy = Path(sys.executable).parent / "py-spy"
    binary = str(pyspy) if pyspy.exists() else shutil.which("py-spy")
    if binary is None or t.proc is None or not t.proc.alive():
        print(
            "  ! --profile: py-spy not found (pip install py-spy) or fdcore not up", file=sys.stderr
        )
        return None
    raw = run_dir / "fdcore-profile.raw"
    secs = args.profile
    argv = [
        binary,
        "record",
        "--pid",
        str(t.proc.pid),
        "--subprocesses",
        "--nonblocking",
        "--rate",
        "250",
        "--duration",
        str(int(secs)),
        "--format",
        "raw",
        "--output",
        str(raw),
    ]
    print(f"profiling fdcore for {secs:g}s at c=32: {shlex.join(argv)}", file=sys.stderr)
    spy = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        load = run_wrk([t.url], 32, secs + 2, WRK_SCRIPT, args.client_cpus, [t.proc])
        out, _ = spy.communicate(timeout=secs + 30)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if spy.returncode != 0 or not raw.exists():
        print(f"  ! py-spy failed ({spy.returncode}): {out[-500:]}", file=sys.stderr)
        return None
    summary = summarize_collapsed(raw)
    summary.update(
        command=shlex.join(argv),
        raw=str(raw),
        rps_while_profiling=round(load.rps, 1),
        cpu_us_per_req_while_profiling=round(1e6 * load.cpu_s / max(1, load.requests), 1),
    )
    lines = [
        f"fdcore under c=32 ({load.rps:,.0f} req/s while sampled), "
        f"{summary['samples']} samples; {summary['command']}",
        "",
        "self time by package:",
    ]
    lines += [f"  {v:5.1f}%  {k}" for k, v in summary["self_by_package_pct"]]
    lines += ["", "self time by function:"]
    lines += [f"  {v:5.1f}%  {k}" for k, v in summary["self_by_function_pct"]]
    lines += ["", "fdcore frames, inclusive (stacks cut at await boundaries):"]
    lines += [f"  {v:5.1f}%  {k}" for k, v in summary["fdcore_frames_inclusive_pct"]]
    text = "\n".join(lines) + "\n"
    (run_dir / "fdcore-profile.txt").write_text(text)
    summary["text"] = text
    return summary


# --------------------------------------------------------------------------- reporting


def _fmt(value: Any, spec: str) -> str:
    if isinstance(value, int | float) and value == value:  # not NaN
        return format(value, spec)
    return "-"


def table_rows(
    summary: dict[str, Any], concurrency: Sequence[int]
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table."""
    header = ["target", "p50 c=1 ms", "p99 c=1 ms", "added p50 ms", "added p99 ms"]
    header += [f"req/s c={c}" for c in concurrency]
    header += [f"CPU us/req c={c}" for c in concurrency]
    header += ["errors"]
    rows = []
    for name, s in summary["targets"].items():
        if "error" in s:
            rows.append([name, f"not measured: {s['error']}"])
            continue
        row = [
            name,
            _fmt(s["p50_ms"], ".3f"),
            _fmt(s["p99_ms"], ".3f"),
            _fmt(s.get("added_p50_ms", float("nan")), "+.3f"),
            _fmt(s.get("added_p99_ms", float("nan")), "+.3f"),
        ]
        row += [_fmt(s[f"rps_c{c}"], ",.0f") for c in concurrency]
        row += [_fmt(s[f"cpu_us_per_req_c{c}"], ".0f") for c in concurrency]
        row += [str(s["errors"])]
        rows.append(row)
    return header, rows


def render_text_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain aligned table; rows with two cells are printed as a note line."""
    full = [r for r in rows if len(r) == len(header)]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *full, strict=True)]
    out = [
        "  ".join(
            h.rjust(w) if i else h.ljust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    out.append("  ".join("-" * w for w in widths))
    for r in rows:
        if len(r) != len(header):
            out.append(f"{r[0].ljust(widths[0])}  {r[1]}")
        else:
            out.append(
                "  ".join(
                    c.rjust(w) if i else c.ljust(w)
                    for i, (c, w) in enumerate(zip(r, widths, strict=True))
                )
            )
    return "\n".join(out)


def render_md_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for r in rows:
        cells = r if len(r) == len(header) else [r[0], r[1], *[""] * (len(header) - 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_lines(summary: dict[str, Any], concurrency: Sequence[int]) -> list[str]:
    """fdcore/peer ratios and the pass/fail of the two targets, one line each."""
    lines = []
    for peer, r in summary["fdcore_vs_peers"].items():

        def ratio(key: str, r: dict[str, float] = r) -> str:
            # Absent when the peer's figure is <= 0 (an added p99 lost in noise): no ratio.
            return f"{r[key]:.2f}x" if key in r else "n/a"

        parts = [f"added p50 {ratio('added_p50')}", f"added p99 {ratio('added_p99')}"]
        parts += [f"req/s c={c} {ratio(f'rps_c{c}')}" for c in concurrency]
        lines.append(f"fdcore / {peer}: " + ", ".join(parts))
    checks = summary["checks"]
    if "added_p50_le_1ms" in checks:
        c = checks["added_p50_le_1ms"]
        verdict = "PASS" if c["pass"] else "FAIL"
        lines.append(f"target fdcore added p50 <= 1 ms: {c['value_ms']:.3f} ms -> {verdict}")
    if "rps_c32_ge_half_best_peer" in checks:
        c = checks["rps_c32_ge_half_best_peer"]
        verdict = "PASS" if c["pass"] else "FAIL"
        lines.append(
            "target fdcore req/s c=32 >= 0.5x best peer: "
            f"{c['value']:,.0f} vs {c['best_peer']:,.0f} = {c['ratio']:.2f}x -> {verdict}"
        )
    if not lines:
        lines.append("fdcore not measured: no comparison")
    return lines


def update_results_md(path: Path, section: str) -> None:
    """Replace (or append) the "Router overhead" section of ``path``, leaving the rest alone."""
    text = path.read_text() if path.exists() else RESULTS_INTRO
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == RESULTS_HEADING), None)
    new = section.rstrip("\n").splitlines()
    if start is None:
        if lines and lines[-1].strip():
            lines.append("")
        lines += new
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = lines[end:]
        lines = lines[:start] + new + (["", *tail] if tail else [])
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def _para(text: str, bullet: bool = False) -> list[str]:
    """``text`` wrapped at 100 columns (as a Markdown bullet when ``bullet``)."""
    if bullet:
        return textwrap.wrap(
            text, 100, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False
        )
    return textwrap.wrap(text, 100, break_on_hyphens=False)


def _rel(text: str) -> str:
    """``text`` with this checkout's absolute path removed (paths relative to the repo root)."""
    return text.replace(f"{REPO}/", "")


def results_section(report: dict[str, Any], header: list[str], rows: list[list[str]]) -> str:
    """The Markdown "Router overhead" section for RESULTS.md."""
    meta = report["meta"]
    conc = meta["concurrency"]
    summary = report["summary"]
    parts = [RESULTS_HEADING, ""]
    parts += _para(
        f"Measured {meta['started']} on {meta['host']['cpus']} CPUs "
        f"({meta['host']['cpu_model']}), load average before/after "
        f"{meta['loadavg_before']} / {meta['loadavg_after']}; fdcore at {meta['fdcore_source']}. "
        "Command (from the repository root):"
    )
    parts += [
        "",
        "```sh",
        "benchmarks/setup_peers.sh  # once: sglang-router, vllm-router in benchmarks/.venv-peers",
        meta["command"],
        "```",
        "",
        render_md_table(header, rows),
        "",
    ]
    parts += _para(
        "*p50/p99 c=1*: latency of one non-streaming `POST /v1/chat/completions` at "
        "concurrency 1; *added* = routed minus direct percentile of the same round "
        f"(median over {meta['rounds']} rounds of {meta['duration_s']:g} s each).",
        bullet=True,
    )
    parts += _para(
        f"*req/s c=N*: closed loop, N keep-alive connections, {meta['duration_s']:g} s, "
        "median over rounds; *CPU us/req*: CPU time (user + system) per request of the router's "
        "processes (for *direct*: of the two backends), the figure least disturbed by other "
        "work on the machine.",
        bullet=True,
    )
    parts += _para(
        "*direct*: the two fast backends with no router (c=1 on the first backend; "
        "throughput with one wrk per backend, connections split).",
        bullet=True,
    )
    spread = []
    for name, s in summary["targets"].items():
        if f"rps_c{conc[0]}_rounds" in s:
            per_round = " / ".join(f"{v:,.0f}" for v in s[f"rps_c{conc[0]}_rounds"])
            spread.append(f"{name} {per_round}")
    if spread:
        parts += _para(f"req/s c={conc[0]} per round: " + "; ".join(spread) + ".", bullet=True)
    d = summary["targets"].get("direct", {})
    if d.get("p99_ms", 0) > 10 * d.get("p50_ms", float("inf")):
        parts += _para(
            f"The direct p99 at c=1 ({d['p99_ms']:.3f} ms against a p50 of {d['p50_ms']:.3f} ms) "
            "shows scheduling stalls from other work on the shared CPUs: the p99 columns, and "
            "*added p99* most of all, mostly measure those; p50 and CPU us/req are the figures "
            "to compare.",
            bullet=True,
        )
    parts.append("")
    for line in comparison_lines(summary, conc):
        parts += _para(line, bullet=True)
    prof = report.get("fdcore_profile") or {}
    if prof.get("self_by_function_pct"):
        parts += [""]
        parts += _para(
            f"fdcore profile (py-spy, {prof['samples']} samples under c=32, "
            f"{prof['rps_while_profiling']:,.0f} req/s), self time by function; under uvloop the "
            "socket writes' self time includes the kernel's loopback TCP work:"
        )
        parts.append("")
        for func, pct in prof["self_by_function_pct"][:10]:
            parts.append(f"- {pct:.1f}% `{func}`")
    parts += ["", "Launch lines (ports vary per run):", ""]
    for name, t in report["targets"].items():
        if t.get("launch"):
            label = f"{name} {t['version']}" if t.get("version") else name
            parts.append(f"- {label}: `{_rel(t['launch'])}`")
        if t.get("error"):
            parts += _para(f"{name}: not measured: {_rel(t['error'])}", bullet=True)
    parts.append("")
    parts += _para(
        "Setup: every router uses round_robin over the same two `benchmarks/fast_backend.py` "
        "processes (raw asyncio/uvloop HTTP/1.1, one process each). fdcore runs `fdcore serve` "
        "with a FastDeploy-format config (`scheduler.policy: round_robin`, "
        "`manager.health-check-interval-secs: 5`, `manager.register-path` listing both backends "
        "as `role: mixed`, `log.level: warning`). "
        "The peers keep their default health checks, retries and circuit breakers; their log "
        "level is warn and their Prometheus exporter listens on a free loopback port. Load "
        "generator: wrk, 1 thread (`benchmarks/wrk_chat.lua`). Load generator, backends and "
        f"routers share the same {meta['host']['cpus']} CPUs with whatever else runs on the "
        f"machine; pinning: {meta['pinning']}."
        + (
            ""
            if meta["pinning"] != PIN_NONE
            else " In a trial on this machine, pinning wrk to CPU 0 and the servers to CPU 1 "
            "(`--client-cpus 0 --server-cpus 1`) gave no steadier figures (the round-to-round "
            "spread of the routers' req/s was about the same, and direct c=1 p50 rose from "
            "0.026 to 0.068 ms once client and backend no longer shared a core), so the default "
            "is unpinned."
        )
    )
    parts.append("")
    return "\n".join(parts)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=(
            "Measure the latency and throughput cost of fdcore's router against sglang-router "
            "and vllm-router, all round_robin over the same two fast local backends. "
            "Needs wrk (apt-get install wrk) and, for the peers, benchmarks/setup_peers.sh."
        ),
        epilog=(
            "Per target: p50/p99 latency at concurrency 1 and the router's added latency "
            "(routed minus direct, same round), requests/s at each --concurrency, and router "
            "CPU time per request. Prints a table; writes benchmarks/out/router_overhead.json "
            "and logs/configs under benchmarks/out/router_overhead/. Every process it starts "
            "is stopped at the end, also on error or SIGINT/SIGTERM."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--targets",
        nargs="+",
        choices=ALL_TARGETS,
        default=list(ALL_TARGETS),
        help="what to measure ('direct' is always measured: it is the latency baseline)",
    )
    p.add_argument(
        "--rounds", type=int, default=3, help="rounds over all targets; medians reported"
    )
    p.add_argument("--duration", type=int, default=3, help="seconds per measurement")
    p.add_argument("--warmup", type=int, default=1, help="warm-up seconds per target per round")
    p.add_argument(
        "--concurrency", type=int, nargs="+", default=[32, 128], help="throughput levels"
    )
    p.add_argument(
        "--peers-venv",
        type=Path,
        default=HERE / ".venv-peers",
        help="virtualenv with sglang-router and vllm-router",
    )
    p.add_argument(
        "--fdcore-bin",
        default=None,
        metavar="PATH",
        help="the `fdcore` executable to run (unset: the one next to this Python, or on PATH)",
    )
    p.add_argument(
        "--fdcore-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `fdcore serve` (repeatable), e.g. --fdcore-arg=--plugins=default",
    )
    p.add_argument(
        "--client-cpus",
        default=None,
        metavar="CPUS",
        help="taskset CPU list for wrk, e.g. 0 (unset: no pinning)",
    )
    p.add_argument(
        "--server-cpus",
        default=None,
        metavar="CPUS",
        help="taskset CPU list for the backends and routers, e.g. 1 (unset: no pinning)",
    )
    p.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait per router")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="SECONDS",
        help="after the rounds, sample fdcore with py-spy for this long under c=32 load "
        "(0: off); hot spots go to the JSON and benchmarks/out/router_overhead/fdcore-profile.txt",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report path")
    p.add_argument(
        "--update-results",
        action="store_true",
        help=f"rewrite the '{RESULTS_HEADING[3:]}' section of {RESULTS_MD.relative_to(REPO)}",
    )
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.peers_venv = args.peers_venv.absolute()
    if "direct" not in args.targets:
        args.targets.insert(0, "direct")
    if args.rounds < 1 or args.duration <= 0:
        p.error("--rounds must be >= 1 and --duration > 0")
    return args


def _source_state() -> str:
    """The checkout's commit, and whether fdcore's sources differ from it (read-only git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "fdcore", "plugins"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return f"{head}, with uncommitted changes under fdcore/ or plugins/" if dirty else head


def _answers_200(url: str) -> bool:
    """True when GET ``url`` answers 200."""
    return http_request(url, timeout=2)[0] == 200


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _command_line() -> str:
    def rel(path: str) -> str:
        with contextlib.suppress(ValueError):
            return str(Path(path).absolute().relative_to(REPO))
        return path

    return shlex.join([rel(sys.executable), rel(sys.argv[0]), *sys.argv[1:]])


@contextlib.contextmanager
def _exit_on_signals() -> Iterator[None]:
    """Turn SIGTERM, SIGINT and SIGHUP into SystemExit so cleanup runs, even when the shell
    started this process in the background with SIGINT ignored; restore the handlers after."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    old = {sig: signal.signal(sig, handler) for sig in sigs}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def start_routers(
    args: argparse.Namespace,
    targets: dict[str, Target],
    backend_ports: Sequence[int],
    run_dir: Path,
    stack: contextlib.ExitStack,
) -> None:
    """Start every requested router (each failure is recorded on its Target, not raised)."""
    workers = [f"http://127.0.0.1:{p}" for p in backend_ports]
    peer_python = _peer_python(args.peers_venv)
    for name in ROUTERS:
        if name not in targets:
            continue
        t = targets[name]
        port = free_port()
        t.url = f"http://127.0.0.1:{port}"
        env: dict[str, str] = {}
        argv: list[str] | None
        if name == "fdcore":
            binary = args.fdcore_bin or fdcore_bin()
            t.version = importlib.metadata.version("fdcore")
            if binary is None:
                t.error = "no fdcore console script next to this Python or on PATH"
                continue
            cfg = write_fdcore_config(run_dir, backend_ports)
            argv, reason = fdcore_argv(binary, cfg, port, args.fdcore_arg)
            if argv is None:
                t.error = reason
                continue
        else:
            if not peer_python.exists():
                t.error = f"{args.peers_venv} missing: run benchmarks/setup_peers.sh"
                continue
            t.version = _package_version(peer_python, name)
            builder: Callable[..., list[str]] = (
                sglang_argv if name == "sglang-router" else vllm_argv
            )
            argv = builder(args.peers_venv, workers, port, free_port())
            env = NO_EGRESS_ENV
            t.notes.append("proxies pointed at a closed loopback port (no egress)")
        t.launch = shlex.join(argv)
        proc = ManagedProcess(name, argv, run_dir / f"{name}.log", env=env, cpus=args.server_cpus)
        t.proc = proc.start()
        stack.callback(proc.stop)
    for t in [targets[n] for n in ROUTERS if n in targets]:
        if t.proc is None:
            continue
        name, proc = t.name, t.proc
        try:
            t.ready_s = wait_router_ready(t, backend_ports, args.ready_timeout)
            print(f"  {name} ready in {t.ready_s:.1f}s at {t.url}", file=sys.stderr)
        except (RuntimeError, TimeoutError) as exc:
            t.log_tail = proc.log_tail(20)
            last = [ln for ln in t.log_tail.splitlines() if ln.strip()][-1:]
            t.error = f"{exc}" + (f"; last log line: {last[0].strip()}" if last else "")
            print(f"  ! {name} failed to start: {exc}\n{t.log_tail}", file=sys.stderr)
            proc.stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start everything, measure, stop everything; return the JSON report."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    run_dir = args.out.parent / "router_overhead"
    run_dir.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_before = _loadavg()
    targets: dict[str, Target] = {n: Target(n) for n in ALL_TARGETS if n in args.targets}

    with contextlib.ExitStack() as stack, _exit_on_signals():
        backend_ports = [free_port(), free_port()]
        backends = []
        for i, port in enumerate(backend_ports):
            argv = [sys.executable, str(HERE / "fast_backend.py"), "--port", str(port)]
            proc = ManagedProcess(
                f"backend{i}", argv, run_dir / f"backend{i}.log", cpus=args.server_cpus
            ).start()
            stack.callback(proc.stop)
            backends.append(proc)
        for proc, port in zip(backends, backend_ports, strict=True):
            health = f"http://127.0.0.1:{port}/health"
            wait_until(
                functools.partial(_answers_200, health), f"{proc.name} GET /health 200", 15, proc
            )
        direct = targets["direct"]
        direct.url = f"http://127.0.0.1:{backend_ports[0]}"
        direct.launch = shlex.join(backends[0].argv)
        print(f"backends on ports {backend_ports}; starting routers", file=sys.stderr)
        start_routers(args, targets, backend_ports, run_dir, stack)

        routers = [t for n, t in targets.items() if n != "direct" and t.error is None]
        direct_urls = [f"http://127.0.0.1:{p}" for p in backend_ports]
        for rnd in range(args.rounds):
            order = routers[rnd % len(routers) :] + routers[: rnd % len(routers)] if routers else []
            print(
                f"round {rnd + 1}/{args.rounds}: direct, {', '.join(t.name for t in order)}",
                file=sys.stderr,
            )
            direct.rounds.append(measure(direct, direct_urls, args, backends))
            for t in order:
                if t.error is not None or t.proc is None:
                    continue
                if not t.proc.alive():
                    t.error = f"exited ({t.proc.returncode()}) before round {rnd + 1}"
                    continue
                try:
                    t.rounds.append(measure(t, [t.url], args, [t.proc]))
                except (RuntimeError, subprocess.SubprocessError) as exc:
                    t.error = f"measurement failed in round {rnd + 1}: {exc}"
                    print(f"  ! {t.name}: {t.error}", file=sys.stderr)
            # A target that failed mid-run keeps only complete rounds.
        for t in targets.values():
            if t.error and t.rounds:
                t.notes.append(f"partial: {t.error}")
        profile = None
        fd = targets.get("fdcore")
        if args.profile > 0 and fd is not None and fd.error is None:
            try:
                profile = profile_fdcore(fd, args, run_dir)
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                print(f"  ! profiling failed: {exc}", file=sys.stderr)
                profile = {"error": str(exc)}

    report_targets: dict[str, Any] = {}
    for name, t in targets.items():
        report_targets[name] = {
            "url": t.url,
            "launch": t.launch,
            "version": t.version,
            "notes": t.notes,
            "error": t.error if not t.rounds else None,
            "ready_s": t.ready_s,
            "log_tail": t.log_tail,
            "rounds": [{k: r.to_json() for k, r in rnd.items()} for rnd in t.rounds],
        }
    pinning = (
        f"wrk on CPUs {args.client_cpus or 'any'}, backends and routers on CPUs "
        f"{args.server_cpus or 'any'} (taskset)"
        if args.client_cpus or args.server_cpus
        else PIN_NONE
    )
    return {
        "meta": {
            "started": started,
            "command": _command_line(),
            "fdcore_source": _source_state(),
            "rounds": args.rounds,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": args.concurrency,
            "pinning": pinning,
            "loadavg_before": load_before,
            "loadavg_after": _loadavg(),
            "host": {
                "cpus": os.cpu_count(),
                "affinity": sorted(os.sched_getaffinity(0)),
                "cpu_model": _cpu_model(),
                "python": platform.python_version(),
                "wrk": subprocess.run(
                    ["wrk", "--version"], capture_output=True, text=True, check=False
                ).stdout.splitlines()[0:1],
            },
            "backend": "benchmarks/fast_backend.py x2 (uvloop)",
        },
        "targets": report_targets,
        "summary": summarize(targets, args.concurrency),
        "fdcore_profile": profile,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON (and RESULTS.md when asked)."""
    args = parse_args(argv)
    est = (
        args.rounds
        * len(args.targets)
        * (args.warmup + args.duration * (1 + len(args.concurrency)))
    )
    print(f"router overhead: about {est + 15:.0f}s of measurement", file=sys.stderr)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    header, rows = table_rows(report["summary"], args.concurrency)
    print()
    print(
        f"Router overhead ({report['meta']['rounds']} rounds x {args.duration:g}s, medians; "
        f"pinning: {report['meta']['pinning']}; load avg {report['meta']['loadavg_before']})"
    )
    print(render_text_table(header, rows))
    print()
    for line in comparison_lines(report["summary"], args.concurrency):
        print(line)
    if report.get("fdcore_profile") and "text" in report["fdcore_profile"]:
        print()
        print(report["fdcore_profile"]["text"].rstrip())
    print(f"\nJSON: {args.out}")
    if args.update_results:
        update_results_md(RESULTS_MD, results_section(report, header, rows))
        print(f"updated '{RESULTS_HEADING[3:]}' in {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
