"""The engine's PD flags: FastDeploy's launch lines, checked together, and what registration
tells the router about the KV pool."""

from __future__ import annotations

import pytest

from fdcore.engine.cli import main
from fdcore.engine.config import resolve
from fdcore.engine.registration import kv_layout_payload
from fdcore.kv import KVLayout


@pytest.mark.parametrize(("argv", "expected"), [
    (["--cache-transfer-protocol", "ipc,nvlink"],
     "--cache-transfer-protocol: Value error, unknown KV transport 'nvlink' (known: ipc, tcp, "
     "rdma)"),
    (["--cache-transfer-protocol", "ipc,ipc"], "a KV transport is listed twice"),
    (["--splitwise-role", "decode"],
     "--splitwise-role decode needs --pd-comm-port (the port of the P-D connector)"),
    (["--splitwise-role", "prefill", "--pd-comm-port", "8201", "--cache-transfer-protocol",
      "rdma"], "--cache-transfer-protocol rdma needs --rdma-comm-ports"),
    (["--rdma-comm-ports", "7100"], "--rdma-comm-ports is set but --cache-transfer-protocol"),
])
def test_pd_flags_that_cannot_work_are_one_line_errors(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--model", "sim", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_fastdeploys_launch_flags_are_accepted() -> None:
    config, _, _ = resolve(None, {
        "model": "sim", "splitwise-role": "decode", "pd-comm-port": "8201",
        "cache-transfer-protocol": "RDMA,ipc", "rdma-comm-ports": "7100,7101",
        "device-ids": "0,1",
    })
    assert config.cache_transfer_protocol == ["rdma", "ipc"]
    assert config.pd_comm_port == [8201] and config.rdma_comm_ports == ["7100", "7101"]


def test_the_registered_kv_layout_carries_what_must_match() -> None:
    layout = KVLayout(num_layers=30, num_blocks=512, kv_heads=3, block_size=16, head_dim=64,
                      dtype="float32", model="SmolLM2-135M-Instruct.Q4_1")
    payload = kv_layout_payload(layout)
    assert payload == {"model": "SmolLM2-135M-Instruct.Q4_1", "dtype": "float32",
                       "num_layers": 30, "kv_heads": 3, "head_dim": 64, "block_size": 16,
                       "num_blocks": 512, "fingerprint": layout.fingerprint()}
    bigger = KVLayout(**{**{k: payload[k] for k in ("num_layers", "kv_heads", "block_size",
                                                     "head_dim", "dtype", "model")},
                         "num_blocks": 4096})
    assert bigger.fingerprint() == payload["fingerprint"]
