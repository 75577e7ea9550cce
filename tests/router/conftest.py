"""The router tests use fdcore.testing's fixtures (``backends``, ``router``); see
fdcore/testing/pytest_plugin.py."""

from fdcore.testing.cluster import Backend, Router, RouterFactory, wait_until

__all__ = ["Backend", "Router", "RouterFactory", "wait_until"]
