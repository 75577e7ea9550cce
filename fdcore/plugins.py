"""Plugin manager factory: entry-point discovery, ``--plugins`` selection, block list.

Nothing here runs at import time: every app (and every test) builds its own manager.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from fdcore import hookspecs
from fdcore.errors import StartupError
from fdcore.registry import Component, Registry

GROUP = "fdcore"
DEFAULT_DISTRIBUTION = "fdcore"
_REGISTER_HOOKS = (
    "fdcore_register_policies",
    "fdcore_register_schedulers",
    "fdcore_register_transports",
    "fdcore_register_health_checks",
)


@dataclass(slots=True)
class PluginInfo:
    """A loaded plugin: where it came from and what it registered."""

    name: str
    distribution: str
    version: str
    module: str
    components: list[Component] = field(default_factory=list)


@dataclass(slots=True)
class PluginSet:
    """The result of loading plugins: the manager, the filled registry and what was loaded."""

    manager: pluggy.PluginManager
    registry: Registry
    plugins: list[PluginInfo]


def parse_plugin_spec(spec: str | Sequence[str]) -> list[str]:
    """Split ``"default,NAME"`` (or a list of such strings) into names, keeping order."""
    items = [spec] if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in items:
        for name in item.split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    return names or ["default"]


def _distribution(ep: EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    if dist is None:
        return "unknown", "unknown"
    return dist.metadata["Name"] or "unknown", dist.version


def _select(wanted: list[str], available: dict[str, EntryPoint]) -> list[EntryPoint]:
    chosen: dict[str, EntryPoint] = {}
    for name in wanted:
        if name == "default":
            for ep_name, ep in available.items():
                if _distribution(ep)[0] == DEFAULT_DISTRIBUTION:
                    chosen.setdefault(ep_name, ep)
        elif name == "all":
            for ep_name, ep in available.items():
                chosen.setdefault(ep_name, ep)
        elif name in available:
            chosen.setdefault(name, available[name])
        else:
            known = ", ".join(sorted(available)) or "none"
            raise StartupError(f"plugin {name!r} is not installed (installed: {known})")
    return list(chosen.values())


def load_plugins(
    spec: str | Sequence[str] = "default",
    block: Iterable[str] = (),
    extra: Sequence[tuple[str, Any]] = (),
) -> PluginSet:
    """Build a plugin manager, load the selected entry points and run the register hooks.

    :param spec: ``"default"``, ``"default,NAME"``, ``"all"`` or plugin names.
    :param block: plugin names never to load, even when selected.
    :param extra: ``(name, module_or_object)`` pairs registered directly (tests, embedding).
    """
    manager = pluggy.PluginManager(GROUP)
    manager.add_hookspecs(hookspecs)
    available = {ep.name: ep for ep in entry_points(group=GROUP)}
    blocked = set(block)
    infos: dict[str, PluginInfo] = {}
    for ep in _select(parse_plugin_spec(spec), available):
        if ep.name in blocked:
            continue
        dist, ver = _distribution(ep)
        try:
            plugin = ep.load()
        except Exception as exc:
            raise StartupError(
                f"plugin {ep.name!r} ({dist} {ver}, {ep.value}) failed to import: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        _register(manager, ep.name, plugin, dist, ver)
        infos[ep.name] = PluginInfo(ep.name, dist, ver, ep.value)
    for name, plugin in extra:
        if name in blocked:
            continue
        _register(manager, name, plugin, "(in process)", "")
        module = getattr(plugin, "__name__", type(plugin).__qualname__)
        infos[name] = PluginInfo(name, "(in process)", "", module)
    registry = Registry()
    for hook_name in _REGISTER_HOOKS:
        hook = getattr(manager.hook, hook_name)
        # Called one implementation at a time so each registration is attributed to its plugin.
        for impl in hook.get_hookimpls():
            info = infos[impl.plugin_name]
            try:
                impl.function(register=registry.register_for(impl.plugin_name))
            except StartupError:
                raise
            except Exception as exc:
                raise StartupError(
                    f"plugin {info.name!r} ({info.distribution} {info.version}) failed in "
                    f"{hook_name}: {type(exc).__name__}: {exc}"
                ) from exc
    for component in registry:
        infos[component.plugin].components.append(component)
    return PluginSet(manager, registry, list(infos.values()))


def _register(manager: pluggy.PluginManager, name: str, plugin: Any, dist: str, ver: str) -> None:
    try:
        manager.register(plugin, name=name)
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        raise StartupError(f"plugin {name!r} ({dist} {ver}) is invalid: {exc}") from exc
