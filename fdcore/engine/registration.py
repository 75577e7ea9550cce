"""Registration with a router (FastDeploy's RegisterManager): POST /register, again and again.

The periodic re-POST doubles as a heartbeat, so a router that restarts learns the instance
again within one interval. On the way out the engine POSTs ``/deregister`` so the router stops
sending it requests at once rather than after its health checks fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import aiohttp
import structlog

import fdcore
from fdcore.kv import KVLayout
from fdcore.tasks import cancel_and_wait

log = structlog.get_logger(__name__)

_HEALTH_POLL_SECONDS = 0.1
# Stopping must not wait on a router that is gone or wedged.
DEREGISTER_TIMEOUT_SECONDS = 2.0


def advertised_ip(host: str) -> str:
    """The IP a router should use to reach this engine when it listens on ``host``."""
    if host not in ("", "0.0.0.0", "::"):
        with contextlib.suppress(OSError):
            return socket.gethostbyname(host)
        return host
    # Connecting a UDP socket sends nothing; it only picks the outgoing interface.
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("10.255.255.255", 1))
        return str(sock.getsockname()[0])
    return "127.0.0.1"


def register_payload(
    *,
    role: str,
    host_ip: str,
    port: int,
    metrics_port: int,
    connector_port: int,
    engine_worker_queue_port: int,
    transfer_protocol: list[str],
    rdma_ports: list[str],
    device_ids: list[str],
    kv_layout: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """FastDeploy's register body (``init_cache_info`` plus the newer fields), and fdcore's
    ``kv_layout`` (:func:`kv_layout_payload`) so a router can refuse a P-D pair whose caches
    cannot exchange blocks."""
    extra = {} if kv_layout is None else {"kv_layout": kv_layout}
    return {**extra,
        "role": role,
        "host_ip": host_ip,
        "port": port,
        "connector_port": connector_port,
        "engine_worker_queue_port": engine_worker_queue_port,
        "transfer_protocol": transfer_protocol,
        "rdma_ports": rdma_ports,
        "device_ids": device_ids,
        "metrics_port": metrics_port,
        "tp_size": max(1, len(device_ids)),
        "version": fdcore.__version__,
    }


def kv_layout_payload(layout: KVLayout) -> dict[str, Any]:
    """What the register body says of this engine's KV pool: the fields that must match
    between P and D, their fingerprint, and the pool's size."""
    return {
        "model": layout.model, "dtype": layout.dtype, "num_layers": layout.num_layers,
        "kv_heads": layout.kv_heads, "head_dim": layout.head_dim,
        "block_size": layout.block_size, "num_blocks": layout.num_blocks,
        "fingerprint": layout.fingerprint(),
    }


class Registrar:
    """POSTs the payload to ``http://{router}/register`` every ``interval`` seconds, and to
    ``/deregister`` once when stopped.

    The first POST waits until ``health_url`` (this engine's own ``/health``) answers, since a
    router health-checks an instance before accepting it. ``admin_key``, when given, goes with
    every POST as ``Authorization: Bearer``.
    """

    def __init__(
        self, router: str, payload: dict[str, Any], interval: float, health_url: str,
        admin_key: str | None = None,
    ) -> None:
        base = (router if "://" in router else f"http://{router}").rstrip("/")
        self.url = base + "/register"
        self.deregister_url = base + "/deregister"
        self.payload = payload
        self.interval = interval
        self.health_url = health_url
        self.headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start registering in the background."""
        self._task = asyncio.create_task(self._run(), name="fdcore-register")

    async def stop(self) -> None:
        """Stop registering and deregister; waits at most ``DEREGISTER_TIMEOUT_SECONDS`` for
        the router and never raises."""
        await cancel_and_wait(self._task)
        if self._task is None:
            return
        timeout = aiohttp.ClientTimeout(total=DEREGISTER_TIMEOUT_SECONDS)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, session.post(
                self.deregister_url, json=self.payload, headers=self.headers
            ) as resp:
                detail = (await resp.text())[:200]
                ok = resp.status in (200, 404)  # 404: the router had forgotten it already
        except aiohttp.ClientConnectorError:
            # The router is gone or stopping (it stops the engines it launched after closing
            # its listener): nothing is left to deregister from.
            ok, detail = True, "the router is not listening"
        except Exception as exc:  # stopping goes on whatever the router does
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        (log.info if ok else log.warning)(
            "engine.deregister", url=self.deregister_url, ok=ok, detail=detail
        )

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=max(1.0, self.interval))
        registered: bool | None = None  # log the first outcome and every change
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await self._wait_healthy(session)
            while True:
                try:
                    async with session.post(self.url, json=self.payload,
                                            headers=self.headers) as resp:
                        body = await resp.text()
                        ok = resp.status == 200
                except (aiohttp.ClientError, TimeoutError) as exc:
                    ok, body = False, f"{type(exc).__name__}: {exc}"
                if ok != registered:
                    log_event = log.info if ok else log.warning
                    log_event("engine.register", url=self.url, ok=ok, detail=body[:200])
                    registered = ok
                await asyncio.sleep(self.interval)

    async def _wait_healthy(self, session: aiohttp.ClientSession) -> None:
        while True:
            try:
                async with session.get(self.health_url) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(_HEALTH_POLL_SECONDS)
