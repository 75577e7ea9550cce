"""pytest fixtures for fdcore and plugin authors (a ``pytest11`` entry point loads them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fdcore.plugins import PluginSet, load_plugins
from fdcore.testing.cluster import BackendFactory, EngineFactory, RouterFactory
from fdcore.testing.processes import free_port


@pytest.fixture
def fdcore_plugin() -> Any:
    """The plugin under test: override it in your ``conftest.py`` to return your plugin's
    module (or ``(name, module)``); :func:`fdcore_plugins` then loads it beside ``default``.
    The default, ``None``, loads the default plugins only."""
    return None


@pytest.fixture
def fdcore_plugins(fdcore_plugin: Any) -> PluginSet:
    """A fresh plugin set (isolated per test): the default plugins plus
    :func:`fdcore_plugin`, loaded exactly as ``--plugins default,NAME`` would load them."""
    if fdcore_plugin is None:
        return load_plugins("default")
    if isinstance(fdcore_plugin, tuple):
        name, module = fdcore_plugin
    else:
        module = fdcore_plugin
        name = getattr(module, "__name__", type(module).__name__).rsplit(".", 1)[-1]
    return load_plugins("default", extra=[(name, module)])


@pytest.fixture
def unused_port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_port()


@pytest.fixture
def backends() -> Iterator[BackendFactory]:
    """``backends(n)`` starts n OpenAI-compatible test instances; all stop after the test."""
    factory = BackendFactory()
    yield factory
    factory.stop_all()


@pytest.fixture
def router(tmp_path: Path) -> Iterator[RouterFactory]:
    """``router(instances, **sections)`` starts ``fdcore serve``; all stop after the test."""
    factory = RouterFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[EngineFactory]:
    """``engines(n, router=r)`` starts n ``fdcore engine --model sim`` processes (registered
    with router ``r`` if given); all stop after the test."""
    factory = EngineFactory(tmp_path)
    yield factory
    factory.stop_all()
