"""``/register`` with FastDeploy's payload, heartbeats, and the registry views."""

from __future__ import annotations

import pytest

from tests.router.conftest import RouterFactory


async def test_register_accepts_fastdeploy_payloads(backends, router: RouterFactory) -> None:
    a, b = backends(2)
    r = router()
    full = {
        "role": 0, "host_ip": "127.0.0.1", "port": str(a.port), "connector_port": "8103",
        "engine_worker_queue_port": 8104, "transfer_protocol": ["ipc", "rdma"],
        "rdma_ports": [7100, "7101"], "device_ids": [0, "1"], "metrics_port": str(a.port),
        "version": "2.3", "tp_size": 2,
    }
    status, body, _ = await r.post("/register", full)
    assert (status, body["code"], body["msg"]) == (200, 200, "Register success")
    status, _, _ = await r.post("/register", {"role": "MIXED", "host_ip": "127.0.0.1",
                                              "port": b.port})
    assert status == 200
    status, counts = await r.get("/registered_number")
    assert counts == {"mixed": 2, "prefill": 0, "decode": 0}
    _, listing = await r.get("/registered")
    first = next(w for w in listing["mixed"] if w["url"] == a.url)
    assert first["worker_type"] == "mixed"
    assert first["connector_port"] == "8103"
    assert first["engine_worker_queue_port"] == "8104"
    assert first["transfer_protocol"] == ["ipc", "rdma"]
    assert first["rdma_ports"] == ["7100", "7101"]
    assert first["device_ids"] == ["0", "1"]
    assert first["metrics_port"] == str(a.port)
    assert first["healthy"] is True


async def test_reregistration_is_a_heartbeat_that_updates(backends, router: RouterFactory) -> None:
    (a,) = backends(1)
    r = router()
    assert (await r.post("/register", a.payload(device_ids=[0])))[0] == 200
    (first,) = await r.instances()
    # Ports and role are guarded on a live instance (tests/router/test_registration_rules.py).
    assert (await r.post("/register", a.payload(device_ids=[0, 1])))[0] == 200
    instances = await r.instances()
    assert len(instances) == 1
    assert instances[0]["device_ids"] == ["0", "1"]
    assert instances[0]["registered_at"] == first["registered_at"]
    assert instances[0]["last_seen"] >= first["last_seen"] >= first["registered_at"]


async def test_unreachable_instance_is_refused(router: RouterFactory) -> None:
    r = router()
    status, body, _ = await r.post("/register", {"role": "mixed", "host_ip": "127.0.0.1",
                                                 "port": 9})
    assert status == 503
    assert body["msg"].startswith("service is not healthy")
    assert await r.instances() == []


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"host_ip": "127.0.0.1", "port": 1}, "role: required"),
        ({"role": "chef", "host_ip": "127.0.0.1", "port": 1}, "role: 'chef' is not one of"),
        ({"role": 7, "host_ip": "127.0.0.1", "port": 1}, "role: 7 is not one of"),
        ({"role": "mixed", "port": 1}, "host_ip: required"),
        ({"role": "mixed", "host_ip": "not a host!", "port": 1}, "host_ip: 'not a host!'"),
        ({"role": "mixed", "host_ip": "127.0.0.1"}, "port: required"),
        ({"role": "mixed", "host_ip": "127.0.0.1", "port": "eighty"}, "port: 'eighty' is not a"),
        ({"role": "mixed", "host_ip": "127.0.0.1", "port": 70000}, "port: 70000 is outside"),
        ({"role": "mixed", "host_ip": "127.0.0.1", "port": 1.5}, "port: must be an integer"),
        ({"role": "mixed", "host_ip": "127.0.0.1", "port": 1, "transfer_protocol": ["carrier"]},
         "transfer_protocol: unknown carrier"),
        ({"role": "mixed", "host_ip": "127.0.0.1", "port": 1, "rdma_ports": {"a": 1}},
         "rdma_ports: must be a list"),
        ({"role": "mixed", "host_ip": "127.0.0.1", "port": 1, "metrics_port": -5},
         "metrics_port: -5 is outside"),
        ({"role": "mixed", "host_ip": "127.0.0.1", "port": 0}, "port: 0 is outside"),
        ([1, 2], "body must be a JSON object"),
    ],
)
async def test_bad_payloads_get_400_naming_the_field(
    router: RouterFactory, payload: object, message: str
) -> None:
    r = router()
    status, body, _ = await r.post("/register", payload)
    assert status == 400
    assert message in body["msg"]
    assert body["error"]["message"] == body["msg"]


async def test_role_must_fit_the_mode(backends, router: RouterFactory) -> None:
    (a,) = backends(1)
    mixed = router()
    status, body, _ = await mixed.post("/register", a.payload(role="prefill"))
    assert status == 400 and "only MIXED instances" in body["msg"]
    pd = router(args=["--splitwise"])
    status, body, _ = await pd.post("/register", a.payload(role="mixed"))
    assert status == 400 and "splitwise mode only supports PREFILL/DECODE" in body["msg"]
    status, _, _ = await pd.post("/register", a.payload(role=2))
    assert status == 200
    assert (await pd.get("/registered_number"))[1] == {"mixed": 0, "prefill": 0, "decode": 1}
    status, body, _ = await pd.post("/v1/completions", {"prompt": "x"})
    # A decode instance alone cannot serve a request in splitwise mode: no prefill to pair.
    assert status == 503 and "no healthy prefill instance" in body["error"]["message"]


async def test_register_file_loads_at_start(backends, router: RouterFactory) -> None:
    pair = backends(2)
    r = router(pair)
    await r.wait_healthy(2)
    assert {w["url"] for w in await r.instances()} == {b.url for b in pair}
