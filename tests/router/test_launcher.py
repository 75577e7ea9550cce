"""``launch:``: the router starts its local engines, they register, and they stop with it."""

from __future__ import annotations

import socket

from fdcore.testing import free_port
from tests.router.conftest import RouterFactory


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def test_launched_engines_register_serve_and_stop_with_the_router(
    router: RouterFactory,
) -> None:
    port = free_port()
    r = router(launch=[{"name": "sim-0", "args": ["--model", "sim", "--host", "127.0.0.1",
                                                  "--port", str(port), "--register-interval",
                                                  "0.5"]}])
    await r.wait_healthy(1, timeout=120)
    assert [w["url"] for w in await r.instances()] == [f"http://127.0.0.1:{port}"]
    status, body, _ = await r.post("/v1/completions", {"prompt": "hi", "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    assert "curl -s http://127.0.0.1:" in r.proc.output()
    assert r.proc.stop() == 0
    assert not _listening(port)


async def test_launched_engines_register_with_the_admin_key(router: RouterFactory) -> None:
    port = free_port()
    r = router(auth={"admin-key": "launch-admin-key"},
               launch=[{"name": "sim-0", "args": ["--model", "sim", "--host", "127.0.0.1",
                                                  "--port", str(port), "--register-interval",
                                                  "0.5"]}])
    r.headers = {"Authorization": "Bearer launch-admin-key"}
    await r.wait_healthy(1, timeout=120)
    status, body, _ = await r.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    assert "launch-admin-key" not in r.proc.output()  # never on a logged command line
    assert r.proc.stop() == 0
