"""The ``global`` scheduler plugin: work stealing between instances over Redis."""

from __future__ import annotations

import fdcore
from fdcore.registry import Register

from .scheduler import GlobalScheduler

__all__ = ["GlobalScheduler"]


@fdcore.hookimpl
def fdcore_register_schedulers(register: Register) -> None:
    """Register ``global``."""
    register.add_scheduler(GlobalScheduler)
