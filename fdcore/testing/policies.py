"""Policy tests without HTTP: a policy built as the router builds it, over static instances.

::

    from fdcore.testing.policies import SimRouter, build_policy, make_instances

    instances = make_instances(3)
    policy = build_policy("pinned", instances, {"pinned-port": 20001},
                          plugins=load_plugins("default", extra=[("pinned", pinned)]))
    router = SimRouter(policy, instances)
    sent = await router.send("a prompt")          # select, checked and counted in
    router.finish(sent, status=200, ttfb=0.05)    # counted out, released once

``build_policy`` validates ``options`` through the router's own option validator and hands the
policy the same :class:`~fdcore.types.PolicyContext`; ``SimRouter`` keeps the router's side of
the contract (counters in on select, out exactly once on release, never negative).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fdcore.config import load_router_config
from fdcore.plugins import PluginSet, load_plugins
from fdcore.router.state import make_policy
from fdcore.types import (
    Instance,
    Outcome,
    RequestResult,
    Role,
    RouteRequest,
    SelectionPolicy,
)


class StaticInstances:
    """An :class:`~fdcore.types.InstanceView` over a fixed list (``items``, editable)."""

    def __init__(self, instances: Sequence[Instance]) -> None:
        self.items = list(instances)

    def instances(self, role: Role | None = None) -> Sequence[Instance]:
        """The instances, optionally of one role."""
        return [i for i in self.items if role is None or i.role == role]


def make_instances(
    count: int, role: Role = Role.MIXED, metrics_ports: Sequence[int] = (),
    first_port: int = 20000,
) -> list[Instance]:
    """``count`` instances on 127.0.0.1 (ports from ``first_port``), in url order, optionally
    with metrics ports."""
    out = []
    for n in range(count):
        port = first_port + n
        metrics_port = metrics_ports[n] if metrics_ports else port
        out.append(Instance(f"http://127.0.0.1:{port}", role, "127.0.0.1", port, metrics_port))
    return out


def build_policy(
    name: str,
    instances: Sequence[Instance] | StaticInstances,
    options: Mapping[str, Any] | None = None,
    prometheus: Any = None,
    role: Role = Role.MIXED,
    plugins: PluginSet | None = None,
) -> Any:
    """Build policy ``name`` as the router does: from the plugin registry (``plugins``,
    default: the default plugins), with ``options`` as they would sit in ``scheduler:`` of
    ``config.yaml`` (kebab-case keys, same validation and errors), over ``instances``."""
    plugins = plugins or _default_plugins()
    key = {Role.MIXED: "policy", Role.PREFILL: "prefill-policy", Role.DECODE: "decode-policy"}
    sections: dict[str, dict[str, Any]] = {"scheduler": {key[role]: name, **(options or {})}}
    if role is not Role.MIXED:
        sections["server"] = {"splitwise": True}
    config = load_router_config(sections=sections, environ={}, source="<build_policy>")
    view = instances if isinstance(instances, StaticInstances) else StaticInstances(instances)
    return make_policy(config, plugins, role, view, prometheus)


_DEFAULT: list[PluginSet] = []


def _default_plugins() -> PluginSet:
    if not _DEFAULT:
        _DEFAULT.append(load_plugins("default"))
    return _DEFAULT[0]


def route_request(prompt: str = "", request_id: str = "r", body: Mapping[str, Any] | None = None,
                  role: Role = Role.MIXED) -> RouteRequest:
    """A chat request whose token estimate is its prompt length, as the router computes it."""
    return RouteRequest(request_id, "chat", prompt, body or {}, len(prompt), role)


@dataclass(slots=True)
class Sent:
    """A request :class:`SimRouter` has sent and not yet finished."""

    request: RouteRequest
    instance: Instance
    done: bool = False


@dataclass
class SimRouter:
    """The router's side of the policy contract, without HTTP.

    :meth:`send` selects over the candidates (default: every instance, sorted by url as the
    router passes them), checks the choice is one of them and counts the request in;
    :meth:`finish` counts it out and calls ``release`` exactly once with a
    :class:`~fdcore.types.RequestResult`. ``chosen`` counts choices per url.
    """

    policy: SelectionPolicy
    instances: Sequence[Instance]
    chosen: dict[str, int] = field(default_factory=dict)
    sent: int = 0

    async def send(
        self, prompt: str = "", candidates: Sequence[Instance] | None = None,
    ) -> Sent:
        """Select an instance for a new request and count it in."""
        pool = sorted(candidates if candidates is not None else self.instances,
                      key=lambda i: i.url)
        req = route_request(prompt, f"r{self.sent}")
        self.sent += 1
        instance = await self.policy.select(req, pool)
        assert any(instance is c for c in pool), "chose an instance outside the candidates"
        instance.load.requests += 1
        instance.load.tokens += req.token_estimate
        self.chosen[instance.url] = self.chosen.get(instance.url, 0) + 1
        return Sent(req, instance)

    def finish(
        self, sent: Sent, outcome: Outcome = Outcome.SUCCESS, status: int = 200,
        streamed: bool = False, ttfb: float | None = None, total: float = 0.0,
        answer: bytes = b"",
    ) -> None:
        """Count ``sent`` out and release it with these result fields (``answer``: a body or
        SSE events carrying ``usage``)."""
        assert not sent.done, "finished twice"
        sent.done = True
        load = sent.instance.load
        load.requests -= 1
        load.tokens -= sent.request.token_estimate
        assert load.requests >= 0 and load.tokens >= 0
        self.policy.release(RequestResult(sent.request, sent.instance, outcome, status,
                                          streamed, ttfb, total, answer))
