"""The typed component registry that plugin hooks fill and YAML selects from.

Its families, and what each must provide, come from :data:`fdcore.families.FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from fdcore.errors import StartupError
from fdcore.families import BY_NAME, FAMILIES, FamilyName
from fdcore.types import HealthCheck, Scheduler, SelectionPolicy, Transport

Family = FamilyName  # the name a registry method takes (kept for imports of fdcore 0.1)


@dataclass(frozen=True, slots=True)
class Component:
    """One registered class: its family, name and the plugin that registered it."""

    family: FamilyName
    name: str
    cls: type[Any]
    plugin: str


class Registry:
    """Name -> class maps for every family; a duplicate name is a start-up error."""

    def __init__(self) -> None:
        self._components: dict[FamilyName, dict[str, Component]] = {f.name: {} for f in FAMILIES}

    def register_for(self, plugin: str) -> Register:
        """The object handed to ``plugin``'s hooks: everything it adds is attributed to it."""
        return Register(self, plugin)

    def add(self, family: FamilyName, cls: type[Any], plugin: str) -> None:
        """Add ``cls`` under ``cls.name``; check it against the family's Protocol."""
        spec = BY_NAME[family]
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise StartupError(f"plugin {plugin!r}: {cls.__qualname__} has no string `name`")
        config = getattr(cls, "Config", None)
        if not (isinstance(config, type) and issubclass(config, BaseModel)):
            raise StartupError(
                f"plugin {plugin!r}: {spec.short} {name!r} needs a pydantic `Config` model"
            )
        problems = spec.nonconformities(cls)
        if problems:
            raise StartupError(
                f"plugin {plugin!r}: {spec.short} {name!r} does not follow "
                f"{spec.protocol.__name__}: {', '.join(problems)}"
            )
        existing = self._components[family].get(name)
        if existing is not None:
            raise StartupError(
                f"{spec.short} {name!r} is registered twice: by plugin {existing.plugin!r} "
                f"and by plugin {plugin!r}; block one with --block-plugins"
            )
        self._components[family][name] = Component(family, name, cls, plugin)

    def get(self, family: FamilyName, name: str) -> Component:
        """Look a component up by name; the error lists what is available."""
        try:
            return self._components[family][name]
        except KeyError:
            known = ", ".join(sorted(self._components[family])) or "none"
            raise StartupError(
                f"unknown {BY_NAME[family].short} {name!r} (available: {known})"
            ) from None

    def drop_plugin(self, plugin: str, keep: list[Component]) -> None:
        """Take out what ``plugin`` added after ``keep`` was listed (a hook that failed)."""
        kept = set(keep)
        for components in self._components.values():
            for name, component in list(components.items()):
                if component.plugin == plugin and component not in kept:
                    del components[name]

    def find(self, family: FamilyName, name: str) -> Component | None:
        """The component registered under ``name``, or ``None``."""
        return self._components[family].get(name)

    def names(self, family: FamilyName) -> list[str]:
        """Registered names of one family, sorted."""
        return sorted(self._components[family])

    def __iter__(self) -> Iterator[Component]:
        for family in FAMILIES:
            yield from self._components[family.name].values()


class Register:
    """Passed to the ``fdcore_register_*`` hooks; each ``add_*`` registers one class.

    ``plugin`` is the name of the plugin whose hook holds this object.
    """

    def __init__(self, registry: Registry, plugin: str) -> None:
        self._registry = registry
        self.plugin = plugin

    def add_policy(self, cls: type[SelectionPolicy]) -> None:
        """Register a :class:`~fdcore.types.SelectionPolicy` class."""
        self._registry.add("policy", cls, self.plugin)

    def add_scheduler(self, cls: type[Scheduler]) -> None:
        """Register a :class:`~fdcore.types.Scheduler` class."""
        self._registry.add("scheduler", cls, self.plugin)

    def add_transport(self, cls: type[Transport]) -> None:
        """Register a :class:`~fdcore.types.Transport` class."""
        self._registry.add("transport", cls, self.plugin)

    def add_health_check(self, cls: type[HealthCheck]) -> None:
        """Register a :class:`~fdcore.types.HealthCheck` class."""
        self._registry.add("health_check", cls, self.plugin)
