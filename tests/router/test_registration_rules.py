"""Registration rules: allowed networks, never the router itself, one instance across host
aliases, guarded role and port changes, removal after long ill health, nothing leaked back."""

from __future__ import annotations

import types
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import pytest
from aiohttp import web

from fdcore.config import ManagerConfig, RouterConfig, load_router_config
from fdcore.engine.registration import advertised_ip
from fdcore.errors import StartupError
from fdcore.http import APIError
from fdcore.router import addresses, health
from fdcore.router.addresses import RegistrationRules
from fdcore.router.health import HealthManager
from fdcore.router.instances import InstanceRegistry
from fdcore.router.payload import parse_instance
from fdcore.testing import free_port
from fdcore.testing.cluster import BackendFactory
from fdcore.types import EmptyConfig, Instance, StrictModel
from tests.router.conftest import Router, RouterFactory, wait_until


def test_allowed_networks_are_checked_at_load(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("manager:\n  register-allow-networks: [10.0.0.0/8, 10.0.0.1/8, nowhere]\n")
    with pytest.raises(StartupError) as exc:
        load_router_config(path, environ={})
    assert str(exc.value).splitlines() == [
        f"{path}: manager.register-allow-networks.1: not a network such as 10.0.0.0/8: "
        "10.0.0.1/8 has host bits set",
        f"{path}: manager.register-allow-networks.2: not a network such as 10.0.0.0/8: "
        "'nowhere' does not appear to be an IPv4 or IPv6 network",
    ]


async def test_a_host_outside_the_allowed_networks_gets_403(
    backends: BackendFactory, router: RouterFactory
) -> None:
    (a,) = backends(1)
    closed = router(manager={"register-allow-networks": ["10.0.0.0/8"]})
    for host in ("127.0.0.1", "localhost"):
        status, body, _ = await closed.post("/register", a.payload(host_ip=host))
        assert status == 403
        assert body["code"] == 403 and "outside the networks allowed" in body["msg"]
        assert body["error"]["type"] == "permission_error"
    assert await closed.instances() == []
    open_ = router(manager={"register-allow-networks": ["10.0.0.0/8", "127.0.0.0/8"]})
    assert (await open_.post("/register", a.payload(host_ip="localhost")))[0] == 200


async def test_every_resolved_address_must_be_inside(monkeypatch: pytest.MonkeyPatch) -> None:
    async def two_homes(host: str) -> frozenset[str]:
        return frozenset({"10.1.2.3", "192.168.1.9"})

    monkeypatch.setattr(addresses, "resolve", two_homes)
    config = RouterConfig.model_validate({"manager": {"register-allow-networks": ["10.0.0.0/8"]}})
    with pytest.raises(APIError) as exc:
        await RegistrationRules(config).check("dual.example", 8000)
    assert exc.value.status == 403 and "192.168.1.9" in exc.value.message


async def test_the_router_refuses_to_register_itself(router: RouterFactory) -> None:
    r = router()
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "0.0.0.0", advertised_ip("0.0.0.0")):
        status, body, _ = await r.post("/register", {"role": "mixed", "host_ip": host,
                                                     "port": r.port})
        assert (status, body["msg"]) == (400, "cannot register the router itself"), host
    assert await r.instances() == []


async def test_host_aliases_are_one_instance(backends: BackendFactory, router: RouterFactory) -> None:
    (a,) = backends(1)
    r = router()
    assert (await r.post("/register", a.payload(host_ip="127.0.0.1")))[0] == 200
    assert (await r.post("/register", a.payload(host_ip="localhost")))[0] == 200
    (only,) = await r.instances()
    assert only["url"] == a.url  # the first-registered url stays
    status, body, _ = await r.post("/deregister", {"host_ip": "localhost", "port": a.port})
    assert (status, body["msg"]) == (200, "Deregister success")
    assert await r.instances() == []
    status, body, _ = await r.post("/deregister", {"host_ip": "127.0.0.1", "port": a.port})
    assert status == 404 and body["msg"] == f"not registered: {a.url}"


async def test_role_and_port_changes_of_a_live_instance_are_guarded(
    backends: BackendFactory, router: RouterFactory
) -> None:
    (a,) = backends(1)
    r = router(args=["--splitwise"])
    assert (await r.post("/register", a.payload(role="prefill", connector_port=8103)))[0] == 200
    for change in ({"role": "decode"}, {"connector_port": 9999}, {"metrics_port": 1},
                   {"rdma_ports": [7100]}, {"engine_worker_queue_port": 1}):
        status, body, _ = await r.post("/register", a.payload(**{"role": "prefill",
                                                                 "connector_port": 8103,
                                                                 **change}))
        assert status == 409, change
        assert "needs the admin key" in body["msg"]
    (kept,) = await r.instances()
    assert (kept["worker_type"], kept["connector_port"]) == ("prefill", "8103")
    # Once the instance is unhealthy (an engine restarted in another role), it may change.
    await a.post("/test/health", {"ok": False})
    await wait_until(lambda: _first_healthy(r, False))
    assert (await r.post("/register", a.payload(role="decode")))[0] == 200
    assert (await r.instances())[0]["worker_type"] == "decode"


