"""Background-task helpers shared by the router, the engine and plugins."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task (if any) and wait until it has stopped."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds pass; returns whether it is set.

    ``asyncio.timeout`` rather than ``asyncio.wait_for``: on Python 3.11 the latter can
    swallow a cancellation that arrives as the event fires, and a loop then never stops.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()


async def cancel_stubborn(tasks: list[asyncio.Task[Any]], attempts: int = 50,
                          interval: float = 0.1) -> list[str]:
    """Cancel ``tasks`` again and again (every ``interval`` s, ``attempts`` times at most) until
    they have all stopped: a cancellation that lands inside a redis-py command can be
    swallowed by it. Returns the names of those still running (shut-down never hangs on one)."""
    pending = set(tasks)
    for _ in range(attempts):
        if not pending:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=interval)
    return sorted(task.get_name() for task in pending)
