"""Scheduler tests start sim engines with the engine tests' fixtures."""

from __future__ import annotations

from tests.engine.conftest import sim_profile, start_engine

__all__ = ["sim_profile", "start_engine"]
