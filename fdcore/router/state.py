"""Everything one router app owns, built from config and the plugin registry."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from fdcore.config import RouterConfig, health_check_options, policy_options, read_yaml
from fdcore.drain import Drain
from fdcore.errors import StartupError
from fdcore.options import OptionsError, Validated
from fdcore.plugins import PluginSet
from fdcore.router.addresses import RegistrationRules
from fdcore.router.health import HealthManager
from fdcore.router.instances import InstanceRegistry
from fdcore.router.metrics import RouterMetrics
from fdcore.router.paired import PairedDispatch
from fdcore.router.payload import PayloadError, parse_instance
from fdcore.router.proxy import Proxy
from fdcore.router.selection import Selector
from fdcore.router.stats import StatsLogger
from fdcore.types import HealthContext, InstanceView, PolicyContext, Role, SelectionPolicy

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


def policy_names(config: RouterConfig) -> dict[Role, str]:
    """The policy each role of this router uses, as ``config`` selects them."""
    scheduler = config.scheduler
    if config.server.splitwise:
        return {Role.PREFILL: scheduler.prefill_policy, Role.DECODE: scheduler.decode_policy}
    return {Role.MIXED: scheduler.policy}


def selected_policy_options(config: RouterConfig, plugins: PluginSet) -> Validated:
    """The ``scheduler:`` options of the policy of every role in use, validated at once
    (:func:`fdcore.config.policy_options`); each ignored FastDeploy option is logged."""
    selected = {r: plugins.component("policy", name) for r, name in policy_names(config).items()}
    registered = [c for c in plugins.registry if c.family == "policy"]
    options = policy_options(config, selected, registered)
    for line in options.ignored:
        log.warning("option ignored", detail=line)
    return options


def make_policy(
    config: RouterConfig, plugins: PluginSet, role: Role, instances: InstanceView,
    prometheus: Any, options: Validated | None = None,
) -> SelectionPolicy:
    """Build the policy ``config`` selects for ``role``, its options validated from
    ``scheduler:`` (also what :func:`fdcore.testing.policies.build_policy` calls).
    ``options``: what :func:`selected_policy_options` returned, when the caller has it."""
    options = options or selected_policy_options(config, plugins)
    component = plugins.component("policy", policy_names(config)[role])
    context = PolicyContext(instances=instances, role=role, prometheus=prometheus)
    policy: SelectionPolicy = component.cls(options.configs[component.name], context)
    return policy


def build_state(config: RouterConfig, plugins: PluginSet) -> RouterState:
    """Build policies and the health check from the registry; raises StartupError on bad config."""
    instances = InstanceRegistry()
    metrics = RouterMetrics(instances)
    wanted = policy_names(config)
    manager = config.manager
    check_component = plugins.component("health_check", manager.health_check)
    problems: list[str] = []  # the policies' and the health check's, reported together
    try:
        options = selected_policy_options(config, plugins)
        policies = {role: make_policy(config, plugins, role, instances, metrics.registry, options)
                    for role in wanted}
    except OptionsError as exc:
        problems += exc.lines
    try:
        checks = [c for c in plugins.registry if c.family == "health_check"]
        check_config = health_check_options(config, check_component, checks)
    except OptionsError as exc:
        problems += exc.lines
    if problems:
        raise OptionsError(problems)
    check_cls = check_component.cls
    check = check_cls(
        check_config,
        HealthContext(endpoint=manager.health_check_endpoint,
                      timeout=manager.health_check_timeout_secs, prometheus=metrics.registry),
    )
    owners = {role: plugins.component("policy", name).plugin for role, name in wanted.items()}
    selector = Selector(instances, policies, metrics, config, plugins=owners)
    load_register_file(config, instances)
    drain = Drain()
    proxy = Proxy(selector, metrics, config.proxy, config.server.max_body_bytes, drain=drain,
                  router_keys=bool(config.auth.api_keys or config.auth.admin_key))
    if config.server.splitwise:
        proxy.dispatch = PairedDispatch(proxy, config)
    return RouterState(
        config=config,
        plugins=plugins,
        instances=instances,
        metrics=metrics,
        health=HealthManager(instances, check, manager,
                             plugins.component("health_check", manager.health_check).plugin),
        selector=selector,
        proxy=proxy,
        stats=StatsLogger(instances, config.scheduler.stats_interval_secs),
        drain=drain,
        registration=RegistrationRules(config),
    )
