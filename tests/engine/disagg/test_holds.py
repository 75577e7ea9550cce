"""Block holds: taken once, released exactly once, never evicted, quarantined after an abort."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdcore.engine.block_manager import BlockManager, BlockTable, OutOfBlocks
from fdcore.engine.disagg.holds import (
    Hold,
    HoldError,
    Holds,
    HoldState,
    ReleaseReason,
    Side,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def reserve(blocks: BlockManager, tokens: list[int]) -> BlockTable:
    table = BlockTable()
    blocks.allocate_prompt(table, tokens)
    return table


def test_a_hold_is_released_once_whatever_tries() -> None:
    blocks = BlockManager(8, 4)
    released: list[tuple[str, ReleaseReason]] = []
    holds = Holds(blocks, on_release=lambda h, r: released.append((h.transfer_id, r)))
    holds.take("t1", "r1", Side.DECODE, HoldState.RESERVED, reserve(blocks, list(range(9))), 30)
    assert blocks.num_used == 3 and holds.held_blocks() == {(Side.DECODE, HoldState.RESERVED): 3}
    assert holds.release("t1", ReleaseReason.DONE) is not None
    assert holds.release("t1", ReleaseReason.FAILED) is None  # a second path: nothing happens
    assert holds.expire() == [] and holds.release_all() == 0
    assert released == [("t1", ReleaseReason.DONE)]
    assert blocks.num_used == 0 and blocks.num_available == 8
    assert holds.releases == {(Side.DECODE, ReleaseReason.DONE): 1}


def test_a_transfer_id_is_held_at_most_once() -> None:
    blocks = BlockManager(8, 4)
    holds = Holds(blocks)
    holds.take("t", "r", Side.DECODE, HoldState.RESERVED, reserve(blocks, [1, 2]), 30)
    with pytest.raises(HoldError, match="already holds"):
        holds.take("t", "r", Side.DECODE, HoldState.RESERVED, BlockTable(), 30)


def test_held_blocks_are_never_evicted() -> None:
    blocks = BlockManager(4, 2)
    holds = Holds(blocks)
    # P's prompt, computed and offered to the prefix cache, pinned while it is sent.
    prompt = [1, 2, 3, 4, 5]
    table = reserve(blocks, prompt)
    blocks.commit(table, prompt, 4)
    pinned = list(table.blocks)
    holds.take("t", "r", Side.PREFILL, HoldState.SENDING, table, 30)
    # Everything else is taken and given back: the pinned blocks are not among what can go.
    assert blocks.num_available == 1
    other = reserve(blocks, [9, 9])
    with pytest.raises(OutOfBlocks):
        reserve(blocks, [7, 7, 7])
    assert not set(other.blocks) & set(pinned)
    blocks.free(other)
    # Once sent, P's filled blocks stay in its prefix cache (P stays warm).
    holds.release("t", ReleaseReason.DONE)
    again = BlockTable()
    assert blocks.allocate_prompt(again, prompt) == 4
    assert again.blocks[:2] == pinned[:2]


def test_an_abort_is_quarantined_until_the_ack_or_the_deadline() -> None:
    clock = Clock()
    blocks = BlockManager(8, 4)
    holds = Holds(blocks, clock=clock)
    holds.take("a", "r1", Side.DECODE, HoldState.RESERVED, reserve(blocks, [1] * 8), 30)
    holds.take("b", "r2", Side.DECODE, HoldState.RESERVED, reserve(blocks, [2] * 8), 30)
    assert holds.quarantine("a", ttl=5) and holds.quarantine("b", ttl=5)
    assert not holds.renew("a", 60)  # a heartbeat does not lift a quarantine
    assert not holds.advance("a", HoldState.RESERVED)
    assert blocks.num_used == 4  # the blocks stay out of anyone else's reach
    assert holds.release("a", ReleaseReason.ABORTED) is not None  # the peer's abort_ack
    clock.now += 4.9
    assert holds.expire() == []
    clock.now += 0.2
    [expired] = holds.expire()
    assert expired.transfer_id == "b" and expired.released is ReleaseReason.EXPIRED
    assert blocks.num_used == 0


def test_heartbeats_renew_and_silence_expires() -> None:
    clock = Clock()
    blocks = BlockManager(8, 4)
    holds = Holds(blocks, clock=clock)
    holds.take("t", "r", Side.DECODE, HoldState.RESERVED, reserve(blocks, [1, 2, 3]), 10)
    for _ in range(5):
        clock.now += 9
        assert holds.renew("t", 10) and holds.expire() == []
    assert holds.next_deadline() == clock.now + 10
    clock.now += 10
    assert [h.transfer_id for h in holds.expire()] == ["t"]
    assert holds.next_deadline() is None and blocks.num_used == 0


def test_a_failing_release_callback_still_frees_the_blocks() -> None:
    blocks = BlockManager(8, 4)

    def broken(hold: Hold, reason: ReleaseReason) -> None:
        raise RuntimeError("callback bug")

    holds = Holds(blocks, on_release=broken)
    holds.take("t", "r", Side.DECODE, HoldState.RESERVED, reserve(blocks, [1, 2]), 10)
    with pytest.raises(RuntimeError):
        holds.release("t", ReleaseReason.DONE)
    assert blocks.num_used == 0 and len(holds) == 0


OPS = st.lists(st.tuples(
    st.sampled_from(["take", "release", "quarantine", "renew", "tick", "expire"]),
    st.integers(0, 5), st.integers(1, 12), st.sampled_from(list(ReleaseReason)),
), max_size=60)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_any_sequence_of_operations_returns_every_block(ops: list) -> None:  # type: ignore[type-arg]
    clock = Clock()
    blocks = BlockManager(32, 4)
    released: list[str] = []
    holds = Holds(blocks, clock=clock, on_release=lambda h, r: released.append(h.transfer_id))
    taken: list[str] = []
    for op, n, size, reason in ops:
        tid = f"t{n}"
        if op == "take" and holds.get(tid) is None and blocks.num_available >= 3:
            holds.take(tid, "r", Side.DECODE, HoldState.RESERVED,
                       reserve(blocks, [n] * min(size, 12)), ttl=size)
            taken.append(tid)
        elif op == "release":
            holds.release(tid, reason)
        elif op == "quarantine":
            holds.quarantine(tid, ttl=size)
        elif op == "renew":
            holds.renew(tid, ttl=size)
        elif op == "tick":
            clock.now += size
        else:
            holds.expire()
        assert blocks.num_used == sum(h.num_blocks for h in map(holds.get, set(taken)) if h)
    holds.release_all()
    assert sorted(released) == sorted(taken)  # each taken hold released exactly once
    assert blocks.num_used == 0 and blocks.num_available == 32


def test_the_metrics_read_the_holds_at_scrape_time() -> None:
    from prometheus_client import CollectorRegistry

    from fdcore.engine.disagg.metrics import DisaggMetrics

    registry = CollectorRegistry()
    blocks = BlockManager(8, 4)
    holds = Holds(blocks)
    metrics = DisaggMetrics(registry, holds)
    holds.take("t", "r", Side.DECODE, HoldState.RESERVED, reserve(blocks, [1] * 9), 10)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("fdcore_kv_held_blocks", side="decode", state="reserved") == 3
    assert value("fdcore_kv_held_blocks", side="prefill", state="sending") == 0
    holds.quarantine("t", 5)
    assert value("fdcore_kv_held_blocks", side="decode", state="quarantined") == 3
    holds.release("t", ReleaseReason.ABORTED)
    assert value("fdcore_kv_held_blocks", side="decode", state="quarantined") == 0
    assert value("fdcore_kv_hold_releases_total", side="decode", reason="aborted") == 1
    metrics.transferred("tcp", "sent", 4096, 0.002)
    assert value("fdcore_kv_transfer_bytes_total", protocol="tcp", direction="sent") == 4096
    assert value("fdcore_kv_transfer_seconds_count", protocol="tcp") == 1
