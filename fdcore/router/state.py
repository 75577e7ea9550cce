"""Everything one router app owns, built from config and the plugin registry."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import structlog

from fdcore.config import RouterConfig, option_keys, policy_config, read_yaml
from fdcore.drain import Drain
from fdcore.errors import StartupError
from fdcore.plugins import PluginSet
from fdcore.router.addresses import RegistrationRules
from fdcore.router.health import HealthManager
from fdcore.router.instances import InstanceRegistry
from fdcore.router.metrics import RouterMetrics
from fdcore.router.payload import PayloadError, parse_instance
from fdcore.router.proxy import Proxy
from fdcore.router.selection import Selector
from fdcore.router.stats import StatsLogger
from fdcore.types import HealthContext, PolicyContext, Role, SelectionPolicy

log = structlog.get_logger("fdcore.router")


@dataclass
class RouterState:
    """The router's parts; ``app.state.fdcore`` holds one."""

    config: RouterConfig
    plugins: PluginSet
    instances: InstanceRegistry
    metrics: RouterMetrics
    health: HealthManager
    selector: Selector
    proxy: Proxy
    stats: StatsLogger
    drain: Drain  # set by the server on SIGTERM (fdcore/server.py); read by /health, proxy
    registration: RegistrationRules  # what POST /register checks before the health probe

    http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Start policies, the admin HTTP client, the health loop and the stats log."""
        for policy in self.selector.policies.values():
            await policy.start()
        self.http = aiohttp.ClientSession()
        await self.health.start()
        await self.stats.start()
        await self.proxy.start()

    async def stop(self) -> None:
        """Stop everything started by :meth:`start`."""
        await self.stats.stop()
        await self.health.stop()
        await self.proxy.stop()
        if self.http is not None:
            await self.http.close()
        for policy in self.selector.policies.values():
            await policy.stop()


def load_register_file(config: RouterConfig, instances: InstanceRegistry) -> None:
    """Add the instances of ``manager.register-path`` (relative to the config file)."""
    path = config.manager.register_path
    if not path:
        return
    if not Path(path).is_absolute() and config.source != "<defaults>":
        path = str(Path(config.source).parent / path)
    data = read_yaml(path)
    entries = data.get("instances") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise StartupError(f"{path}: instances: required, a list of register payloads")
    for index, entry in enumerate(entries):
        try:
            instance = parse_instance(entry, time.time())
        except PayloadError as exc:
            raise StartupError(f"{path}: instances[{index}].{exc}") from None
        if (instance.role is Role.MIXED) == config.server.splitwise:
            mode = "splitwise" if config.server.splitwise else "mixed"
            raise StartupError(
                f"{path}: instances[{index}].role: a {instance.role.value} instance cannot "
                f"join a {mode} router"
            )
        # Not in selection until the health manager has seen it answer.
        instances.upsert(instance, healthy=False)
        log.info("instance from register file", instance=instance.url, role=instance.role.value)


def build_state(config: RouterConfig, plugins: PluginSet) -> RouterState:
    """Build policies and the health check from the registry; raises StartupError on bad config."""
    registry = plugins.registry
    instances = InstanceRegistry()
    metrics = RouterMetrics(instances)
    claimed: set[str] = set()
    for name in registry.names("policy"):
        claimed |= option_keys(registry.get("policy", name).cls.Config)
    wanted = (
        {Role.PREFILL: config.scheduler.prefill_policy, Role.DECODE: config.scheduler.decode_policy}
        if config.server.splitwise else {Role.MIXED: config.scheduler.policy}
    )
    policies: dict[Role, SelectionPolicy] = {}
    for role, name in wanted.items():
        cls = registry.get("policy", name).cls
        context = PolicyContext(instances=instances, role=role, prometheus=metrics.registry)
        policies[role] = cls(policy_config(config, cls, claimed), context)
    manager = config.manager
    check_cls = registry.get("health_check", manager.health_check).cls
    try:
        check_config = check_cls.Config.model_validate(manager.health_check_options)
    except Exception as exc:
        raise StartupError(f"{config.source}: manager.health-check-options: {exc}") from None
    check = check_cls(
        check_config,
        HealthContext(endpoint=manager.health_check_endpoint,
                      timeout=manager.health_check_timeout_secs),
    )
    selector = Selector(instances, policies, metrics, config)
    load_register_file(config, instances)
    drain = Drain()
    return RouterState(
        config=config,
        plugins=plugins,
        instances=instances,
        metrics=metrics,
        health=HealthManager(instances, check, manager),
        selector=selector,
        proxy=Proxy(selector, metrics, config.proxy, config.server.max_body_bytes,
                    config.server.splitwise, drain=drain,
                    router_keys=bool(config.auth.api_keys or config.auth.admin_key)),
        stats=StatsLogger(instances, config.scheduler.stats_interval_secs),
        drain=drain,
        registration=RegistrationRules(config),
    )
