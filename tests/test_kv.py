"""The KV layout and the copy plan every transport follows."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fdcore.kv import Copy, KVLayout, plan_copies


def layout(num_blocks: int = 8, **changes: object) -> KVLayout:
    fields: dict[str, object] = {"num_layers": 2, "num_blocks": num_blocks, "kv_heads": 2,
                                 "block_size": 4, "head_dim": 3, "dtype": "float32",
                                 "model": "m"}
    fields.update(changes)
    return KVLayout(**fields)  # type: ignore[arg-type]


def test_offsets_follow_the_pool_shape() -> None:
    lay = layout()
    assert lay.shape == (2, 2, 8, 2, 4, 3)
    assert lay.block_bytes == 2 * 4 * 3 * 4
    assert lay.pool_bytes == 2 * 2 * 8 * lay.block_bytes
    assert lay.offset(0, 0, 0) == 0
    assert lay.offset(0, 1, 0) == 8 * lay.block_bytes  # V follows K's blocks
    assert lay.offset(1, 0, 3) == (2 * 8 + 3) * lay.block_bytes


def test_runs_consecutive_on_both_sides_merge() -> None:
    lay = layout()
    plan = plan_copies(lay, lay, [0, 1, 2, 5], [3, 4, 5, 0], layers=[0])
    size = lay.block_bytes
    assert plan == [Copy(0, 3 * size, 3 * size), Copy(5 * size, 0, size),
                    Copy(8 * size, 11 * size, 3 * size), Copy(13 * size, 8 * size, size)]


def test_layouts_that_differ_in_anything_but_size_are_refused() -> None:
    assert layout(8).fingerprint() == layout(100).fingerprint()
    assert layout(8).mismatch(layout(100)) is None
    for change in ({"dtype": "float16"}, {"head_dim": 4}, {"model": "other"},
                   {"block_size": 16}, {"num_layers": 3}, {"kv_heads": 1}):
        other = layout(**change)
        assert layout().fingerprint() != other.fingerprint()
        with pytest.raises(ValueError, match="KV layouts differ"):
            plan_copies(layout(), other, [0], [0])


@pytest.mark.parametrize(("src", "dst", "message"), [
    ([0, 1], [0], "2 source blocks for 1"),
    ([0, 1], [2, 2], "listed twice"),
    ([8], [0], "source block 8 outside"),
    ([0], [-1], "destination block -1 outside"),
])
def test_bad_block_lists_are_refused(src: list[int], dst: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_copies(layout(), layout(), src, dst)


@given(st.data())
def test_the_plan_copies_exactly_the_listed_blocks(data: st.DataObject) -> None:
    src_layout, dst_layout = layout(6), layout(9)
    count = data.draw(st.integers(0, 6))
    src_ids = data.draw(st.lists(st.integers(0, 5), min_size=count, max_size=count))
    dst_ids = data.draw(st.lists(st.integers(0, 8), min_size=count, max_size=count,
                                 unique=True))
    layers = data.draw(st.sampled_from([None, [0], [1], [1, 0]]))
    source = bytes(i % 251 for i in range(src_layout.pool_bytes))
    planned = bytearray(dst_layout.pool_bytes)
    for copy in plan_copies(src_layout, dst_layout, src_ids, dst_ids, layers):
        planned[copy.dst:copy.dst + copy.nbytes] = source[copy.src:copy.src + copy.nbytes]
    naive = bytearray(dst_layout.pool_bytes)
    size = src_layout.block_bytes
    for layer in (range(2) if layers is None else layers):
        for kv in (0, 1):
            for s, d in zip(src_ids, dst_ids, strict=True):
                at = dst_layout.offset(layer, kv, d)
                naive[at:at + size] = source[src_layout.offset(layer, kv, s):][:size]
    assert planned == naive
