"""The ``splitwise`` scheduler plugin: prefill/decode disaggregation over Redis, no router."""

from __future__ import annotations

import fdcore
from fdcore.registry import Register

from .scheduler import SplitwiseScheduler

__all__ = ["SplitwiseScheduler"]


@fdcore.hookimpl
def fdcore_register_schedulers(register: Register) -> None:
    """Register ``splitwise``."""
    register.add_scheduler(SplitwiseScheduler)
