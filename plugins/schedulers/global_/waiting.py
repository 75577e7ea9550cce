"""Waiting for an event with a deadline, without losing a cancellation."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds pass; returns whether it is set.

    ``asyncio.timeout`` rather than ``asyncio.wait_for``: on Python 3.11 the latter can
    swallow a cancellation that arrives as the event fires, and a loop then never stops.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()
