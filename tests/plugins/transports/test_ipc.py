"""The ``ipc`` transport: writes land in exactly the destination blocks (in this process and in
a receiver of its own), handles are refused off this host or for another layout, the pool's
file is released once, the CUDA path where a GPU exists, and both plugins import without
pyverbs or CUDA."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack
import pytest
import torch
from fdcore_plugins.transports import ipc, pool_access

from fdcore.kv import KVLayout, plan_copies
from fdcore.registry import Registry
from fdcore.types import EmptyConfig, TransportContext
from tests.plugins.transports.peer import Peer, build, digest, landed, write_cases

LAYOUT = KVLayout(num_layers=3, num_blocks=16, kv_heads=2, block_size=4, head_dim=8, model="m")
CASES = write_cases(LAYOUT)


def started(transport: Any) -> Any:
    """``transport`` with random bytes in its pool."""
    transport.context.pool.copy_(torch.randn(LAYOUT.shape))
    return transport


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Any, Any]]:
    sender, receiver = started(build("ipc", LAYOUT, "cpu")), started(build("ipc", LAYOUT, "cpu"))
    for transport in (sender, receiver):
        await transport.start()
    yield sender, receiver
    for transport in (sender, receiver):
        await transport.stop()


@pytest.mark.parametrize(("src", "dst", "layers"), CASES)
async def test_a_write_lands_in_exactly_the_destination_blocks(
    pair: tuple[Any, Any], src: list[int], dst: list[int], layers: list[int] | None,
) -> None:
    sender, receiver = pair
    before = receiver.context.pool.clone()
    link = await sender.connect(await receiver.expose())
    moved = await link.write(src, dst, layers, transfer_id="t-1")
    chosen = LAYOUT.num_layers if layers is None else len(layers)
    assert moved == len(src) * chosen * 2 * LAYOUT.block_bytes
    assert torch.equal(receiver.context.pool, landed(before, sender.context.pool, src, dst,
                                                     layers))
    await link.close()


async def test_copies_run_on_the_torch_thread(pair: tuple[Any, Any]) -> None:
    sender, receiver = pair
    threads: list[str] = []
    executor = ThreadPoolExecutor(1, thread_name_prefix="torch-thread")

    async def on_torch_thread(fn: Callable[[], Any]) -> Any:
        def run() -> Any:
            threads.append(threading.current_thread().name)
            return fn()
        return await asyncio.get_running_loop().run_in_executor(executor, run)

    sender.context.on_torch_thread = on_torch_thread
    link = await sender.connect(await receiver.expose())
    await link.write([1, 2], [3, 4])
    executor.shutdown()
    assert len(threads) == 1 and threads[0].startswith("torch-thread")
    assert torch.equal(receiver.context.pool[:, :, 3:5], sender.context.pool[:, :, 1:3])


async def test_a_receiver_in_another_process_gets_exactly_the_blocks() -> None:
    sender = started(build("ipc", LAYOUT, "cpu"))
    await sender.start()
    async with Peer("ipc", LAYOUT) as peer:
        assert peer.handle["kind"] == "cpu" and peer.handle["path"].startswith(
            f"/proc/{peer.handle['pid']}/fd/")
        link = await sender.connect(peer.handle)
        expected = torch.zeros(LAYOUT.shape)
        for src, dst, layers in CASES:
            await link.write(src, dst, layers)
            expected = landed(expected, sender.context.pool, src, dst, layers)
            assert await peer.ask("hash") == digest(expected)
        assert await peer.ask("hash 0,5") == digest(expected, [0, 5])
        await link.close()
    await sender.stop()


async def test_the_handle_is_msgpack_and_names_the_pool() -> None:
    receiver = build("ipc", LAYOUT, "cpu")
    handle = await receiver.expose()
    assert msgpack.unpackb(msgpack.packb(handle)) == handle
    assert handle["layout"]["model"] == "m" and handle["nbytes"] == LAYOUT.pool_bytes
    assert handle["host"] == "127.0.0.1" and handle["pid"] == os.getpid()
    await receiver.stop()


async def test_a_layout_that_differs_is_refused_at_connect_naming_the_field(
    pair: tuple[Any, Any],
) -> None:
    sender, receiver = pair
    handle = await receiver.expose()
    for field, value, message in (("head_dim", 16, "head_dim 8 here, 16 there"),
                                  ("dtype", "float16", "dtype 'float32' here"),
                                  ("model", "other", "model 'm' here, 'other' there")):
        with pytest.raises(ValueError, match=f"ipc: KV layouts differ: {message}"):
            await sender.connect({**handle, "layout": {**handle["layout"], field: value}})
    with pytest.raises(ValueError, match="carries no KV layout"):
        await sender.connect({k: v for k, v in handle.items() if k != "layout"})


async def test_a_write_the_plan_refuses_raises(pair: tuple[Any, Any]) -> None:
    sender, receiver = pair
    link = await sender.connect(await receiver.expose())
    with pytest.raises(ValueError, match=r"destination block 16 outside 0\.\.15"):
        await link.write([0], [16])
    with pytest.raises(ValueError, match="listed twice"):
        await link.write([0, 1], [2, 2])


async def test_a_handle_from_another_host_is_refused(pair: tuple[Any, Any]) -> None:
    sender, receiver = pair
    handle = await receiver.expose()
    for other in ({"host": "10.1.2.3"}, {"boot_id": "another-kernel"}):
        with pytest.raises(ValueError, match="ipc needs both engines on one host"):
            await sender.connect({**handle, **other})
    for loopback in ("localhost", "127.0.0.1"):
        link = await sender.connect({**handle, "host": loopback})
        await link.close()


async def test_the_engines_own_host_is_this_host() -> None:
    sender = build("ipc", LAYOUT, "cpu")
    receiver = build("ipc", LAYOUT, "cpu")
    sender.context.host = receiver.context.host = "10.0.0.7"
    link = await sender.connect(await receiver.expose())
    await link.write([0], [1])
    await link.close()
    for transport in (sender, receiver):
        await transport.stop()


async def test_stop_is_idempotent_and_releases_the_file_and_the_links(
    pair: tuple[Any, Any],
) -> None:
    sender, receiver = pair
    handle = await receiver.expose()
    fd = int(handle["path"].rsplit("/", 1)[1])
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:fdcore-kv-pool")
    link = await receiver.connect(await sender.expose())
    await receiver.stop()
    await receiver.stop()
    assert not os.path.exists(f"/proc/self/fd/{fd}") or not os.readlink(
        f"/proc/self/fd/{fd}").startswith("/memfd:fdcore-kv-pool")
    with pytest.raises(ConnectionError, match=r"it has stopped|no longer the receiver's pool"):
        await sender.connect(handle)
    with pytest.raises(RuntimeError, match="the link is closed"):
        await link.write([0], [0])
    receiver.context.pool.fill_(1)  # the engine's own pool outlives the transport


async def test_without_memfd_the_pool_is_a_dev_shm_file_unlinked_at_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*args: object) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "memfd_create", refuse)
    receiver = started(build("ipc", LAYOUT, "cpu"))
    monkeypatch.undo()
    sender = started(build("ipc", LAYOUT, "cpu"))
    handle = await receiver.expose()
    assert handle["path"].startswith("/dev/shm/fdcore-kv-")
    assert os.stat(handle["path"]).st_mode & 0o777 == 0o600
    link = await sender.connect(handle)
    await link.write([2, 3], [7, 8], [1])
    assert torch.equal(receiver.context.pool[1, :, 7:9], sender.context.pool[1, :, 2:4])
    await receiver.stop()
    await receiver.stop()
    assert not os.path.exists(handle["path"])
    await sender.stop()


async def test_a_cpu_pool_not_in_shared_memory_cannot_be_exposed() -> None:
    receiver = ipc.IpcTransport(EmptyConfig(), TransportContext(LAYOUT, pool=torch.zeros(
        LAYOUT.shape)))
    with pytest.raises(RuntimeError, match="a CPU pool must be allocated by ipc"):
        await receiver.expose()
    unallocated = ipc.IpcTransport(EmptyConfig(), TransportContext(None))
    with pytest.raises(RuntimeError, match="not allocated yet"):
        await unallocated.expose()


@pytest.mark.parametrize("direct_bytes", [1, 1 << 30], ids=["copy_ per range", "gathered"])
@pytest.mark.parametrize(("dtype", "head_dim"), [("float32", 8), ("float16", 3), ("int8", 3)])
def test_the_copier_moves_exact_bits_either_way(direct_bytes: int, dtype: str,
                                                head_dim: int) -> None:
    layout = KVLayout(num_layers=2, num_blocks=12, kv_heads=1, block_size=2, head_dim=head_dim,
                      dtype=dtype)
    src = torch.randint(0, 256, (layout.pool_bytes,), dtype=torch.uint8)  # NaN bit patterns too
    dst = torch.randint(0, 256, (layout.pool_bytes,), dtype=torch.uint8)
    before = dst.clone()
    copier = pool_access.BlockCopier(src, dst, layout.block_bytes, chunk_bytes=3 * layout.block_bytes,
                                     direct_bytes=direct_bytes)
    for src_ids, dst_ids, layers in write_cases(layout):
        copies = plan_copies(layout, layout, src_ids, dst_ids, layers)
        assert copier(copies) == sum(c.nbytes for c in copies)
        for c in copies:
            before[c.dst:c.dst + c.nbytes] = src[c.src:c.src + c.nbytes]
        assert torch.equal(dst, before)


def test_on_a_device_the_engine_allocates() -> None:
    transport = ipc.IpcTransport(EmptyConfig(), TransportContext(LAYOUT, device="cuda:0"))
    assert transport.allocate(LAYOUT) is None


def test_the_shared_pool_starts_zeroed_with_the_layouts_shape_and_dtype() -> None:
    layout = KVLayout(num_layers=2, num_blocks=3, kv_heads=1, block_size=2, head_dim=4,
                      dtype="bfloat16")
    pool = ipc.IpcTransport(EmptyConfig(), TransportContext(layout)).allocate(layout)
    assert pool is not None and pool.is_contiguous()
    assert (pool.shape, pool.dtype, int(pool.count_nonzero())) == (layout.shape,
                                                                   torch.bfloat16, 0)


def test_the_plugin_registers_ipc() -> None:
    registry = Registry()
    ipc.fdcore_register_transports(registry.register_for("ipc"))
    assert registry.get("transport", "ipc").cls is ipc.IpcTransport


@pytest.mark.parametrize("module", ["ipc", "tcp"])
def test_the_plugins_import_without_pyverbs_or_cuda(module: str) -> None:
    code = textwrap.dedent(f"""
        import sys
        sys.modules["pyverbs"] = None
        import torch
        assert not torch.cuda.is_available()
        from fdcore.registry import Registry
        from fdcore_plugins.transports import {module}
        registry = Registry()
        {module}.fdcore_register_transports(registry.register_for("{module}"))
        print(registry.get("transport", "{module}").cls.name)
    """)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True, env=env)
    assert done.stdout.strip() == module


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
async def test_cuda_pools_exchange_blocks_device_to_device() -> None:
    sender = build("ipc", LAYOUT, "cuda")
    assert sender.allocate(LAYOUT) is None
    sender.context.pool.copy_(torch.randn(LAYOUT.shape, device="cuda"))
    async with Peer("ipc", LAYOUT, device="cuda") as peer:
        assert peer.handle["kind"] == "cuda"
        link = await sender.connect(peer.handle)
        expected = torch.zeros(LAYOUT.shape, device="cuda")
        for src, dst, layers in CASES:
            await link.write(src, dst, layers)
            expected = landed(expected, sender.context.pool, src, dst, layers)
            assert await peer.ask("hash") == digest(expected)
        await link.close()
    await sender.stop()
