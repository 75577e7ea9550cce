"""The Redis link that Redis-backed schedulers share, and what they send through it.

:class:`RedisConfig` is the connection options a scheduler's config inherits;
:class:`RedisLink` is the connection (two pooled clients) and the health its commands observe;
:class:`Backoff` and :class:`Heartbeat` are how background loops retry a failing Redis; the
codec turns requests and outputs into JSON and back. Only the host's value types are imported
here (no engine, no torch), so any process can use it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, cast

import orjson
import structlog
from pydantic import Field
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from fdcore.errors import StartupError
from fdcore.tasks import wait_event
from fdcore.types import EngineRequest, RequestOutput, SamplingParams, StrictModel

__all__ = [
    "MIN_REDIS_VERSION",
    "Backoff",
    "Heartbeat",
    "RedisConfig",
    "RedisLink",
    "decode_output",
    "decode_request",
    "encode",
    "pop_batch",
    "until_done",
]

log = structlog.get_logger(__name__)
T = TypeVar("T")

# LPOP with a count and SET ... GET.
MIN_REDIS_VERSION = (6, 2)
# Background loops retry a failing Redis this often at first, then at most every 2 s.
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 2.0
# How long a command waits for a free pooled connection. redis-py's default pool raises "Too
# many connections" at once past 100, which failed requests with 503 at 150 concurrent clients;
# a command holds a connection for one round trip, so a short wait almost always suffices.
_POOL_WAIT_SECS = 5.0


class RedisConfig(StrictModel):
    """Where Redis is and how many connections to it a client may hold: the options of every
    Redis-backed scheduler (``--scheduler-host`` ... ``--scheduler-redis-max-connections``)."""

    host: str = Field("127.0.0.1", description="Redis host")
    port: int = Field(6379, ge=1, le=65535, description="Redis port")
    db: int = Field(0, ge=0, description="Redis database number")
    password: str | None = Field(None, description="Redis password; empty: none")
    redis_max_connections: int = Field(
        512, ge=1,
        description="connections per client to Redis at most; a command finding all of them "
                    "busy waits for one (up to 5 s) instead of failing",
    )

    @property
    def redis_password(self) -> str | None:
        """The password to send (FastDeploy's launch line passes ``""`` for none)."""
        return self.password or None

    @property
    def address(self) -> str:
        """``host:port`` for messages."""
        return f"{self.host}:{self.port}"


class RedisLink:
    """Two clients (one for blocking reads and pub/sub) and the health they observe.

    ``owner`` names the user in messages (``scheduler 'global'``). A command that fails after
    redis-py's own reconnect retries marks Redis down (:meth:`down`); the next success marks it
    up (:meth:`up`). ``down_since`` says how long the outage has lasted.
    """

    def __init__(self, config: RedisConfig, owner: str) -> None:
        self.owner = owner
        self.address = config.address
        self.client = _client(config, socket_timeout=5.0)
        self.blocking = _client(config, socket_timeout=None)  # BLPOP and pub/sub wait long
        self.down_since: float | None = None
        self.error = ""

    async def check(self) -> None:
        """Fail start-up with a clear message when Redis is unreachable or too old."""
        try:
            info = await self.client.info("server")
        except RedisError as exc:
            raise StartupError(
                f"{self.owner}: cannot reach Redis at {self.address}: {exc}"
            ) from None
        version = tuple(int(part) for part in str(info["redis_version"]).split(".")[:2])
        if version < MIN_REDIS_VERSION:
            raise StartupError(
                f"{self.owner}: Redis at {self.address} is {info['redis_version']}; "
                f"it needs {'.'.join(map(str, MIN_REDIS_VERSION))} or newer"
            )

    @property
    def healthy(self) -> bool:
        """Whether the last command sent to Redis succeeded."""
        return self.down_since is None

    def health(self) -> str | None:
        """``None`` while Redis answers, else why not: what a scheduler's ``health()`` says."""
        return None if self.down_since is None else self.error

    def up(self) -> None:
        """Note a successful command."""
        if self.down_since is not None:
            log.info("redis.back", owner=self.owner, redis=self.address)
            self.down_since = None

    def down(self, exc: BaseException) -> None:
        """Note a failed command (raises CancelledError if that is what it really was)."""
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # redis-py may turn a cancelled read into a connection error; loops that retry
            # on errors must still stop.
            raise asyncio.CancelledError
        self.error = f"Redis at {self.address} is unreachable: {exc}"
        if self.down_since is None:
            log.warning("redis.down", owner=self.owner, redis=self.address, error=str(exc))
            self.down_since = time.monotonic()

    async def close(self) -> None:
        """Close both clients."""
        await self.client.aclose()
        await self.blocking.aclose()


def _client(config: RedisConfig, socket_timeout: float | None) -> Redis:
    pool = BlockingConnectionPool(
        max_connections=config.redis_max_connections, timeout=_POOL_WAIT_SECS,
        host=config.host, port=config.port, db=config.db, password=config.redis_password,
        socket_connect_timeout=2.0, socket_timeout=socket_timeout,
        # A pooled connection is dead after a Redis restart: reconnect at once, twice.
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return Redis.from_pool(pool)


class Backoff:
    """Exponential waits between retries of a background loop; reset after a success."""

    def __init__(self) -> None:
        self._delay = _BACKOFF_FIRST

    def reset(self) -> None:
        """The last attempt worked."""
        self._delay = _BACKOFF_FIRST

    async def wait(self) -> None:
        """Sleep, then double the next wait (up to a cap)."""
        await asyncio.sleep(self._delay)
        self._delay = min(self._delay * 2, _BACKOFF_MAX)


async def until_done(link: RedisLink, backoff: Backoff, op: Callable[[], Awaitable[T]],
                     on_error: Callable[[], None] | None = None) -> T:
    """``op()``'s result, retried with ``backoff`` while it fails with a Redis error (each
    failure marks ``link`` down and calls ``on_error``, the success marks it up): a
    background loop's one step."""
    while True:
        try:
            result = await op()
        except RedisError as exc:
            link.down(exc)
            if on_error is not None:
                on_error()
            await backoff.wait()
            continue
        link.up()
        backoff.reset()
        return result


class Heartbeat:
    """Runs ``beat`` every ``interval`` seconds; while it fails with a Redis error, retries
    with :class:`Backoff` instead, so this is also the loop that notices Redis is back.

    Other loops that see Redis fail call :meth:`poke` to have it check at once rather than at
    the next beat.
    """

    def __init__(
        self, link: RedisLink, interval: float, beat: Callable[[], Awaitable[None]]
    ) -> None:
        self.link = link
        self.interval = interval
        self.beat = beat
        self._trouble = asyncio.Event()

    def poke(self) -> None:
        """Redis failed elsewhere: beat now."""
        self._trouble.set()

    async def run(self) -> None:
        """Beat forever."""
        backoff = Backoff()
        while True:
            await until_done(self.link, backoff, self.beat)
            self._trouble.clear()
            await wait_event(self._trouble, self.interval)


async def pop_batch(link: RedisLink, key: str, count: int, block_secs: float) -> list[bytes]:
    """Wait up to ``block_secs`` for list ``key``'s head (BLPOP, on the blocking client), then
    take up to ``count`` more at once (LPOP); ``[]`` when nothing came."""
    first = await link.blocking.blpop([key], timeout=block_secs)
    if not first:
        return []
    rest = await link.client.lpop(key, count)
    return [cast(bytes, first[1]), *cast(list[bytes], rest or [])]


# ---------------------------------------------------------------------------------------------
# The wire codec: JSON, with the dataclasses' field names as keys.


def encode(value: EngineRequest | RequestOutput | Mapping[str, Any]) -> bytes:
    """JSON bytes of a request, an output, or a mapping holding them (an envelope)."""
    return orjson.dumps(value)


def decode_request(data: bytes | Mapping[str, Any]) -> EngineRequest:
    """A request from :func:`encode`'s bytes, or from that JSON already parsed."""
    fields = dict(orjson.loads(data) if isinstance(data, bytes) else data)
    fields["sampling"] = SamplingParams(**fields["sampling"])
    return EngineRequest(**fields)


def decode_output(data: bytes | Mapping[str, Any]) -> RequestOutput:
    """An output from :func:`encode`'s bytes, or from that JSON already parsed."""
    return RequestOutput(**(orjson.loads(data) if isinstance(data, bytes) else data))
