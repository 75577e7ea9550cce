"""Plugin API 1.0: hooks through pluggy's binding, the family table, value objects, and the
host guarding itself against a misbehaving policy or health check."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter
from structlog.testing import capture_logs

import fdcore
from fdcore import hookspecs
from fdcore.bases import BaseHealthCheck, BasePolicy
from fdcore.config import load_router_config
from fdcore.errors import StartupError
from fdcore.families import FAMILIES
from fdcore.metrics import once_per_app
from fdcore.plugins import load_plugins
from fdcore.registry import Register
from fdcore.router.app import create_app
from fdcore.router.health import HealthManager
from fdcore.router.instances import InstanceRegistry
from fdcore.testing.asgi import InProcessRouter
from fdcore.testing.cluster import BackendFactory
from fdcore.testing.policies import make_instances
from fdcore.types import (
    EmptyConfig,
    HostInfo,
    Instance,
    Outcome,
    PolicyContext,
    RequestResult,
    RouteRequest,
    Usage,
    parse_usage,
)

CHAT = {"messages": [{"role": "user", "content": "hello"}]}


def logged(logs: list[dict[str, Any]], printed: str, event: str, **fields: str) -> bool:
    """Whether ``event`` with ``fields`` was logged: in structlog's captured entries, or (once
    another test configured fdcore's logging, whose loggers are cached) in the printed lines."""
    entries = list(logs)
    for line in printed.splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
        elif event in line and all(f"{k}={v}" in line for k, v in fields.items()):
            return True
    return any(e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
               for e in entries)


class Plugin:
    """An in-process plugin: its methods marked with ``@fdcore.hookimpl`` are its hooks."""

    def __init__(self, *policies: type) -> None:
        self.policies = policies

    @fdcore.hookimpl
    def fdcore_register_policies(self, register: Register) -> None:
        for cls in self.policies:
            register.add_policy(cls)


# --- hooks through pluggy's binding ---------------------------------------------------------


class NoArguments:
    calls = 0

    @fdcore.hookimpl
    def fdcore_register_policies(self) -> None:
        NoArguments.calls += 1


def test_an_impl_taking_no_arguments_loads() -> None:
    NoArguments.calls = 0
    plugins = load_plugins("default", extra=[("bare", NoArguments())])
    assert NoArguments.calls == 1
    assert any(info.name == "bare" for info in plugins.plugins)


class WantsHost:
    seen: list[HostInfo] = []

    @fdcore.hookimpl
    def fdcore_register_health_checks(self, host: HostInfo, register: Register) -> None:
        WantsHost.seen.append(host)


def test_a_new_hook_argument_reaches_who_declares_it_and_old_impls_ignore_it() -> None:
    WantsHost.seen = []
    # Every default plugin's impl declares only ``register``: they load unchanged.
    plugins = load_plugins("default", extra=[("host", WantsHost())],
                           host=HostInfo("router", fdcore.__version__))
    assert WantsHost.seen == [HostInfo("router", fdcore.__version__)]
    assert "round_robin" in plugins.registry.names("policy")


class Wrapper:
    @fdcore.hookimpl(wrapper=True)
    def fdcore_register_policies(self, register: Register) -> Iterator[None]:
        return (yield)


class OldWrapper:
    @fdcore.hookimpl(hookwrapper=True)
    def fdcore_register_schedulers(self) -> Iterator[None]:
        yield


@pytest.mark.parametrize("plugin", [Wrapper(), OldWrapper()])
def test_a_wrapper_impl_on_a_register_hook_is_refused(plugin: Any) -> None:
    with pytest.raises(StartupError, match=r"plugin 'wrap' .*declared as a wrapper"):
        load_plugins("default", extra=[("wrap", plugin)])


# --- one table of families ------------------------------------------------------------------


def test_the_family_table_is_what_the_hookspecs_and_register_offer() -> None:
    hooks = sorted(name for name in vars(hookspecs) if name.startswith("fdcore_"))
    assert sorted(family.hook for family in FAMILIES) == hooks
    for family in FAMILIES:
        add = getattr(Register, family.add)
        assert add.__annotations__["cls"] == f"type[{family.protocol.__name__}]"
        assert set(family.members()) >= {"start", "stop"}
        assert family.base.__doc__


def test_the_docs_family_table_is_generated_from_the_table() -> None:
    from pathlib import Path

    from fdcore.families import markdown_table

    docs = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    assert markdown_table() in docs


