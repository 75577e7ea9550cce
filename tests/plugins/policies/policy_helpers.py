"""Helpers for the selection-policy tests: instances, a router stand-in, loopback servers."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from fdcore.plugins import load_plugins
from fdcore.registry import Registry
from fdcore.testing import free_port
from fdcore.testing.policies import (  # the plugin author's kit; re-exported for these tests
    Sent,
    SimRouter,
    StaticInstances,
    make_instances,
)
from fdcore.types import Instance, PolicyContext, Role, RouteRequest

__all__ = ["Sent", "SimRouter", "StaticInstances", "build_policy", "make_instances", "request"]


def build_policy(
    name: str,
    instances: Sequence[Instance],
    config: dict[str, Any] | None = None,
    prometheus: CollectorRegistry | None = None,
    role: Role = Role.MIXED,
) -> Any:
    """Build a policy from the default registry with its ``Config`` validated directly, so a
    bad option raises pydantic's ValidationError (``fdcore.testing.policies.build_policy``
    goes through the router's option validator instead)."""
    cls = _registry().get("policy", name).cls
    context = PolicyContext(StaticInstances(instances), role, prometheus)
    return cls(cls.Config.model_validate(config or {}), context)


@functools.cache
def _registry() -> Registry:
    return load_plugins("default").registry


def request(prompt: str = "", request_id: str = "r") -> RouteRequest:
    """A request whose token estimate is its prompt length, as the router computes it."""
    return RouteRequest(request_id, "/v1/chat/completions", prompt, {}, len(prompt))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LoopbackServer:
    """An aiohttp server on a free loopback port whose behaviour a test switches.

    ``mode`` is ``"ok"`` (``respond`` answers), ``"error"`` (HTTP 500) or ``"hang"`` (never
    answers until the server is closed), so timeouts are provoked without sleeping.
    """

    def __init__(self, path: str, method: str, respond: Handler) -> None:
        self.port = free_port()
        self.mode = "ok"
        self.hits = 0
        self._respond = respond
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_route(method, path, self._handle)
        self._runner = web.AppRunner(app)

    async def start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        self._closing.set()
        await self._runner.cleanup()

    async def _handle(self, req: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.mode == "error":
            return web.Response(status=500, text="boom")
        if self.mode == "hang":
            await self._closing.wait()
            return web.Response(status=503)
        return await self._respond(req)


class MetricsServer(LoopbackServer):
    """Serves ``text`` as Prometheus exposition at ``/metrics``."""

    def __init__(self, text: str = "") -> None:
        self.text = text
        super().__init__("/metrics", "GET", self._metrics)

    async def _metrics(self, req: web.Request) -> web.StreamResponse:
        return web.Response(text=self.text, content_type="text/plain")


def fd_metrics(running: float, waiting: float) -> str:
    """A FastDeploy-style /metrics page with the two gauges the policies read."""
    return (
        "# HELP fastdeploy:num_requests_running Running requests\n"
        "# TYPE fastdeploy:num_requests_running gauge\n"
        f"fastdeploy:num_requests_running {running}\n"
        "# HELP fastdeploy:num_requests_waiting Waiting requests\n"
        "# TYPE fastdeploy:num_requests_waiting gauge\n"
        f"fastdeploy:num_requests_waiting {waiting}\n"
        "fastdeploy:time_to_first_token_seconds_bucket{le=\"0.1\"} 3\n"
    )


def sample_value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value in ``registry`` (0 when absent)."""
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


ALL_POLICIES = (
    "random",
    "round_robin",
    "power_of_two",
    "process_tokens",
    "request_num",
    "fd_metrics_score",
    "fd_remote_metrics_score",
    "cache_aware",
    "remote_cache_aware",
)