async def test_the_admin_key_may_change_a_live_instance(backends: BackendFactory, router: RouterFactory) -> None:
    (a,) = backends(1)
    r = router(args=["--splitwise"], auth={"admin-key": "adm"})
    key = {"Authorization": "Bearer adm"}
    assert (await r.post("/register", a.payload(role="prefill"), headers=key))[0] == 200
    assert (await r.post("/register", a.payload(role="decode"), headers=key))[0] == 200
    async with aiohttp.ClientSession(headers=key) as s, s.get(r.url + "/registered") as resp:
        assert [w["worker_type"] for w in (await resp.json())["decode"]] == ["decode"]


async def test_long_unhealthy_instances_are_removed(backends: BackendFactory, router: RouterFactory) -> None:
    a, b = backends(2)
    r = router([a, b], manager={"remove-unhealthy-after-secs": 0.5})
    await r.wait_healthy(2)
    await a.post("/test/health", {"ok": False})
    await wait_until(lambda: _urls_are(r, {b.url}))
    assert '"instance removed"' in r.proc.output()
    # It comes back by registering again.
    await a.post("/test/health", {"ok": True})
    assert (await r.post("/register", a.payload()))[0] == 200


class Failing:
    """A health-check plugin that always fails."""

    name: ClassVar[str] = "failing"
    Config: ClassVar[type[StrictModel]] = EmptyConfig

    async def start(self) -> None:
        """Nothing to open."""

    async def stop(self) -> None:
        """Nothing to close."""

    async def check(self, instance: Instance) -> tuple[bool, str]:
        """Always a failure."""
        return False, "down"


def _failing(after: float, monkeypatch: pytest.MonkeyPatch) -> tuple[HealthManager, Instance,
                                                                     list[float]]:
    registry = InstanceRegistry()
    instance, _ = registry.upsert(
        parse_instance({"role": "mixed", "host_ip": "127.0.0.1", "port": 8000}), healthy=True
    )
    clock = [1000.0]
    monkeypatch.setattr(health, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    config = ManagerConfig.model_validate({"remove-unhealthy-after-secs": after})
    return HealthManager(registry, Failing(), config), instance, clock


async def test_removal_waits_for_the_configured_time(monkeypatch: pytest.MonkeyPatch) -> None:
    manager, instance, clock = _failing(60, monkeypatch)
    await manager.check_all()
    clock[0] += 59.9
    await manager.check_all()
    assert manager.registry.get(instance.url) is instance
    clock[0] += 0.1
    await manager.check_all()
    assert manager.registry.get(instance.url) is None
    assert instance.url not in manager.streaks


async def test_zero_keeps_unhealthy_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    manager, instance, clock = _failing(0, monkeypatch)
    for _ in range(3):
        await manager.check_all()
        clock[0] += 10_000
    assert manager.registry.get(instance.url) is instance


@dataclass
class Banner:
    """Where the banner instance listens."""

    port: int

    @property
    def url(self) -> str:
        """Its url."""
        return f"http://127.0.0.1:{self.port}"

    def payload(self) -> dict[str, Any]:
        """Its register payload."""
        return {"role": "mixed", "host_ip": "127.0.0.1", "port": self.port}


@pytest.fixture
async def banner_instance() -> AsyncIterator[Banner]:
    """A real HTTP instance that is healthy but answers abort calls with a non-JSON banner."""

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def abort(request: web.Request) -> web.Response:
        return web.Response(status=500, text="nginx/1.2.3 internal host db-7.corp secret")

    app = web.Application()
    app.add_routes([web.get("/health", health), web.post("/v1/abort_requests", abort)])
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield Banner(port)
    await runner.cleanup()


async def test_instance_banners_and_probe_details_stay_in_the_log(
    banner_instance: Banner, router: RouterFactory
) -> None:
    r = router()
    status, body, _ = await r.post("/register", {"role": "mixed", "host_ip": "127.0.0.1",
                                                 "port": 9})
    assert (status, body["msg"]) == (503, "service is not healthy: http://127.0.0.1:9")
    assert (await r.post("/register", banner_instance.payload()))[0] == 200
    status, body, _ = await r.post("/v1/abort_requests", {"abort_all": True})
    assert status == 200
    assert body["instances"] == {banner_instance.url: [
        {"status": 500, "response": "the instance's answer is not JSON"}]}
    assert "nginx/1.2.3" in r.proc.output()


@pytest.mark.parametrize("path", ["/health/", "/registered/", "/v1/models/"])
async def test_no_redirect_reflects_the_host_header(router: RouterFactory, path: str) -> None:
    r = router()
    async with aiohttp.ClientSession() as s, s.get(
        r.url + path, headers={"Host": "evil.example"}, allow_redirects=False
    ) as resp:
        assert resp.status == 404
        assert "location" not in resp.headers
        assert (await resp.json())["error"]["type"] == "not_found"


async def _first_healthy(r: Router, healthy: bool) -> bool:
    instances = await r.instances()
    return bool(instances) and instances[0]["healthy"] is healthy


async def _urls_are(r: Router, urls: set[str]) -> bool:
    return {w["url"] for w in await r.instances()} == urls
