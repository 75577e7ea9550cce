"""pytest fixtures for fdcore and plugin authors (a ``pytest11`` entry point loads them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fdcore.plugins import PluginSet, load_plugins
from fdcore.testing.cluster import BackendFactory, EngineFactory, RouterFactory
from fdcore.testing.processes import free_port


@pytest.fixture
def fdcore_plugins() -> PluginSet:
    """A fresh plugin manager with the default plugins loaded (isolated per test)."""
    return load_plugins("default")


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
