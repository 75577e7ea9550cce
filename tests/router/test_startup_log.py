"""At start-up the router logs, in one line, what it runs: its policies, its health check and
every loaded plugin with distribution and version."""

from __future__ import annotations

import json
from importlib.metadata import entry_points, version
from typing import Any

from fdcore.testing.cluster import RouterFactory


def _startup_line(router: RouterFactory, **sections: Any) -> dict[str, Any]:
    serving = router(**sections)  # JSON logs; returns once /health answers
    serving.proc.stop()
    lines = [json.loads(line) for line in serving.proc.output().splitlines()
             if line.startswith("{")]
    found = [line for line in lines if line["event"] == "router starting"]
    assert len(found) == 1, lines
    return found[0]


def test_mixed(router: RouterFactory) -> None:
    line = _startup_line(router, scheduler={"policy": "cache_aware"})
    assert line["policy"] == "cache_aware"
    assert "prefill_policy" not in line
    assert line["health_check"] == "http"
    ours = f"fdcore {version('fdcore')}"
    defaults = {ep.name: ours for ep in entry_points(group="fdcore")
                if ep.dist is not None and ep.dist.metadata["Name"] == "fdcore"}
    assert line["plugins"] == defaults


def test_splitwise(router: RouterFactory) -> None:
    line = _startup_line(router, server={"splitwise": True},
                         scheduler={"prefill-policy": "process_tokens",
                                    "decode-policy": "request_num"},
                         plugins={"enable": ["random", "process_tokens", "request_num", "http_health"]})
    assert (line["prefill_policy"], line["decode_policy"]) == ("process_tokens", "request_num")
    assert "policy" not in line
    assert set(line["plugins"]) == {"random", "process_tokens", "request_num", "http_health"}
