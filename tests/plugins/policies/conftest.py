"""Fixtures for the selection-policy tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.plugins.policies.policy_helpers import LoopbackServer


@pytest.fixture
async def servers() -> AsyncIterator[Callable[[LoopbackServer], Awaitable[Any]]]:
    """Start loopback servers for a test; all are closed at its end."""
    started: list[LoopbackServer] = []

    async def start(server: LoopbackServer) -> Any:
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.close()
