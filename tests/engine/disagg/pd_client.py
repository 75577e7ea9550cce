"""A test client that does what a router does for a P-D pair: the same body, plus
``disaggregate_info``, to P and D at once; D's answer is the client's."""

from __future__ import annotations

import re
import threading
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from tests.engine.conftest import Engine


@dataclass
class Answer:
    """One engine's HTTP answer."""

    status: int
    body: Any = None  # decoded JSON (non-streaming) or None
    events: list[Any] = field(default_factory=list)  # decoded SSE data (streaming)
    error: str = ""  # the connection failed (the engine died)

    @property
    def text(self) -> str:
        """The completion's text (streamed or not)."""
        if self.events:
            return "".join(e["choices"][0].get("text", "") for e in self.events
                           if isinstance(e, dict) and e.get("choices"))
        return str(self.body["choices"][0]["text"])


def info(p: Engine, d: Engine, protocol: str, transfer_id: str | None = None) -> dict[str, Any]:
    """``disaggregate_info`` for the pair (FastDeploy's keys plus ``transfer_id``)."""
    return {
        "prefill_ip": "127.0.0.1", "decode_ip": "127.0.0.1",
        "prefill_connector_port": p.pd_port, "decode_connector_port": d.pd_port,
        "decode_device_ids": ["0"], "decode_rdma_ports": [], "transfer_protocol": protocol,
        "decode_tp_size": 1, "transfer_id": transfer_id or uuid.uuid4().hex,
    }


def post(engine: Engine, body: dict[str, Any], timeout: float = 60) -> Answer:
    """POST ``/v1/completions``; read the whole answer (SSE events when streaming)."""
    req = urllib.request.Request(engine.url + "/v1/completions", data=orjson.dumps(body),
                                 method="POST", headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
        exc.close()
    except (OSError, urllib.error.URLError) as exc:
        return Answer(0, error=repr(exc))
    if body.get("stream"):
        data = re.findall(rb"^data: (.*)$", payload, re.M)
        return Answer(status, events=[orjson.loads(d) for d in data if d != b"[DONE]"])
    try:
        return Answer(status, orjson.loads(payload))
    except orjson.JSONDecodeError:
        return Answer(status, payload.decode(errors="replace"))


def pd_complete(p: Engine, d: Engine, body: dict[str, Any], protocol: str = "ipc",
                timeout: float = 60) -> tuple[Answer, Answer]:
    """Send ``body`` to P and D at once, as a router does; returns ``(d_answer, p_answer)``."""
    rid = body.get("request_id") or uuid.uuid4().hex
    full = {**body, "request_id": rid, "disaggregate_info": info(p, d, protocol)}
    answers: dict[str, Answer] = {}

    def run(name: str, engine: Engine) -> None:
        answers[name] = post(engine, full, timeout)

    threads = [threading.Thread(target=run, args=(n, e)) for n, e in (("p", p), ("d", d))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 5)
    return answers["d"], answers["p"]


def held_blocks(engine: Engine) -> float:
    """Blocks held for hand-offs, all sides and states."""
    _, text = engine.request("GET", "/metrics")
    return sum(float(v) for v in re.findall(r"^fdcore_kv_held_blocks\{[^}]*\} (\S+)$", text,
                                             re.M))


def at_baseline(engine: Engine) -> bool:
    """No block used or held: every block free or evictable in the prefix cache."""
    try:
        m = engine.metrics()
        held = held_blocks(engine)
    except OSError:  # a scrape refused under load: look again (a dead engine never passes)
        return False
    return (held == 0
            and m["fastdeploy:available_gpu_block_num"] == m["fastdeploy:max_gpu_block_num"]
            and m["fastdeploy:gpu_cache_usage_perc"] == 0)


def received_bytes(engine: Engine) -> float:
    """KV bytes D has received from P, every transport."""
    _, text = engine.request("GET", "/metrics")
    return sum(float(v) for v in re.findall(
        r'^fdcore_kv_transfer_bytes_total\{direction="received"[^}]*\} (\S+)$', text, re.M))
