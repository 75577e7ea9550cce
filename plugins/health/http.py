"""``http``: an instance is healthy when ``GET <url><endpoint>`` answers 200 in time."""

from __future__ import annotations

import aiohttp

import fdcore
from fdcore.bases import BaseHealthCheck
from fdcore.registry import Register
from fdcore.types import EmptyConfig, HealthContext, Instance


class HttpHealthCheck(BaseHealthCheck[EmptyConfig]):
    """FastDeploy's check: HTTP GET on ``manager.health-check-endpoint``, healthy iff 200."""

    name = "http"

    def __init__(self, config: EmptyConfig, context: HealthContext) -> None:
        super().__init__(config, context)
        self._endpoint = context.endpoint
        self._timeout = aiohttp.ClientTimeout(total=context.timeout)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the HTTP client."""
        self._session = aiohttp.ClientSession(timeout=self._timeout)

    async def stop(self) -> None:
        """Close the HTTP client."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check(self, instance: Instance) -> tuple[bool, str]:
        """GET the endpoint; any status but 200, a timeout or a connection error is a failure."""
        if self._session is None:
            await self.start()
        assert self._session is not None
        try:
            async with self._session.get(instance.url + self._endpoint) as resp:
                await resp.read()
                return resp.status == 200, f"HTTP {resp.status}"
        except TimeoutError:
            return False, "timed out"
        except aiohttp.ClientError as exc:
            return False, f"{type(exc).__name__}: {exc}"


@fdcore.hookimpl
def fdcore_register_health_checks(register: Register) -> None:
    """Register ``http``."""
    register.add_health_check(HttpHealthCheck)
