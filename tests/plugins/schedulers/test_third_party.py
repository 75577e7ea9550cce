"""A third-party scheduler in a real engine: the base class suffices, and each way it can
refuse a request reaches the client as its own HTTP status."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from fdcore.plugins import load_plugins
from fdcore.testing.distributions import plugin_site, pythonpath
from fdcore.types import RejectionKind
from tests.engine.conftest import Engine
from tests.plugins.schedulers import minimal_plugin

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def minimal_engine(
    start_engine: Callable[..., Engine], tmp_path_factory: pytest.TempPathFactory
) -> Engine:
    """A sim engine on ``minimal``, installed as a distribution with an entry point."""
    site = plugin_site(tmp_path_factory.mktemp("site"), "minimal-scheduler",
                       {"minimal": minimal_plugin.__name__})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", pythonpath(site, ROOT))
        return start_engine("--plugins", "default,minimal", "--scheduler-name", "minimal")


def test_base_scheduler_with_only_the_queue_methods_loads_and_serves(
    minimal_engine: Engine,
) -> None:
    component = load_plugins("default", extra=[("minimal", minimal_plugin)]).registry.get(
        "scheduler", "minimal")
    assert component.cls is minimal_plugin.Minimal
    assert minimal_engine.request("GET", "/health") == (200, {"status": "ok"})
    body = minimal_engine.complete("hello there", max_tokens=3)
    assert body["usage"]["completion_tokens"] == 3
    assert minimal_engine.metric("fastdeploy:num_requests_waiting") == 0


@pytest.mark.parametrize(
    ("kind", "status", "type_", "param"),
    [
        (RejectionKind.QUEUE_FULL, 429, "rate_limit_error", None),
        (RejectionKind.DUPLICATE_ID, 409, "invalid_request_error", "request_id"),
        (RejectionKind.UNAVAILABLE, 503, "service_unavailable_error", None),
        (RejectionKind.INVALID, 400, "invalid_request_error", None),
    ],
)
def test_each_rejection_kind_has_its_status(
    minimal_engine: Engine, kind: RejectionKind, status: int, type_: str, param: str | None,
) -> None:
    rid = f"refuse-{kind}-{uuid.uuid4().hex}"
    got, body = minimal_engine.request("POST", "/v1/completions",
                                       {"prompt": "x", "max_tokens": 1},
                                       headers={"x-request-id": rid})
    assert got == status
    assert body["error"] == {"message": f"refused as {kind}", "type": type_, "param": param,
                             "code": str(kind)}
    # Refused, not leaked: the same id is refused again the same way (not as in flight).
    assert minimal_engine.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1},
                                  headers={"x-request-id": rid})[0] == status
