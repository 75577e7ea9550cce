"""The outputs a scheduler holds for this instance's clients until ``get_results`` drains them.

Every scheduler keeps one: ``put_results`` (or a network reader bringing outputs back from
other instances) adds to it, ``abort`` drops a request's outputs, and ``get_results`` is
:meth:`Outbox.drain`.
"""

from __future__ import annotations

import asyncio

from fdcore.tasks import wait_event
from fdcore.types import RequestOutput


class Outbox:
    """Outputs by request id, in arrival order, with a wake-up for a waiting drain."""

    def __init__(self) -> None:
        self._outputs: dict[str, list[RequestOutput]] = {}
        self._ready = asyncio.Event()

    def add(self, output: RequestOutput) -> None:
        """Hold ``output`` for the next drain."""
        self._outputs.setdefault(output.request_id, []).append(output)
        self._ready.set()

    def drop(self, request_id: str) -> None:
        """Forget the outputs held for ``request_id`` (aborted)."""
        self._outputs.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._outputs)

    async def drain(self, timeout: float = 0.0) -> dict[str, list[RequestOutput]]:
        """Everything held since the last drain, waiting up to ``timeout`` seconds for
        something when nothing is held (without losing a cancellation; see
        :func:`fdcore.tasks.wait_event`)."""
        if not self._outputs and timeout > 0:
            self._ready.clear()
            await wait_event(self._ready, timeout)
        outputs, self._outputs = self._outputs, {}
        return outputs
