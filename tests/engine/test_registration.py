"""Registration with a router: FastDeploy's payload, heartbeats, re-learning after a restart,
the admin key, and deregistration on the way out."""

from __future__ import annotations

import asyncio
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from fdcore.engine import registration
from fdcore.engine.registration import Registrar
from fdcore.kv import KVLayout
from fdcore.testing import ServerProcess, free_port
from fdcore.testing.cluster import RouterFactory
from fdcore.testing.cluster import wait_until as wait_until_async
from fdcore.testing.distributions import plugin_site, pythonpath
from fdcore.testing.processes import python_module
from tests.engine.conftest import Engine


class FakeRouter:
    """A real HTTP server that records every POST /register body, and the ``Authorization``
    header and body of every other POST (``/deregister``) by path."""

    def __init__(self, port: int) -> None:
        self.payloads: queue.Queue[dict[str, Any]] = queue.Queue()
        self.posts: queue.Queue[tuple[str, str | None, dict[str, Any]]] = queue.Queue()
        payloads, posts = self.payloads, self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.path == "/register":
                    payloads.put(orjson.loads(body))
                posts.put((self.path, self.headers.get("authorization"), orjson.loads(body)))
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def router_port() -> Iterator[int]:
    yield free_port()


# This machine has no RDMA device, so the default rdma transport cannot start: a stand-in that
# registers the same name (the default blocked) lets the engine start and register.
FAKE_RDMA = """
import fdcore
from fdcore.bases import BaseTransport


class NoNicRdma(BaseTransport):
    name = "rdma"

    async def expose(self):
        return {}

    async def connect(self, handle):
        raise RuntimeError("no RDMA device here")


@fdcore.hookimpl
def fdcore_register_transports(register):
    register.add_transport(NoNicRdma)
"""


def test_registers_heartbeats_and_survives_a_router_restart(
    start_engine: Callable[..., Engine], router_port: int, tmp_path: Path
) -> None:
    router = FakeRouter(router_port)
    metrics_port, pd_port = free_port(), free_port()
    site = plugin_site(tmp_path / "site", "fdcore-no-nic-rdma", {"no_nic_rdma": "no_nic_rdma"},
                       {"no_nic_rdma": FAKE_RDMA})
    engine = start_engine(
        "--router", f"127.0.0.1:{router_port}", "--register-interval", "0.2",
        "--metrics-port", str(metrics_port), "--splitwise-role", "prefill",
        "--pd-comm-port", str(pd_port), "--engine-worker-queue-port", "8202",
        "--cache-transfer-protocol", "ipc,rdma", "--rdma-comm-ports", "7100,7101",
        "--device-ids", "0,1", "--plugins", "default,no_nic_rdma", "--block-plugins", "rdma",
        env={"PYTHONPATH": pythonpath(site)},
    )
    try:
        payload = router.payloads.get(timeout=30)
        assert payload == {
            "role": "prefill", "host_ip": "127.0.0.1", "port": engine.port,
            "connector_port": pd_port, "engine_worker_queue_port": 8202,
            "transfer_protocol": ["ipc", "rdma"], "rdma_ports": ["7100", "7101"],
            "device_ids": ["0", "1"], "metrics_port": metrics_port, "tp_size": 2,
            "version": payload["version"],
            # issue 10: the KV pool's layout, so a router can refuse an incompatible pair
            "kv_layout": {"model": "sim", "dtype": "int64", "num_layers": 2, "kv_heads": 1,
                          "head_dim": 2, "block_size": payload["kv_layout"]["block_size"],
                          "num_blocks": payload["kv_layout"]["num_blocks"],
                          "fingerprint": payload["kv_layout"]["fingerprint"]},
        }
        layout = payload["kv_layout"]
        assert layout["fingerprint"] == KVLayout(
            num_layers=2, num_blocks=layout["num_blocks"], kv_heads=1,
            block_size=layout["block_size"], head_dim=2, dtype="int64", model="sim",
        ).fingerprint()
        assert router.payloads.get(timeout=30) == payload  # the heartbeat re-POST
    finally:
        router.close()
    restarted = FakeRouter(router_port)
    try:
        assert restarted.payloads.get(timeout=30)["port"] == engine.port
    finally:
        restarted.close()
    metrics = Engine(engine.proc, metrics_port).metrics()
    assert "fastdeploy:num_requests_running" in metrics


def test_the_admin_key_goes_with_register_and_deregister(sim_profile: Path,
                                                         router_port: int) -> None:
    router = FakeRouter(router_port)
    port = free_port()
    proc = ServerProcess(
        python_module("fdcore.engine", "--model", "sim", "--sim-profile", str(sim_profile),
                      "--host", "127.0.0.1", "--port", str(port),
                      "--router", f"127.0.0.1:{router_port}", "--register-interval", "60"),
        ready_url=f"http://127.0.0.1:{port}/health",
        env={"FDCORE_ROUTER_ADMIN_KEY": "0123"},  # verbatim: YAML would read the number 83
    )
    try:
        proc.start()
        path, auth, payload = router.posts.get(timeout=30)
        assert (path, auth, payload["port"]) == ("/register", "Bearer 0123", port)
        assert proc.stop() == 0
        path, auth, body = router.posts.get(timeout=30)
        assert (path, auth, body) == ("/deregister", "Bearer 0123", payload)
    finally:
        proc.stop()
        router.close()


async def test_a_stopping_engine_leaves_a_real_router(
    start_engine: Callable[..., Engine], router: RouterFactory
) -> None:
    r = router(auth={"admin-key": "adm"})
    engine = start_engine("--router", f"127.0.0.1:{r.port}", "--router-admin-key", "adm",
                          "--register-interval", "0.2")
    key = {"Authorization": "Bearer adm"}

    async def urls() -> list[str]:
        async with aiohttp.ClientSession(headers=key) as s, s.get(r.url + "/registered") as resp:
            return [w["url"] for w in (await resp.json())["mixed"]]

    async def registered() -> bool:
        return await urls() == [engine.url]

    await wait_until_async(registered)
    # The engine app answers a stray slash with a 404, never a redirect to the sent Host.
    status, body = engine.request("GET", "/health/", headers={"Host": "evil.example"})
    assert status == 404 and "error" in body
    assert engine.proc.stop() == 0
    assert await urls() == []  # gone at once, not after failed health checks


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


async def test_stop_never_hangs_or_raises(black_hole: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registration, "DEREGISTER_TIMEOUT_SECONDS", 0.2)
    for router in (f"127.0.0.1:{black_hole}", f"127.0.0.1:{free_port()}", "no-such-host.invalid:1"):
        registrar = Registrar(router, {"host_ip": "127.0.0.1", "port": 1}, 60,
                              f"http://127.0.0.1:{free_port()}/health", admin_key="k")
        await registrar.start()
        # The deadline only bounds a broken run; the timeout inside stop() is what ends it.
        await asyncio.wait_for(registrar.stop(), 30)
