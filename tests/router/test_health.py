"""Health manager: thresholds counted across rounds; unhealthy instances leave and come back."""

from __future__ import annotations

from typing import ClassVar

from fdcore.config import ManagerConfig
from fdcore.router.health import HealthManager
from fdcore.router.instances import InstanceRegistry
from fdcore.router.payload import parse_instance
from fdcore.types import EmptyConfig, Instance, Role, StrictModel
from tests.router.conftest import RouterFactory, wait_until

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


class ScriptedCheck:
    """A health-check plugin whose answers the test sets."""

    name: ClassVar[str] = "scripted"
    Config: ClassVar[type[StrictModel]] = EmptyConfig

    def __init__(self) -> None:
        self.ok = True
        self.calls = 0

    async def start(self) -> None:
        """Nothing to open."""

    async def stop(self) -> None:
        """Nothing to close."""

    async def check(self, instance: Instance) -> tuple[bool, str]:
        """Answer what the test said."""
        self.calls += 1
        return self.ok, "scripted"


def _manager(failures: int, successes: int) -> tuple[HealthManager, ScriptedCheck, Instance]:
    registry = InstanceRegistry()
    instance, _ = registry.upsert(
        parse_instance({"role": "mixed", "host_ip": "127.0.0.1", "port": 8000}), healthy=True
    )
    check = ScriptedCheck()
    config = ManagerConfig.model_validate(
        {"health-failure-threshold": failures, "health-success-threshold": successes}
    )
    return HealthManager(registry, check, config), check, instance


async def test_failures_are_counted_across_rounds() -> None:
    manager, check, instance = _manager(failures=3, successes=2)
    check.ok = False
    await manager.check_all()
    await manager.check_all()
    # One probe per round: two failed rounds are not yet three.
    assert check.calls == 2
    assert instance.healthy
    assert manager.registry.healthy(Role.MIXED) == (instance,)
    await manager.check_all()
    assert not instance.healthy
    assert manager.registry.healthy(Role.MIXED) == ()


async def test_a_success_resets_the_failure_streak() -> None:
    manager, check, instance = _manager(failures=2, successes=1)
    for ok in (False, True, False, True, False):
        check.ok = ok
        await manager.check_all()
    assert instance.healthy


async def test_recovery_needs_the_success_threshold() -> None:
    manager, check, instance = _manager(failures=1, successes=3)
    check.ok = False
    await manager.check_all()
    assert not instance.healthy
    check.ok = True
    await manager.check_all()
    await manager.check_all()
    assert not instance.healthy
    await manager.check_all()
    assert instance.healthy
    assert manager.registry.healthy(Role.MIXED) == (instance,)


async def test_wait_rounds_waits_for_completed_rounds() -> None:
    manager, check, _ = _manager(failures=1, successes=1)
    await manager.start()
    try:
        await manager.wait_rounds(2)
        assert check.calls >= 2
    finally:
        await manager.stop()


async def test_unhealthy_instance_leaves_selection_and_comes_back(
    backends, router: RouterFactory
) -> None:
    sick, well = backends(2)
    r = router([sick, well], manager={"health-failure-threshold": 2,
                                      "health-success-threshold": 2})
    await r.wait_healthy(2)
    await sick.post("/test/health", {"ok": False})

    async def sick_out() -> bool:
        return [w["url"] for w in await r.instances() if w["healthy"]] == [well.url]

    await wait_until(sick_out)
    for _ in range(4):
        status, _, headers = await r.post("/v1/chat/completions", CHAT)
        assert status == 200 and headers["x-router-instance-url"] == well.url
    status, body = await r.get("/health_generate")
    assert status == 200
    states = {row["url"]: row["healthy"] for row in body["instances"]}
    assert states == {sick.url: False, well.url: True}
    await sick.post("/test/health", {"ok": True})
    await r.wait_healthy(2)
    served = set()
    for _ in range(4):
        _, _, headers = await r.post("/v1/chat/completions", CHAT)
        served.add(headers["x-router-instance-url"])
    assert served == {sick.url, well.url}


async def test_health_generate_reports_503_when_nothing_can_serve(
    backends, router: RouterFactory
) -> None:
    (only,) = backends(1)
    r = router([only])
    await r.wait_healthy(1)
    assert (await r.get("/health_generate"))[0] == 200
    await only.post("/test/health", {"ok": False})
    status, body = await r.get("/health_generate")
    assert status == 503
    assert body["msg"] == "no healthy mixed instance"
    assert body["instances"][0]["detail"] == "HTTP 503"
    # The router itself is fine.
    status, own = await r.get("/health")
    assert status == 200 and own["status"] == "ok"
