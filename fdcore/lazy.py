"""A module imported on first use, for plugins that the router loads but only an engine runs.

The default transport plugins live beside the policies and are imported by ``fdcore serve`` and
``fdcore plugins`` too, where the ``engine`` extra (torch, msgpack) may be absent: they bind
``torch = lazy_module("torch")`` (the real import under ``TYPE_CHECKING`` for type checkers),
and the import happens when an engine first touches it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class _LazyModule:
    """Stands in for a module until an attribute is read."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy_module(name: str) -> Any:
    """``name``, imported when one of its attributes is first read."""
    return _LazyModule(name)
