"""Which prefill/decode pairs can exchange KV, over which transport (DESIGN 8.1)."""

from __future__ import annotations

from typing import Any

import pytest

from fdcore.router.pairing import choose_protocol, disaggregate_info, pair_problem, tp_size
from fdcore.types import Instance, Role

LAYOUT = {"model": "m", "dtype": "float16", "num_layers": 30, "kv_heads": 3, "head_dim": 64,
          "block_size": 16, "fingerprint": "aaaa"}


def inst(role: Role, host: str = "10.0.0.1", port: int = 8100, protocols: str = "ipc,tcp",
         devices: tuple[str, ...] = ("0",), **extra: Any) -> Instance:
    return Instance(url=f"http://{host}:{port}", role=role, host_ip=host, port=port,
                    metrics_port=port, connector_port=port + 1,
                    transfer_protocol=protocols.split(","), rdma_ports=["7100"],
                    device_ids=list(devices), extra=extra)


@pytest.mark.parametrize(("p", "d", "expected"), [
    (inst(Role.PREFILL), inst(Role.DECODE, port=8200), "ipc"),
    # Another host: no ipc, whatever both list.
    (inst(Role.PREFILL), inst(Role.DECODE, host="10.0.0.2"), "tcp"),
    (inst(Role.PREFILL, protocols="ipc,rdma,tcp"),
     inst(Role.DECODE, host="10.0.0.2", protocols="rdma,tcp"), "rdma"),
    # Same host, but tensor-parallel sizes that do not fit: not ipc (decode on one rank fits).
    (inst(Role.PREFILL, devices=("0",)), inst(Role.DECODE, port=8200, devices=("1", "2")), "tcp"),
    (inst(Role.PREFILL, devices=("0", "1")), inst(Role.DECODE, port=8200, devices=("2",)), "ipc"),
    (inst(Role.PREFILL, protocols="tcp"), inst(Role.DECODE, port=8200, protocols="ipc"), None),
])
def test_protocol_choice(p: Instance, d: Instance, expected: str | None) -> None:
    assert choose_protocol(p, d) == expected


def test_pair_problems_name_the_cause() -> None:
    p = inst(Role.PREFILL, protocols="tcp", kv_layout=LAYOUT)
    assert pair_problem(p, inst(Role.DECODE, port=8200, kv_layout=LAYOUT)) is None
    problem = pair_problem(p, inst(Role.DECODE, port=8200, protocols="ipc", kv_layout=LAYOUT))
    assert problem is not None and "no KV transfer protocol in common" in problem
    assert "it offers tcp; this decode instance offers ipc" in problem
    other = {**LAYOUT, "block_size": 64, "fingerprint": "bbbb"}
    problem = pair_problem(p, inst(Role.DECODE, port=8200, kv_layout=other))
    assert problem is not None and "KV layouts differ" in problem
    assert "block_size 16 on prefill, 64 here" in problem
    # A layout unknown on one side (an engine that does not send one) is not refused.
    assert pair_problem(p, inst(Role.DECODE, port=8200)) is None


def test_disaggregate_info_has_fastdeploys_keys_and_a_transfer_id() -> None:
    p, d = inst(Role.PREFILL), inst(Role.DECODE, port=8200, devices=("0", "1"), tp_size="2")
    info = disaggregate_info(p, d, "ipc", "t-1")
    assert info == {
        "prefill_ip": "10.0.0.1", "decode_ip": "10.0.0.1", "prefill_connector_port": 8101,
        "decode_connector_port": 8201, "decode_device_ids": ["0", "1"],
        "decode_rdma_ports": ["7100"], "transfer_protocol": "ipc", "decode_tp_size": 2,
        "transfer_id": "t-1",
    }
    assert tp_size(inst(Role.DECODE, devices=())) == 1
