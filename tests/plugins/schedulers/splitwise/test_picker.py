"""The blurred least-load pick and the pairing rules of the ``splitwise`` scheduler."""

from __future__ import annotations

import random
from typing import Any

import pytest
from fdcore_plugins.schedulers.splitwise.cluster import Node
from fdcore_plugins.schedulers.splitwise.picker import (
    NoPlacement,
    blurred_least_load,
    place,
    prefill_step,
)

from fdcore.router.payload import parse_instance
from fdcore.types import EngineRequest, Role, SamplingParams

LAYOUT = {"fingerprint": "abc", "model": "sim", "dtype": "int64", "num_layers": 1,
          "kv_heads": 1, "head_dim": 1, "block_size": 16}


def node(name: str, role: str, load: int = 0, host: str = "10.0.0.1",
         protocols: tuple[str, ...] = ("ipc", "tcp"), **card: Any) -> Node:
    payload = {"role": role, "host_ip": host, "port": int(name), "connector_port": 9000,
               "transfer_protocol": list(protocols), "kv_layout": LAYOUT, **card}
    return Node(name, load, 0.0, parse_instance(payload))


def request(prompt_len: int) -> EngineRequest:
    return EngineRequest("r", [1] * prompt_len, SamplingParams(), 0.0)


@pytest.mark.parametrize(("prompt_len", "step"),
                         [(10, 100), (400, 200), (999, 499), (1000, 100), (3000, 300),
                          (9000, 500)])
def test_prefill_step_is_fastdeploys(prompt_len: int, step: int) -> None:
    assert prefill_step(prompt_len) == step


def test_window_holds_the_least_loaded_within_the_step() -> None:
    nodes = [node("1", "prefill", 500), node("2", "prefill", 0), node("3", "prefill", 99),
             node("4", "prefill", 100)]
    picked = {blurred_least_load(nodes, 100, random.Random(seed)).name for seed in range(200)}
    assert picked == {"2", "3"}  # below 0 + 100; 100 itself is outside


def test_window_always_holds_the_least_loaded() -> None:
    nodes = [node("1", "decode", 5), node("2", "decode", 7)]
    assert blurred_least_load(nodes, 0, random.Random(1)).name == "1"


def test_pair_with_ipc_on_one_host_and_tcp_across() -> None:
    p = node("1", "prefill")
    same = place(request(10), {"1": p, "2": node("2", "decode")}, "t", random.Random(0))
    assert same.decode is not None and same.protocol == "ipc"
    other = place(request(10), {"1": p, "2": node("2", "decode", host="10.0.0.2")}, "t",
                  random.Random(0))
    assert other.protocol == "tcp"


def test_a_mixed_instance_takes_a_request_alone() -> None:
    placed = place(request(10), {"1": node("1", "mixed")}, "t", random.Random(0))
    assert placed.decode is None and placed.prefill.role is Role.MIXED


def test_unpairable_prefill_is_no_candidate() -> None:
    nodes = {"1": node("1", "prefill", protocols=("rdma",)),
             "2": node("2", "decode", protocols=("tcp",))}
    with pytest.raises(NoPlacement, match="no KV transfer protocol in common"):
        place(request(10), nodes, "t", random.Random(0))
    layout = {**LAYOUT, "fingerprint": "other", "block_size": 32}
    nodes = {"1": node("1", "prefill"), "2": node("2", "decode", kv_layout=layout)}
    with pytest.raises(NoPlacement, match="KV layouts differ"):
        place(request(10), nodes, "t", random.Random(0))


def test_nothing_registered() -> None:
    with pytest.raises(NoPlacement, match=r"topic 'fd'.*none is registered"):
        place(request(10), {}, "fd", random.Random(0))


def test_a_retry_avoids_the_failed_pair_while_it_can() -> None:
    nodes = {"1": node("1", "prefill"), "2": node("2", "prefill"), "3": node("3", "decode"),
             "4": node("4", "decode")}
    for seed in range(20):
        placed = place(request(10), nodes, "t", random.Random(seed), frozenset({"1", "3"}))
        assert placed.decode is not None
        assert (placed.prefill.name, placed.decode.name) == ("2", "4")
    # The only decode instance failed: another prefill, the same decode.
    del nodes["4"]
    placed = place(request(10), nodes, "t", random.Random(0), frozenset({"1", "3"}))
    assert placed.decode is not None
    assert (placed.prefill.name, placed.decode.name) == ("2", "3")
