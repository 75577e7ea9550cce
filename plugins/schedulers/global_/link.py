"""The connection to Redis: clients, whether Redis answers, and how to wait before retrying."""

from __future__ import annotations

import asyncio
import time

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from fdcore.errors import StartupError

from .config import GlobalConfig

log = structlog.get_logger(__name__)

# LPOP with a count and SET ... GET.
MIN_REDIS_VERSION = (6, 2)
# Background loops retry a failing Redis this often at first, then at most every 2 s.
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 2.0
# How long a command waits for a free pooled connection. redis-py's default pool raises "Too
# many connections" at once past 100, which failed requests with 503 at 150 concurrent clients;
# a command holds a connection for one round trip, so a short wait almost always suffices.
_POOL_WAIT_SECS = 5.0


class RedisLink:
    """Two clients (one for blocking reads and pub/sub) and the health they observe.

    A command that fails after redis-py's own reconnect retries marks Redis down; the next
    success marks it up. ``down_since`` says how long the outage has lasted.
    """

    def __init__(self, config: GlobalConfig) -> None:
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
                f"scheduler 'global': cannot reach Redis at {self.address}: {exc}"
            ) from None
        version = tuple(int(part) for part in str(info["redis_version"]).split(".")[:2])
        if version < MIN_REDIS_VERSION:
            raise StartupError(
                f"scheduler 'global': Redis at {self.address} is {info['redis_version']}; "
                f"it needs {'.'.join(map(str, MIN_REDIS_VERSION))} or newer"
            )

    @property
    def healthy(self) -> bool:
        """Whether the last command sent to Redis succeeded."""
        return self.down_since is None

    def up(self) -> None:
        """Note a successful command."""
        if self.down_since is not None:
            log.info("global_scheduler.redis_back", redis=self.address)
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
            log.warning("global_scheduler.redis_down", redis=self.address, error=str(exc))
            self.down_since = time.monotonic()

    async def close(self) -> None:
        """Close both clients."""
        await self.client.aclose()
        await self.blocking.aclose()


def _client(config: GlobalConfig, socket_timeout: float | None) -> Redis:
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
