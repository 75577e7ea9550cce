"""fdcore: a pluggable LLM request router, engine and scheduler framework."""

from importlib.metadata import PackageNotFoundError, version

import pluggy

hookimpl = pluggy.HookimplMarker("fdcore")
"""Marker for plugin hook implementations: ``@fdcore.hookimpl``."""

try:
    __version__ = version("fdcore")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__", "hookimpl"]
