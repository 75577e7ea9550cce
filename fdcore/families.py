"""The one table of component families: hook, Protocol, context and base class of each.

The registry (:mod:`fdcore.registry`), the plugin loader (:mod:`fdcore.plugins`), the
conformance check, the hook meta-test and the docs' family table all read this table; adding a
family is adding a row.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Literal

from fdcore.bases import BaseHealthCheck, BasePolicy, BaseScheduler, BaseTransport
from fdcore.types import (
    HealthCheck,
    HealthContext,
    PolicyContext,
    Scheduler,
    SchedulerContext,
    SelectionPolicy,
    Transport,
    TransportContext,
)

FamilyName = Literal["policy", "scheduler", "transport", "health_check"]


@dataclass(frozen=True, slots=True)
class Family:
    """One family of components and the names it goes by."""

    name: FamilyName
    label: str  # how docs call it
    short: str  # how messages call it
    hook: str  # the register hook in fdcore.hookspecs
    add: str  # the Register method its hook calls
    protocol: type
    context: type | None  # what the host passes the constructor besides the config
    base: type
    selected_by: str  # where a user chooses the component

    def members(self) -> dict[str, bool]:
        """The Protocol's methods, each mapped to whether it is a coroutine function."""
        found: dict[str, bool] = {}
        for klass in reversed(self.protocol.__mro__):
            if klass in (object,) or klass.__module__ in ("typing", "typing_extensions"):
                continue
            for attr, value in vars(klass).items():
                if not attr.startswith("_") and inspect.isfunction(value):
                    found[attr] = inspect.iscoroutinefunction(value)
        return found

    def nonconformities(self, cls: type) -> list[str]:
        """What ``cls`` lacks or gets wrong against the Protocol (empty: it conforms)."""
        missing: list[str] = []
        problems: list[str] = []
        for attr, is_async in self.members().items():
            value = getattr(cls, attr, None)
            if not callable(value) or getattr(value, "_fdcore_required", False):
                missing.append(attr)
            elif is_async and not inspect.iscoroutinefunction(value):
                problems.append(f"{attr}() must be `async def`")
            elif not is_async and inspect.iscoroutinefunction(value):
                problems.append(f"{attr}() must be a plain `def`, not `async def`")
        return ([f"no {', '.join(missing)}"] if missing else []) + problems


FAMILIES: tuple[Family, ...] = (
    Family("policy", "selection policy", "policy", "fdcore_register_policies", "add_policy",
           SelectionPolicy, PolicyContext, BasePolicy,
           "`scheduler.policy` (`prefill-policy`, `decode-policy` in splitwise mode)"),
    Family("scheduler", "scheduler", "scheduler", "fdcore_register_schedulers", "add_scheduler",
           Scheduler, SchedulerContext, BaseScheduler, "`fdcore engine --scheduler-name`"),
    Family("transport", "KV transport", "transport", "fdcore_register_transports", "add_transport",
           Transport, TransportContext, BaseTransport, "`fdcore engine --cache-transfer-protocol`"),
    Family("health_check", "health check", "health check", "fdcore_register_health_checks",
           "add_health_check", HealthCheck, HealthContext, BaseHealthCheck,
           "`manager.health-check`"),
)
BY_NAME: dict[FamilyName, Family] = {family.name: family for family in FAMILIES}


def markdown_table() -> str:
    """The families as the Markdown table ``docs/plugins.md`` shows (a test keeps them equal)."""
    rows = [
        "| family | hook | `Register` method | Protocol | context | base class | selected by |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in FAMILIES:
        context = f"`{f.context.__name__}`" if f.context is not None else "(with PD)"
        rows.append(
            f"| {f.label} | `{f.hook}` | `{f.add}` | `fdcore.types.{f.protocol.__name__}` | "
            f"{context} | `fdcore.bases.{f.base.__name__}` | {f.selected_by} |"
        )
    return "\n".join(rows)
