"""Plugin manager factory: entry-point discovery, ``--plugins`` selection, block list.

Nothing here runs at import time: every app (and every test) builds its own manager.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from fdcore import __version__, hookspecs
from fdcore.errors import StartupError
from fdcore.families import BY_NAME, FAMILIES, FamilyName
from fdcore.registry import Component, Registry
from fdcore.types import HostInfo

GROUP = "fdcore"
DEFAULT_DISTRIBUTION = "fdcore"


@dataclass(slots=True)
class PluginInfo:
    """A loaded plugin: where it came from and what it registered."""

    name: str
    distribution: str
    version: str
    module: str
    components: list[Component] = field(default_factory=list)
    error: str | None = None  # why it failed to load (only with ``tolerant=True``)
    traceback: str | None = None


@dataclass(slots=True)
class PluginSet:
    """The result of loading plugins: the manager, the filled registry and what was loaded."""

    manager: pluggy.PluginManager
    registry: Registry
    plugins: list[PluginInfo]
    spec: list[str] = field(default_factory=lambda: ["default"])  # as --plugins named them

    def component(self, family: FamilyName, name: str) -> Component:
        """The component a user selected; when no enabled plugin registers it, the error
        says which installed plugin does and the ``--plugins`` value that enables it."""
        found = self.registry.find(family, name)
        if found is not None:
            return found
        try:
            self.registry.get(family, name)
        except StartupError as exc:
            hint = _enabling_hint(family, name, {info.name for info in self.plugins},
                                  self.spec)
            raise StartupError(f"{exc}{hint}") from None
        raise AssertionError("unreachable")  # pragma: no cover


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
    host: HostInfo | None = None,
    tolerant: bool = False,
) -> PluginSet:
    """Build a plugin manager, load the selected entry points and run the register hooks.

    :param spec: ``"default"``, ``"default,NAME"``, ``"all"`` or plugin names.
    :param block: plugin names never to load, even when selected.
    :param extra: ``(name, module_or_object)`` pairs registered directly (tests, embedding).
    :param host: passed to the hooks' ``host`` argument (default: ``process="cli"``).
    :param tolerant: a plugin that fails to import or register is recorded in its
        :attr:`PluginInfo.error` and left out instead of ending the load (``fdcore plugins``).
    """
    host = host or HostInfo("cli", __version__)
    manager = pluggy.PluginManager(GROUP)
    manager.add_hookspecs(hookspecs)
    available = {ep.name: ep for ep in entry_points(group=GROUP)}
    blocked = set(block)
    infos: dict[str, PluginInfo] = {}
    candidates: list[tuple[PluginInfo, Any]] = []
    for ep in _select(parse_plugin_spec(spec), available):
        if ep.name in blocked:
            continue
        dist, ver = _distribution(ep)
        info = infos[ep.name] = PluginInfo(ep.name, dist, ver, ep.value)
        try:
            plugin = ep.load()
        except Exception as exc:
            _failed(info, tolerant, exc, f"failed to import: {type(exc).__name__}: {exc}")
            continue
        candidates.append((info, plugin))
    for name, plugin in extra:
        if name in blocked:
            continue
        module = getattr(plugin, "__name__", type(plugin).__qualname__)
        info = infos[name] = PluginInfo(name, "(in process)", "", module)
        candidates.append((info, plugin))
    for info, plugin in candidates:
        try:
            _register(manager, info, plugin)
        except StartupError as exc:
            _failed(info, tolerant, exc, str(exc).split(": ", 1)[-1])
    registry = Registry()
    for family in FAMILIES:
        _call_register_hook(manager, family.hook, registry, infos, host, tolerant)
    for component in registry:
        infos[component.plugin].components.append(component)
    return PluginSet(manager, registry, list(infos.values()), parse_plugin_spec(spec))


def describe_plugins(plugins: PluginSet) -> list[dict[str, Any]]:
    """What ``fdcore plugins`` shows: each plugin, its error (if it failed to load) and its
    components with their options (key, type, default, description), JSON-ready."""
    out = []
    for info in plugins.plugins:
        components = []
        for component in info.components:
            options = []
            for name, field_info in component.cls.Config.model_fields.items():
                default = field_info.get_default(call_default_factory=True)
                options.append({
                    "key": field_info.alias or name,
                    "type": _type_name(field_info.annotation),
                    "default": default if _plain(default) else repr(default),
                    "required": field_info.is_required(),
                    "description": field_info.description or "",
                })
            components.append({"family": component.family, "name": component.name,
                               "class": f"{component.cls.__module__}.{component.cls.__qualname__}",
                               "options": options})
        out.append({"name": info.name, "distribution": info.distribution,
                    "version": info.version, "module": info.module, "error": info.error,
                    "traceback": info.traceback, "components": components})
    return out


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, dict))


def _failed(info: PluginInfo, tolerant: bool, exc: BaseException, why: str) -> None:
    """Record (tolerant) or raise a plugin's failure, naming plugin, distribution, version."""
    message = f"plugin {info.name!r} ({info.distribution} {info.version}, {info.module}) {why}"
    if not tolerant:
        raise StartupError(message) from exc
    import traceback

    info.error = why
    info.traceback = "".join(traceback.format_exception(exc))


