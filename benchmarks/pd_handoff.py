"""Time from P's last prefill step to D's first decode step, and its share of TTFT.

Starts a real P and D engine (SmolLM2, ``--splitwise-role prefill|decode``) and a mixed engine
of the same model, sends prompts of about ``--tokens`` tokens through the pair the way a router
does (the same body plus ``disaggregate_info`` to both, D's stream read), and reads the engines'
``pd.prefilled`` / ``pd.adopted`` / ``pd.first_decode`` log events (wall clock, one host):

* hand-off: P's prefill done -> D adopted the KV (write + ``done`` + D's bookkeeping),
* to first decode: P's prefill done -> D's first decode step starts,
* TTFT at the client, through the pair and on the mixed engine.

    .venv/bin/python benchmarks/pd_handoff.py --protocol ipc --runs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ManagedProcess, free_port, http_request, wait_until

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
         "sierra", "tango", "uniform", "victor", "whiskey", "xray"]


def engine(name: str, port: int, log_dir: Path, *flags: str) -> ManagedProcess:
    """An engine process on ``port``."""
    argv = [sys.executable, "-m", "fdcore.engine", "--model", str(MODEL), "--host", "127.0.0.1",
            "--port", str(port), "--log-format", "json", "--log-level", "debug",
            "--cpu-threads", "1", "--max-model-len", "4096", "--num-gpu-blocks", "160", *flags]
    return ManagedProcess(name, argv, log_dir / f"{name}.log").start()


def prompt(tokens: int, seed: int) -> str:
    """About ``tokens`` SmolLM2 tokens of words (these words take about 1.785 tokens each)."""
    return " ".join(WORDS[(seed * 7 + i * 13) % len(WORDS)] for i in range(int(tokens / 1.785)))


def stream_ttft(port: int, body: dict[str, Any]) -> tuple[float, int]:
    """Seconds to the first streamed token, and the prompt's token count."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    started = time.perf_counter()
    first = 0.0
    prompt_tokens = 0
    with urllib.request.urlopen(req, timeout=300) as resp:
        for line in resp:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0].get("text") and not first:
                first = time.perf_counter() - started
            if event.get("usage"):
                prompt_tokens = event["usage"]["prompt_tokens"]
    return first, prompt_tokens


def events(log: Path, name: str) -> dict[str, float]:
    """``request_id -> at`` of one log event."""
    found: dict[str, float] = {}
    for line in log.read_text().splitlines():
        if f'"{name}"' in line:
            doc = json.loads(line)
            found[doc["request_id"]] = float(doc["at"])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", default="ipc", choices=["ipc", "tcp"])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if not MODEL.exists():
        sys.exit(f"{MODEL} is missing: run `make model`")
    log_dir = Path(tempfile.mkdtemp(prefix="fdcore-pd-bench-"))
    ports = {name: (free_port(), free_port()) for name in ("p", "d", "m")}
    procs = [
        engine("p", ports["p"][0], log_dir, "--splitwise-role", "prefill", "--pd-comm-port",
               str(ports["p"][1]), "--cache-transfer-protocol", "ipc,tcp"),
        engine("d", ports["d"][0], log_dir, "--splitwise-role", "decode", "--pd-comm-port",
               str(ports["d"][1]), "--cache-transfer-protocol", "ipc,tcp"),
        engine("m", ports["m"][0], log_dir),
    ]
    try:
        for proc, (port, _) in zip(procs, ports.values(), strict=True):
            wait_until(lambda p=port: http_request(f"http://127.0.0.1:{p}/health")[0] == 200,
                       f"{proc.name} ready", 300, proc)
        rows = []
        for run in range(args.runs):
            rid = uuid.uuid4().hex
            body = {"prompt": prompt(args.tokens, run), "max_tokens": 4, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True},
                    "request_id": rid}
            info = {"prefill_ip": "127.0.0.1", "decode_ip": "127.0.0.1",
                    "prefill_connector_port": ports["p"][1],
                    "decode_connector_port": ports["d"][1],
                    "transfer_protocol": args.protocol, "transfer_id": rid}
            pd_body = {**body, "disaggregate_info": info}
            drain = threading.Thread(target=stream_ttft, args=(ports["p"][0], pd_body))
            drain.start()
            ttft, prompt_tokens = stream_ttft(ports["d"][0], pd_body)
            drain.join()
            mixed_ttft, _ = stream_ttft(ports["m"][0], {**body, "request_id": rid + "-m"})
            time.sleep(0.5)  # let the debug lines reach the log files
            prefilled = events(log_dir / "p.log", "pd.prefilled")[rid]
            adopted = events(log_dir / "d.log", "pd.adopted")[rid]
            first_decode = events(log_dir / "d.log", "pd.first_decode")[rid]
            rows.append((prompt_tokens, (adopted - prefilled) * 1000,
                         (first_decode - prefilled) * 1000, ttft * 1000, mixed_ttft * 1000))
            print(f"run {run}: {prompt_tokens} tokens, hand-off {rows[-1][1]:.1f} ms, "
                  f"to first decode {rows[-1][2]:.1f} ms, TTFT {rows[-1][3]:.0f} ms "
                  f"(mixed {rows[-1][4]:.0f} ms)", flush=True)
        med = [statistics.median(r[i] for r in rows) for i in range(5)]
        print("\n| protocol | prompt tokens | hand-off ms | P prefill end -> D first decode ms "
              "| TTFT via P+D ms | share of TTFT | TTFT mixed ms |\n"
              "|---|---|---|---|---|---|---|\n"
              f"| {args.protocol} | {med[0]:.0f} | {med[1]:.1f} | {med[2]:.1f} | {med[3]:.0f} | "
              f"{med[2] / med[3]:.1%} | {med[4]:.0f} |  (median of {args.runs})")
    finally:
        for proc in procs:
            proc.stop()


if __name__ == "__main__":
    main()
