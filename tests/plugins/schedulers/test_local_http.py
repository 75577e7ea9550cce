"""The ``local`` scheduler seen through the API: max-size 429, ttl eviction, duplicate ids."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

from tests.engine.conftest import Engine
from tests.engine.test_batching import start_stream


def test_full_scheduler_answers_429(start_engine: Callable[..., Engine]) -> None:
    engine = start_engine("--scheduler-max-size", "1")
    running = f"busy-{uuid.uuid4().hex}"
    sock = start_stream(engine, running)
    status, body = engine.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert status == 429
    assert body["error"]["message"] == (
        "Exceeding the max length of the local scheduler (max_size=1)"
    )
    status, body = engine.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1},
                                  headers={"x-request-id": running})
    assert status == 409 and "duplicated request_id" in body["error"]["message"]
    engine.request("POST", "/v1/abort_requests", {"req_ids": [running]})
    sock.close()
    assert engine.complete("room again", max_tokens=1)["choices"]


def test_queued_request_past_ttl_gets_an_error(
    start_engine: Callable[..., Engine], tmp_path: Path
) -> None:
    config = tmp_path / "engine.yaml"
    config.write_text("max_num_seqs: 1\nscheduler:\n  ttl: 0.5\n")
    engine = start_engine("--config", str(config))
    running = f"busy-{uuid.uuid4().hex}"
    sock = start_stream(engine, running)
    status, body = engine.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert status == 503
    assert "ttl (0.5 s)" in body["error"]["message"]
    assert engine.metric("fastdeploy:num_requests_waiting") == 0
    engine.request("POST", "/v1/abort_requests", {"req_ids": [running]})
    sock.close()