def _call_register_hook(
    manager: pluggy.PluginManager, hook_name: str, registry: Registry,
    infos: dict[str, PluginInfo], host: HostInfo, tolerant: bool,
) -> None:
    """Call each plugin's implementation of one register hook through pluggy's binding, one
    plugin at a time so that each registration is attributed to its plugin."""
    hook = getattr(manager.hook, hook_name)
    impls = hook.get_hookimpls()
    for impl in impls:
        info = infos[impl.plugin_name]
        if info.error is not None:
            continue
        others = [other.plugin for other in impls if other is not impl]
        caller = manager.subset_hook_caller(hook_name, remove_plugins=others)
        snapshot = list(registry)
        try:
            caller(register=registry.register_for(impl.plugin_name), host=host)
        except Exception as exc:
            why = (str(exc) if isinstance(exc, StartupError)
                   else f"failed in {hook_name}: {type(exc).__name__}: {exc}")
            if not tolerant and isinstance(exc, StartupError):
                raise
            _failed(info, tolerant, exc, why)
            registry.drop_plugin(impl.plugin_name, keep=snapshot)


def _register(manager: pluggy.PluginManager, info: PluginInfo, plugin: Any) -> None:
    """Register ``plugin`` with pluggy; refuse wrapper impls of the register hooks."""
    where = f"plugin {info.name!r} ({info.distribution} {info.version})"
    try:
        manager.register(plugin, name=info.name)
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        manager.unregister(name=info.name)
        raise StartupError(f"{where}: is invalid: {exc}") from exc
    except ValueError as exc:  # e.g. the same module object registered under two names
        raise StartupError(f"{where}: is invalid: {exc}") from exc
    for family in FAMILIES:
        for impl in getattr(manager.hook, family.hook).get_hookimpls():
            if impl.plugin_name == info.name and (impl.hookwrapper or impl.wrapper):
                manager.unregister(name=info.name)
                raise StartupError(
                    f"{where}: {family.hook} is declared as a wrapper (wrapper=True or "
                    "hookwrapper=True); register hooks take plain implementations: drop the "
                    "option from @fdcore.hookimpl"
                )


def _enabling_hint(family: FamilyName, name: str, enabled: set[str], spec: list[str]) -> str:
    """``; it is in plugin P ...`` when an installed plugin that is not enabled registers
    ``name``; "" otherwise."""
    available = {ep.name for ep in entry_points(group=GROUP)} - enabled
    if not available:
        return ""
    others = load_plugins(sorted(available), tolerant=True)
    for info in others.plugins:
        for component in info.components:
            if component.family == family and component.name == name:
                return (f"; {BY_NAME[family].short} {name!r} is registered by plugin "
                        f"{info.name!r} ({info.distribution} {info.version}), which is "
                        f"installed but not enabled: add it with "
                        f"--plugins {','.join([*spec, info.name])} (or plugins.enable "
                        "in config.yaml)")
    return ""
