"""The typed component registry that plugin hooks fill and YAML selects from."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from fdcore.errors import StartupError
from fdcore.types import HealthCheck, Scheduler, SelectionPolicy, Transport

Family = Literal["policy", "scheduler", "transport", "health_check"]
FAMILIES: tuple[Family, ...] = ("policy", "scheduler", "transport", "health_check")
# The methods each family's Protocol requires (checked at registration, not per call).
_REQUIRED: dict[Family, tuple[str, ...]] = {
    "policy": ("start", "stop", "select", "release", "forget"),
    "scheduler": (
        "start", "stop", "put_requests", "get_requests", "put_results", "get_results", "abort",
        "get_unhandled_request_num",
    ),
    "transport": ("start", "stop", "send_blocks"),
    "health_check": ("start", "stop", "check"),
}
_PROTOCOLS: dict[Family, type] = {
    "policy": SelectionPolicy,
    "scheduler": Scheduler,
    "transport": Transport,
    "health_check": HealthCheck,
}


@dataclass(frozen=True, slots=True)
class Component:
    """One registered class: its family, name and the plugin that registered it."""

    family: Family
    name: str
    cls: type[Any]
    plugin: str


class Registry:
    """Name -> class maps for every family; a duplicate name is a start-up error."""

    def __init__(self) -> None:
        self._components: dict[Family, dict[str, Component]] = {f: {} for f in FAMILIES}

    def register_for(self, plugin: str) -> Register:
        """The object handed to ``plugin``'s hooks: everything it adds is attributed to it."""
        return Register(self, plugin)

    def add(self, family: Family, cls: type[Any], plugin: str) -> None:
        """Add ``cls`` under ``cls.name``; validate it against the family's Protocol."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise StartupError(f"plugin {plugin!r}: {cls.__qualname__} has no string `name`")
        config = getattr(cls, "Config", None)
        if not (isinstance(config, type) and issubclass(config, BaseModel)):
            raise StartupError(
                f"plugin {plugin!r}: {family} {name!r} needs a pydantic `Config` model"
            )
        missing = [attr for attr in _REQUIRED[family] if not callable(getattr(cls, attr, None))]
        if missing:
            raise StartupError(
                f"plugin {plugin!r}: {family} {name!r} does not follow "
                f"{_PROTOCOLS[family].__name__}: no {', '.join(missing)}"
            )
        existing = self._components[family].get(name)
        if existing is not None:
            raise StartupError(
                f"{family} {name!r} is registered twice: by plugin {existing.plugin!r} "
                f"and by plugin {plugin!r}; block one with --block-plugins"
            )
        self._components[family][name] = Component(family, name, cls, plugin)

    def get(self, family: Family, name: str) -> Component:
        """Look a component up by name; the error lists what is available."""
        try:
            return self._components[family][name]
        except KeyError:
            known = ", ".join(sorted(self._components[family])) or "none"
            label = family.replace("_", " ")
            raise StartupError(f"unknown {label} {name!r} (available: {known})") from None

    def names(self, family: Family) -> list[str]:
        """Registered names of one family, sorted."""
        return sorted(self._components[family])

    def __iter__(self) -> Iterator[Component]:
        for family in FAMILIES:
            yield from self._components[family].values()


class Register:
    """Passed to the ``fdcore_register_*`` hooks; each ``add_*`` registers one class."""

    def __init__(self, registry: Registry, plugin: str) -> None:
        self._registry = registry
        self.plugin = plugin

    def add_policy(self, cls: type[Any]) -> None:
        """Register a :class:`~fdcore.types.SelectionPolicy` class."""
        self._registry.add("policy", cls, self.plugin)

    def add_scheduler(self, cls: type[Any]) -> None:
        """Register a :class:`~fdcore.types.Scheduler` class."""
        self._registry.add("scheduler", cls, self.plugin)

    def add_transport(self, cls: type[Any]) -> None:
        """Register a :class:`~fdcore.types.Transport` class."""
        self._registry.add("transport", cls, self.plugin)

    def add_health_check(self, cls: type[Any]) -> None:
        """Register a :class:`~fdcore.types.HealthCheck` class."""
        self._registry.add("health_check", cls, self.plugin)
