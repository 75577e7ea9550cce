"""Step planning: decodes first, chunked prefill within the token budget, preemption."""

from __future__ import annotations

from fdcore.engine.batcher import Batcher
from fdcore.engine.block_manager import BlockManager
from fdcore.engine.runners.sim.tokenizer import ByteTokenizer
from fdcore.engine.sequence import Seq
from fdcore.types import EngineRequest, SamplingParams


def seq(rid: str, prompt_len: int) -> Seq:
    request = EngineRequest(rid, [ord("a") + i % 26 for i in range(prompt_len)],
                            SamplingParams(), arrival_time=0.0)
    return Seq.from_request(request, ByteTokenizer())


def run_step(batcher: Batcher) -> dict[str, int]:
    """Plan a step and apply it as the engine would (a sampled token ends each full chunk)."""
    plan = batcher.schedule()
    for work in plan:
        completes = work.completes
        work.seq.num_computed += work.num_tokens
        if completes:
            work.seq.tokens.append(ord("z"))
    return {w.seq.request_id: w.num_tokens for w in plan}


def test_long_prompt_is_chunked_and_decodes_go_first() -> None:
    batcher = Batcher(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    short, long = seq("short", 3), seq("long", 25)
    batcher.add(short)
    assert run_step(batcher) == {"short": 3}
    batcher.add(long)
    assert run_step(batcher) == {"short": 1, "long": 9}
    assert run_step(batcher) == {"short": 1, "long": 9}
    assert run_step(batcher) == {"short": 1, "long": 7}
    assert run_step(batcher) == {"short": 1, "long": 1}


def test_out_of_blocks_preempts_the_newest_and_resumes_it_from_cache() -> None:
    blocks = BlockManager(4, 4)
    batcher = Batcher(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    old, new = seq("old", 8), seq("new", 7)
    batcher.add(old)
    batcher.add(new)
    assert [s.request_id for s in batcher.running] == ["old", "new"]
    assert run_step(batcher) == {"old": 8, "new": 7}
    for s in (old, new):
        blocks.commit(s.table, s.tokens, s.num_computed)
    # "old" (9 tokens) needs a third block; none is free, so "new" makes room.
    assert run_step(batcher) == {"old": 1}
    assert batcher.num_preemptions == 1 and list(batcher.waiting) == [new]
    assert new.num_computed == 0 and not new.table.blocks
    batcher.remove(old)
    batcher.admit_waiting()
    assert batcher.running == [new] and new.num_computed == 4  # its first block was cached