class MissingForget:
    name = "missing_forget"
    Config = EmptyConfig

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def select(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        return candidates[0]
    def release(self, result: RequestResult) -> None: ...


class SyncSelect(BasePolicy[EmptyConfig]):
    name = "sync_select"

    def select(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:  # type: ignore[override]
        return candidates[0]


class NoSelect(BasePolicy[EmptyConfig]):
    name = "no_select"


@pytest.mark.parametrize(("cls", "problem"), [
    (MissingForget, "no forget"),
    (SyncSelect, "select() must be `async def`"),
    (NoSelect, "no select"),
])
def test_conformance_is_checked_against_the_protocol(cls: type, problem: str) -> None:
    with pytest.raises(StartupError) as caught:
        load_plugins("default", extra=[("bad", Plugin(cls))])
    assert "does not follow SelectionPolicy" in str(caught.value)
    assert problem in str(caught.value)


class Broken:
    @fdcore.hookimpl
    def fdcore_register_policies(self, register: Register) -> None:
        raise RuntimeError("half-installed")


def test_a_tolerant_load_lists_a_broken_plugin_with_its_error() -> None:
    plugins = load_plugins("default", extra=[("broken", Broken())], tolerant=True)
    info = next(i for i in plugins.plugins if i.name == "broken")
    assert info.error is not None and "half-installed" in info.error
    assert info.traceback is not None and "RuntimeError" in info.traceback
    assert "round_robin" in plugins.registry.names("policy")
    with pytest.raises(StartupError, match="half-installed"):
        load_plugins("default", extra=[("broken", Broken())])


# --- value objects --------------------------------------------------------------------------


def test_usage_is_read_from_a_body_or_the_last_stream_events() -> None:
    body = (b'{"id":"x","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,'
            b'"prompt_tokens_details":{"cached_tokens":4}}}')
    assert parse_usage(body) == Usage(7, 3, 4)
    stream = (b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
              b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":5}}\n\n'
              b"data: [DONE]\n\n")
    assert parse_usage(stream) == Usage(2, 5, 0)
    assert parse_usage(b'{"choices":[]}') is None
    assert parse_usage(b'data: {"usage": broken') is None


class Recording(BasePolicy[EmptyConfig]):
    """Picks the first candidate and keeps every release result."""

    name = "recording"
    results: list[RequestResult] = []

    async def select(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        return candidates[0]

    def release(self, result: RequestResult) -> None:
        Recording.results.append(result)


async def test_release_gets_what_the_router_measured(backends: BackendFactory) -> None:
    Recording.results = []
    [backend] = backends(1)
    plugins = load_plugins("default", extra=[("rec", Plugin(Recording))])
    async with InProcessRouter({"scheduler": {"policy": "recording"}}, plugins=plugins,
                               instances=[backend.payload()]) as router:
        assert (await router.post("/v1/chat/completions", CHAT)).status == 200
        streamed = await router.post("/v1/chat/completions", {**CHAT, "stream": True})
        assert streamed.status == 200 and streamed.events()
        failed = await router.post("/v1/chat/completions", CHAT, {"x-test-status": "503"})
        assert failed.status == 503
    plain, stream, error = Recording.results
    assert (plain.outcome, plain.status, plain.streamed) == (Outcome.SUCCESS, 200, False)
    assert plain.ttfb is not None and 0 < plain.ttfb <= plain.total
    assert plain.usage == Usage(3, 4, 0)  # what the test backend reports
    assert plain.instance.url == backend.url and plain.request.endpoint == "chat"
    assert (stream.outcome, stream.status, stream.streamed) == (Outcome.SUCCESS, 200, True)
    assert stream.ttfb is not None and stream.ttfb <= stream.total
    assert (error.outcome, error.status, error.streamed) == (Outcome.ERROR, 503, False)


class Raising(BasePolicy[EmptyConfig]):
    """Raises for prompts that say so; returns a stranger for others that say so."""

    name = "raising"

    async def select(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        if "raise" in request.prompt:
            raise ValueError("no idea")
        if "stranger" in request.prompt:
            return make_instances(1, first_port=1)[0]
        return candidates[0]


def chat(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


async def test_a_policy_that_raises_or_strays_costs_one_request(
    backends: BackendFactory, capsys: pytest.CaptureFixture[str],
) -> None:
    [backend] = backends(1)
    plugins = load_plugins("default", extra=[("shaky", Plugin(Raising))])
    async with InProcessRouter({"scheduler": {"policy": "raising"}}, plugins=plugins,
                               instances=[backend.payload()]) as router:
        with capture_logs() as logs:
            raised = await router.post("/v1/chat/completions", chat("please raise"))
        assert raised.status == 500
        message = raised.json()["error"]["message"]
        assert "'raising'" in message and "plugin 'shaky'" in message and "no idea" in message
        assert logged(logs, capsys.readouterr().out, "policy select failed", plugin="shaky")
        strayed = await router.post("/v1/chat/completions", chat("a stranger"))
        assert strayed.status == 500
        assert "not one of the candidates" in strayed.json()["error"]["message"]
        # The router keeps serving, and no counter leaked.
        assert (await router.post("/v1/chat/completions", chat("fine"))).status == 200
        [instance] = router.state.instances.instances()
        assert instance.load.requests == 0 and not router.state.selector.inflight


# --- health checks are bounded by the host ----------------------------------------------------


class Stubborn(BaseHealthCheck[EmptyConfig]):
    """Never returns, and swallows the first cancellation."""

    name = "stubborn"
    release = asyncio.Event()

    async def check(self, instance: Instance) -> tuple[bool, str]:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await Stubborn.release.wait()
        return True, "late"


class Raises(BaseHealthCheck[EmptyConfig]):
    name = "raises"

    async def check(self, instance: Instance) -> tuple[bool, str]:
        raise OSError("socket trouble")


def manager_config(timeout: float) -> Any:
    return load_router_config(None, overrides={"manager": {"health-check-timeout-secs": timeout}},
                              environ={}).manager


async def test_a_check_that_never_returns_is_bounded_by_the_host() -> None:
    registry = InstanceRegistry()
    [instance] = make_instances(1)
    health = HealthManager(registry, Stubborn(EmptyConfig(), None), manager_config(0.05),  # type: ignore[arg-type]
                           plugin="mine")
    ok, detail = await health.probe(instance)
    assert not ok and "timed out after 0.05s" in detail
    Stubborn.release.set()  # let the abandoned check finish
    while health._abandoned:
        await asyncio.sleep(0)


async def test_a_check_that_raises_is_a_failure_logged_with_its_plugin(
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = InstanceRegistry()
    [instance] = make_instances(1)
    health = HealthManager(registry, Raises(EmptyConfig(), None), manager_config(5),  # type: ignore[arg-type]
                           plugin="mine")
    with capture_logs() as logs:
        ok, detail = await health.probe(instance)
    assert not ok and "OSError: socket trouble" in detail
    assert logged(logs, capsys.readouterr().out, "health check raised", plugin="mine",
                  check="raises")


# --- metrics once per app ----------------------------------------------------------------------


class Counting(BasePolicy[EmptyConfig]):
    """Makes its collectors the documented way."""

    name = "counting"

    def __init__(self, config: EmptyConfig, context: PolicyContext) -> None:
        super().__init__(config, context)
        self.picks = context.metrics_once(make_counter)

    async def select(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        self.picks.labels(self.context.role.value).inc()
        return candidates[0]


def make_counter(registry: CollectorRegistry | None) -> Counter:
    return Counter("example_picks", "Picks by role", ["role"], registry=registry)


def test_two_policies_of_one_class_in_a_splitwise_router_share_their_collectors() -> None:
    plugins = load_plugins("default", extra=[("counting", Plugin(Counting))])
    for policy in ("counting", "cache_aware"):
        config = load_router_config(None, overrides={
            "server": {"splitwise": True},
            "scheduler": {"prefill-policy": policy, "decode-policy": policy},
        }, environ={})
        app = create_app(config, plugins)  # two policies of one class: no duplicate metric
        policies = app.state.fdcore.selector.policies
        assert len(policies) == 2
    registry = CollectorRegistry()
    assert once_per_app(registry, make_counter) is once_per_app(registry, make_counter)


def test_the_docs_examples_are_the_tested_files() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    docs = (root / "docs" / "plugins.md").read_text()
    blocks = re.findall(r"<!-- file: (\S+) -->\n```python\n(.*?)```", docs, re.S)
    assert blocks, "docs/plugins.md quotes no example file"
    for path, text in blocks:
        assert (root / path).read_text() == text, f"docs/plugins.md is out of date with {path}"
