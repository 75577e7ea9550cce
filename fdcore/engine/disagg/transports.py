"""Builds an engine's KV transports and allocates its KV pool through them (DESIGN 8.4)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fdcore.engine.runner import Allocate
from fdcore.engine.torch_thread import torch_executor
from fdcore.errors import StartupError
from fdcore.kv import KVLayout
from fdcore.plugins import PluginSet
from fdcore.types import Transport, TransportContext


async def on_torch_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn()`` on the engine's torch thread and await its result."""
    return await asyncio.get_running_loop().run_in_executor(torch_executor(), fn)


def build_transports(
    plugins: PluginSet, names: Sequence[str], *, device: str, host: str,
    instance_id: str, ports: Sequence[int] = (),
) -> dict[str, Transport]:
    """One instance of each transport in ``names`` (``--cache-transfer-protocol``), with its
    default config; the layout and pool are filled in when the pool is allocated."""
    built: dict[str, Transport] = {}
    for name in names:
        component = plugins.component("transport", name)
        context = TransportContext(layout=None, device=device, host=host,
                                   instance_id=instance_id, on_torch_thread=on_torch_thread,
                                   ports=tuple(ports) if name == "rdma" else ())
        try:
            config = component.cls.Config.model_validate({})
            built[name] = component.cls(config, context)
        except Exception as exc:
            raise StartupError(f"--cache-transfer-protocol {name}: {exc}") from None
    return built


def pool_allocator(transports: Mapping[str, Transport], device: str) -> Allocate:
    """The runner's pool allocator: the one transport that allocates (``ipc`` on CPU: shared
    memory), else plain zeroed memory on ``device``; every transport's context then gets the
    layout and the pool."""

    def allocate(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        layers, _, blocks, heads, block_size, head_dim = shape
        layout = KVLayout(num_layers=layers, num_blocks=blocks, kv_heads=heads,
                          block_size=block_size, head_dim=head_dim,
                          dtype=str(dtype).removeprefix("torch."))
        pools = [(name, pool) for name, t in transports.items()
                 if (pool := t.allocate(layout)) is not None]
        if len(pools) > 1:
            raise StartupError("--cache-transfer-protocol: "
                               f"{' and '.join(n for n, _ in pools)} both allocate the KV pool; "
                               "list at most one of them")
        pool = pools[0][1] if pools else torch.zeros(shape, dtype=dtype, device=device)
        for transport in transports.values():
            context: TransportContext = transport.context  # type: ignore[attr-defined]
            context.layout, context.pool = layout, pool
        return pool

    return allocate
