"""Prometheus collectors a component creates once per app.

A router builds several components from one app (in splitwise mode two policies, often of the
same class) and hands them all the app's ``CollectorRegistry``; the registry refuses a second
collector of a name, so collectors made in ``__init__`` would crash the second component. Make
them through :func:`once_per_app` (or a context's ``metrics_once``): the first call in an app
runs the factory, every later call with the same factory and registry returns that result.
Label the series with what tells components apart (policy name, role).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

T = TypeVar("T")

_MADE: WeakKeyDictionary[Any, dict[Callable[[Any], Any], Any]] = WeakKeyDictionary()


def once_per_app(registry: Any, factory: Callable[[Any], T]) -> T:
    """``factory(registry)``, run once per ``registry``; ``None`` (no registry) runs it every
    time, with collectors registered nowhere."""
    if registry is None:
        return factory(None)
    made = _MADE.setdefault(registry, {})
    if factory not in made:
        made[factory] = factory(registry)
    return made[factory]
