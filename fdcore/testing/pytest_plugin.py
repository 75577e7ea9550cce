"""pytest fixtures for fdcore and plugin authors (a ``pytest11`` entry point loads them)."""

from __future__ import annotations

import pytest

from fdcore.plugins import PluginSet, load_plugins
from fdcore.testing.processes import free_port


@pytest.fixture
def fdcore_plugins() -> PluginSet:
    """A fresh plugin manager with the default plugins loaded (isolated per test)."""
    return load_plugins("default")


@pytest.fixture
def unused_port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_port()
