"""The origin's readers: each follows one of its output streams from the last entry it read.

Entries already read are trimmed off the stream (at most once a second). A read whose reply
was lost (a dropped connection, a Redis restart) is simply read again from the same position,
so a reader that restarts neither loses nor repeats an output (a list popped with ``RPOP``,
FastDeploy's design, loses the batch whose reply never arrived).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, cast

from redis.exceptions import RedisError

from fdcore.redis import Backoff, RedisLink, until_done

_BLOCK_MS = 1000
_TRIM_SECS = 1.0  # read entries are trimmed at most this often (one command, not one per read)


class Reader:
    """Follows stream ``key``; hands each batch of messages to ``on_messages``."""

    def __init__(self, link: RedisLink, key: str, batch: int,
                 on_messages: Callable[[list[bytes]], None]) -> None:
        self.link = link
        self.key = key
        self.batch = batch
        self.on_messages = on_messages
        self.last = "0-0"
        self._trimmed_at = -math.inf

    async def run(self) -> None:
        """Read forever."""
        backoff = Backoff()

        async def read() -> Any:
            return await self.link.blocking.xread({self.key: self.last}, count=self.batch,
                                                  block=_BLOCK_MS)

        while True:
            entries = _entries(await until_done(self.link, backoff, read))
            if not entries:
                continue
            self.last = entries[-1][0]
            self.on_messages([fields[b"m"] for _, fields in entries if b"m" in fields])
            if time.monotonic() - self._trimmed_at >= _TRIM_SECS:
                try:  # what was read goes; entries left over expire with the stream
                    await self.link.client.xtrim(self.key, minid=self.last)
                except RedisError as exc:
                    self.link.down(exc)
                self._trimmed_at = time.monotonic()


def _entries(reply: Any) -> list[tuple[str, dict[bytes, bytes]]]:
    if not reply:
        return []
    _, entries = cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]], reply)[0]
    return [(entry_id.decode(), fields) for entry_id, fields in entries]
