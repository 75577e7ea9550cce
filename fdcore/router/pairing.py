"""Which prefill and decode instances can pair, over which KV transport, and the
``disaggregate_info`` the router adds to the request it sends both (FastDeploy's keys).

Protocol choice (DESIGN 8.1): ``ipc`` when both are on the same host, both offer it and their
tensor-parallel sizes fit (equal, or decode on one rank); else ``rdma`` when both offer it; else
``tcp`` when both offer it. A pair with none in common, or whose registered KV layouts differ
(``kv_layout.fingerprint``: model, dtype, layers, heads, block size), cannot exchange blocks
and is never formed: the selector skips such decode instances, and a request with no usable
pair is answered 503 naming each instance and why.
"""

from __future__ import annotations

from typing import Any

from fdcore.types import Instance

# In order of preference after ipc (which needs the same host).
_NETWORK_PROTOCOLS = ("rdma", "tcp")


def tp_size(instance: Instance) -> int:
    """The instance's tensor-parallel size: its register payload's ``tp_size``, else the
    number of its ``device_ids`` (at least 1)."""
    value = instance.extra.get("tp_size")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and value.isdigit() and int(value) > 0:
        return int(value)
    return max(1, len(instance.device_ids))


def choose_protocol(prefill: Instance, decode: Instance) -> str | None:
    """The KV transport this pair uses, or None when they share none."""
    common = set(prefill.transfer_protocol) & set(decode.transfer_protocol)
    tp_p, tp_d = tp_size(prefill), tp_size(decode)
    if (prefill.host_ip == decode.host_ip and "ipc" in common
            and (tp_p == tp_d or tp_d == 1)):
        return "ipc"
    for protocol in _NETWORK_PROTOCOLS:
        if protocol in common:
            return protocol
    return None


def _layout(instance: Instance) -> dict[str, Any] | None:
    layout = instance.extra.get("kv_layout")
    return layout if isinstance(layout, dict) else None


_LAYOUT_KEYS = ("model", "dtype", "num_layers", "kv_heads", "head_dim", "block_size")


def _differences(lp: dict[str, Any], ld: dict[str, Any]) -> str:
    found = [f"{k} {lp.get(k)!r} on prefill, {ld.get(k)!r} here" for k in _LAYOUT_KEYS
             if lp.get(k) != ld.get(k)]
    return "; ".join(found) or "their fingerprints differ"


def pair_problem(prefill: Instance, decode: Instance) -> str | None:
    """Why ``prefill`` cannot hand its KV cache to ``decode`` (None: it can)."""
    lp, ld = _layout(prefill), _layout(decode)
    if lp is not None and ld is not None and lp.get("fingerprint") != ld.get("fingerprint"):
        return f"KV layouts differ from prefill {prefill.url}'s ({_differences(lp, ld)})"
    if choose_protocol(prefill, decode) is None:
        offered_p = ",".join(prefill.transfer_protocol) or "none"
        offered_d = ",".join(decode.transfer_protocol) or "none"
        return (f"no KV transfer protocol in common with prefill {prefill.url} (it offers "
                f"{offered_p}; this decode instance offers {offered_d}"
                + (", and ipc needs the same host" if "ipc" in offered_p and "ipc" in offered_d
                   else "") + ")")
    return None


def disaggregate_info(
    prefill: Instance, decode: Instance, protocol: str, transfer_id: str
) -> dict[str, Any]:
    """The ``disaggregate_info`` of one attempt (FastDeploy's keys, plus ``transfer_id``)."""
    return {
        "prefill_ip": prefill.host_ip,
        "decode_ip": decode.host_ip,
        "prefill_connector_port": prefill.connector_port,
        "decode_connector_port": decode.connector_port,
        "decode_device_ids": list(decode.device_ids),
        "decode_rdma_ports": list(decode.rdma_ports),
        "transfer_protocol": protocol,
        "decode_tp_size": tp_size(decode),
        "transfer_id": transfer_id,
    }
