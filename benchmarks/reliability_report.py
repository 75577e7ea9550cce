"""The "Reliability" section of ``benchmarks/RESULTS.md`` from a ``reliability.py`` report:
the command, machine and commit, the router config, a table per phase and pass/fail checks."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HEADING = "## Reliability"
_OUTCOME_COLUMNS = ("ok", "sse_error", "truncated")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:,}" if isinstance(v, int) and not isinstance(
            v, bool) else str(v)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def _outcomes(s: dict[str, Any]) -> list[Any]:
    """requests, ok, SSE error, truncated, other (as ``name n``), from a summarize() dict."""
    counts = s.get("outcomes", {})
    other = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k not in _OUTCOME_COLUMNS)
    return [s.get("requests", 0), *(counts.get(k, 0) for k in _OUTCOME_COLUMNS), other or 0]


def _errors(s: dict[str, Any]) -> int:
    return int(s.get("requests", 0)) - int(s.get("outcomes", {}).get("ok", 0))


def _names(report: dict[str, Any]) -> dict[str, str]:
    return {url: f"engine-{i}" for i, url in enumerate(report["config"].get("engine_urls", []))}


def _rename(value: Any, names: dict[str, str]) -> str:
    text = str(value)
    for url, name in names.items():
        text = text.replace(url, name)
    return text.replace("'", "")


def _counts(details: dict[str, int]) -> str:
    """``{"sse_error:504/timeout": 3}`` as ``504/timeout x3``."""
    return ", ".join(f"{k.split(':', 1)[-1]} x{v}" for k, v in sorted(details.items()))


def _wrap(lines: list[str]) -> list[str]:
    """Paragraphs and bullets wrapped at 100 columns; tables and code blocks left alone."""
    out, code = [], False
    for line in lines:
        code ^= line.startswith("```")
        if code or line.startswith(("|", "```")) or len(line) <= 100:
            out.append(line)
        elif line.startswith("- "):
            out += textwrap.wrap(line, 100, subsequent_indent="  ", break_on_hyphens=False)
        else:
            out += textwrap.wrap(line, 100, break_on_hyphens=False)
    return out


def _baseline(b: dict[str, Any], names: dict[str, str]) -> str:
    state = "reached" if b.get("reached") else "NOT reached"
    return (f"{state} after {b.get('waited_s')} s: router in flight "
            f"{_rename(b.get('in_flight'), names)}, free blocks "
            f"{_rename(b.get('free_blocks'), names)} of {_rename(b.get('total_blocks'), names)}")


def _check(ok: bool, text: str) -> str:
    return f"- {'PASS' if ok else 'FAIL'}: {text}"


def _streams(p: dict[str, Any], names: dict[str, str]) -> list[str]:
    b, a, a5 = p["router_before"], p["router_after"], p.get("router_after_5s", {})
    lines = _table(
        ["streams", "ok", "SSE error", "truncated", "other", "TTFT p50 ms", "TTFT p99 ms",
         "total p50 ms", "total p99 ms", "wall s"],
        [[*_outcomes(p), p["ttft_p50_ms"], p["ttft_p99_ms"], p["total_p50_ms"],
          p["total_p99_ms"], p["wall_s"]]])
    lines += ["", f"Router RSS {b['rss_mib']} MiB before, {a['rss_mib']} right after, "
              f"{a5.get('rss_mib')} 5 s later; fds {b['fds']} / {a['fds']} / {a5.get('fds')}. "
              f"Counters: {_baseline(p['baseline'], names)}.", ""]
    lines += [_check(_errors(p) == 0, "every stream completed"),
              _check(p["baseline"]["reached"], "router counters and engine blocks at baseline")]
    return lines


def _slowloris(p: dict[str, Any], a: dict[str, Any]) -> list[str]:
    idle, loaded, ratio, sl = p["idle"], p["loaded"], p["ratio"], p["slowloris"]

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}x"

    lines = _table(["normal traffic", "requests", "errors", "p50 ms", "p99 ms"], [
        ["idle router", idle["requests"], _errors(idle), idle["total_p50_ms"],
         idle["total_p99_ms"]],
        [f"with {p['slow_connections']:,} slow connections", loaded["requests"],
         _errors(loaded), loaded["total_p50_ms"], loaded["total_p99_ms"]],
        ["ratio", "", "", fmt(ratio["total_p50_ms"]), fmt(ratio["total_p99_ms"])]])
    lines += ["", *_table(
        ["slow connections", "opened (reopened included)", "closed by the router",
         "closed with a response", "lifetime p50 s", "lifetime p99 s"],
        [[f"trickle (1 byte / {a['slow_interval']} s)" if kind == "trickle" else
          "silent (sends nothing)", s["opened"], s["closed_by_server"], s["answered"],
          s["lifetime_p50_s"], s["lifetime_p99_s"]]
         for kind, s in ((k, sl[k]) for k in ("trickle", "silent"))])]
    lines += ["", f"Open at once: {p['open_at_start']:,} when the traffic started, "
              f"{sl['held_min']:,}-{sl['held_max']:,} during it (a closed one is reopened). "
              f"Router while held: {p['router_held']['rss_mib']} MiB, "
              f"{p['router_held']['fds']:,} fds.", ""]
    limit = a["header_timeout"] + a["slow_interval"] + 1
    lifetimes = [sl[k]["lifetime_p99_s"] for k in ("trickle", "silent")]
    lines += [
        _check(_errors(loaded) == 0, "no errors in the normal traffic with slow connections"),
        _check(all(x is not None and x <= limit for x in lifetimes),
               f"slow connections of both kinds closed within {limit:g} s (header timeout "
               f"{a['header_timeout']:g} s + one trickle interval + 1 s)")]
    return lines


def _fault(p: dict[str, Any], names: dict[str, str], event: str, baseline_key: str) -> list[str]:
    groups = ["in flight on victim", "in flight on other", "started after"]
    rows = [[g.replace("victim", "the victim").replace("other", "the other engine")
             .replace("started after", "started after the fault"), *_outcomes(p[g]),
             _counts(p[g]["details"])] for g in groups]
    probes = p["probes_after_unhealthy"]
    rows.append(["40 probes once the victim was unhealthy", *_outcomes(probes),
                 _rename(p["probes_by_instance"], names)])
    lines = _table(["streams", "requests", "ok", "SSE error", "truncated", "other",
                    "details"], rows)
    ends = p.get("victim_end_after_fault_s", {})
    lines += ["", f"Router in flight at the fault: {_rename(p['in_flight_at_fault'], names)}; "
              f"victim out of selection (unhealthy) {p['unhealthy_after_s']} s after it; "
              f"the victim's streams ended {ends.get('min')}-{ends.get('max')} s after it; "
              f"streams started after the fault went to "
              f"{_rename(p['started_after_by_instance'], names)}. "
              f"Counters: {_baseline(p[baseline_key], names)}.", ""]
    victim = p["in flight on victim"]
    lines += [
        _check(victim["outcomes"].get("sse_error", 0) == victim["requests"] > 0,
               f"every stream in flight on the victim ended with an SSE error event ({event})"),
        _check(_errors(p["in flight on other"]) == 0, "streams on the other engine unaffected"),
        _check(p["probes_all_on_survivor"] and _errors(probes) == 0,
               "after the health check every request went to the survivor and succeeded"),
        _check(p[baseline_key]["reached"], "router counters and engine blocks at baseline")]
    return lines


def _drain(p: dict[str, Any], a: dict[str, Any]) -> list[str]:
    counts = p["outcomes"]
    lines = _table(
        ["in flight at SIGTERM", "finished normally", "SSE error event", "truncated", "other",
         "last end after SIGTERM s", "new request 1 s after SIGTERM", "exit code",
         "exited after s", "Traceback lines"],
        [[p["requests"], *(counts.get(k, 0) for k in _OUTCOME_COLUMNS), _outcomes(p)[4],
          p["stream_end_after_sigterm_s"]["max"], p["new_request_during_drain"],
          p["exit_code"], p["exited_after_s"], p["tracebacks"]]])
    lines += ["", f"{p['streams']} streams asking for 50 to {a['drain_max_tokens']} tokens "
              f"started together, SIGTERM 1 s later ({p['ended_before_sigterm']} had ended by "
              f"then); error events: {_counts(p['details']) or 'none'}.", ""]
    lines += [
        _check(counts.get("truncated", 0) == 0 and counts.get("ok", 0)
               + counts.get("sse_error", 0) == p["requests"],
               "every in-flight stream finished or ended with an error event (none truncated)"),
        _check(p["stream_end_after_sigterm_s"]["max"] <= a["drain_grace"] + 2,
               f"all streams ended within the grace ({a['drain_grace']:g} s) + 2 s"),
        _check(p["exit_code"] == 0 and p["tracebacks"] == 0,
               "the router exited with status 0 and no traceback")]
    return lines


def _soak(p: dict[str, Any], names: dict[str, str]) -> list[str]:
    rows = []
    for name, s in p["samples"].items():
        blocks = " / ".join(str(v) for v in s["free_blocks"].values())
        rows.append([name, s["rss_mib"], s["fds"], sum(s["in_flight"].values()), blocks])
    lines = _table(["sample", "router RSS MiB", "router fds", "router in flight",
                    "free blocks engine-0 / engine-1"], rows)
    lines += ["", f"{p['requests']:,} requests in {p['wall_s']} s ({p['rps']} req/s): "
              f"{_rename(p['outcomes'], names)}; total p50 {p['total_p50_ms']} ms, p99 "
              f"{p['total_p99_ms']} ms; stream TTFT p50 {p['ttft_p50_ms']} ms, p99 "
              f"{p['ttft_p99_ms']} ms.", ""]
    start, idle = p["samples"]["start"], p["samples"]["idle"]
    lines += [_check(_errors(p) == 0, "no errors"),
              _check(p["baseline"]["reached"], "router counters and engine blocks at baseline"),
              _check(idle["rss_mib"] <= start["rss_mib"] * 1.25 and idle["fds"] <= start["fds"]
                     + 64, "router RSS within +25 % and fds within +64 of the start once idle")]
    return lines


TITLES = {
    "streams": "1. Concurrent streams",
    "slowloris": "2. Slow connections (slowloris) during normal traffic",
    "kill_engine": "3. kill -9 of an engine under streaming load",
    "stop_engine": "4. SIGSTOP of an engine under streaming load (SIGCONT after)",
    "drain_router": "5. SIGTERM of the router with streams in flight",
    "soak": "6. Soak",
}


def _intro(name: str, a: dict[str, Any]) -> str:
    return {
        "streams": f"{a['streams']:,} streaming chats (`max_tokens` 16) sent at once.",
        "slowloris": f"{a['normal_clients']} closed-loop clients send non-streaming chats "
                     f"(`max_tokens` 16) for {a['slow_seconds']:g} s to the idle router, then "
                     f"for {a['slow_seconds']:g} s more while {a['slowloris']:,} slow "
                     "connections are held open (half trickle an endless request head, half "
                     "send nothing; one the router closes is opened again).",
        "kill_engine": f"{a['fault_clients']} closed-loop streaming clients (100-800 tokens) "
                       f"for {a['fault_seconds']:g} s; engine-0 gets kill -9 after "
                       f"{a['fault_at']:g} s; then 40 short requests; engine-0 is restarted "
                       "after the phase.",
        "stop_engine": f"The same load; engine-1 gets SIGSTOP after {a['fault_at']:g} s and "
                       "SIGCONT once the load and the 40 probes are over.",
        "drain_router": f"`server.drain-grace-secs: {a['drain_grace']:g}`; a new router is "
                        "started after the phase.",
        "soak": f"{a['soak']:,} chats, every other one streaming, `max_tokens` 4-32, "
                f"{a['soak_clients']} closed-loop clients; samples at the start, when half "
                "were done, at the end of the load and once the counters were back to 0.",
    }[name]


def section(report: dict[str, Any], repo: Path) -> str:
    """The Markdown section for ``report`` (paths made relative to ``repo``)."""
    meta, cfg, a = report["meta"], report["config"], report["config"]["args"]
    names = _names(report)
    yaml_text = cfg.get("router_yaml", "").replace(f"{repo}/", "")
    out = [HEADING, "",
           f"Measured {meta['date']} on {meta['cpus']} CPUs shared with other engineers' "
           f"tests; fdcore at {meta['commit']}. Load average (1/5/15 min) "
           + "; ".join(report["load_average"]) + ". Command (from the repository root):", "",
           "```sh", meta["command"], "```", "",
           "Two `fdcore engine --model sim` processes (sim profile: "
           + ", ".join(f"`{k}: {v}`" for k, v in cfg["sim_profile"].items())
           + f"; `--max-num-seqs {a['max_num_seqs']} --num-gpu-blocks {a['num_gpu_blocks']}`) "
           "attached through `manager.register-path`, behind `fdcore serve` with this config "
           f"(`ulimit -n` {meta['nofile'][0]:,} for every process):", "",
           "```yaml", yaml_text.rstrip(), "```", "",
           "Client: aiohttp in the benchmark process (one connection per concurrent request); "
           "the slow connections come from a second process. A stream is *ok* with "
           "`data: [DONE]`, *SSE error* when it ended with a `data: {\"error\": ...}` event, "
           "*truncated* when it ended with neither; `http_N` is an answer with status N, "
           "`conn_error` no answer.", ""]
    a_ = a
    renderers = {
        "streams": lambda p: _streams(p, names),
        "slowloris": lambda p: _slowloris(p, a_),
        "kill_engine": lambda p: _fault(p, names, "kill -9", "baseline_survivor"),
        "stop_engine": lambda p: _fault(p, names, "stream idle timeout",
                                        "baseline_after_sigcont"),
        "drain_router": lambda p: _drain(p, a_),
        "soak": lambda p: _soak(p, names),
    }
    for name, phase in report["phases"].items():
        out += [f"### {TITLES[name]}", "", _intro(name, a), ""]
        if "error" in phase:
            out += [f"The phase failed: `{phase['error']}`.", ""]
            continue
        out += [*renderers[name](phase), "",
                f"Outlier ejections during the phase: {_rename(phase.get('ejections'), names)}; "
                f"phase took {phase.get('phase_s')} s.", ""]
    checks = [ln for ln in out if ln.startswith(("- PASS", "- FAIL"))]
    failed = [ln[8:] for ln in checks if ln.startswith("- FAIL")]
    out += ["### Summary", "",
            f"{len(checks) - len(failed)} of {len(checks)} checks passed"
            + (": every phase met its target." if not failed else "; failed: "
               + "; ".join(failed) + "."), ""]
    return "\n".join(_wrap(out))
