"""Registration with a router: FastDeploy's payload, heartbeats, re-learning after a restart."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest

from fdcore.testing import free_port
from tests.engine_serving.conftest import Engine


class FakeRouter:
    """A real HTTP server that records every POST /register body."""

    def __init__(self, port: int) -> None:
        self.payloads: queue.Queue[dict[str, Any]] = queue.Queue()
        payloads = self.payloads

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.path == "/register":
                    payloads.put(orjson.loads(body))
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


def test_registers_heartbeats_and_survives_a_router_restart(
    start_engine: Callable[..., Engine], router_port: int
) -> None:
    router = FakeRouter(router_port)
    metrics_port = free_port()
    engine = start_engine(
        "--router", f"127.0.0.1:{router_port}", "--register-interval", "0.2",
        "--metrics-port", str(metrics_port), "--splitwise-role", "prefill",
        "--pd-comm-port", "8201", "--engine-worker-queue-port", "8202",
        "--cache-transfer-protocol", "ipc,rdma", "--rdma-comm-ports", "7100,7101",
        "--device-ids", "0,1",
    )
    try:
        payload = router.payloads.get(timeout=30)
        assert payload == {
            "role": "prefill", "host_ip": "127.0.0.1", "port": engine.port,
            "connector_port": 8201, "engine_worker_queue_port": 8202,
            "transfer_protocol": ["ipc", "rdma"], "rdma_ports": ["7100", "7101"],
            "device_ids": ["0", "1"], "metrics_port": metrics_port, "tp_size": 2,
            "version": payload["version"],
        }
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
