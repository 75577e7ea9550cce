"""Wires a loaded model and a scheduler into a working engine (no HTTP)."""

from __future__ import annotations

from dataclasses import dataclass

from fdcore.engine.batcher import Batcher
from fdcore.engine.block_manager import BlockManager
from fdcore.engine.config import EngineConfig
from fdcore.engine.engine_loop import EngineLoop
from fdcore.engine.loader import LoadedModel
from fdcore.engine.metrics import EngineMetrics
from fdcore.engine.serving import Serving
from fdcore.types import Scheduler


@dataclass(slots=True)
class EngineParts:
    """The pieces of one engine; start ``engine`` then ``serving`` (and stop in reverse)."""

    blocks: BlockManager
    batcher: Batcher
    metrics: EngineMetrics
    engine: EngineLoop
    serving: Serving


def assemble(config: EngineConfig, model: LoadedModel, scheduler: Scheduler) -> EngineParts:
    """Block manager, batcher, metrics, step loop and serving for ``model`` behind ``scheduler``."""
    metrics = EngineMetrics()
    blocks = BlockManager(model.runner.num_blocks, config.block_size, config.enable_prefix_caching)
    batcher = Batcher(
        blocks, config.max_num_seqs, config.max_num_batched_tokens,
        on_admit=lambda seq: metrics.on_admit(seq.prompt_len, seq.num_cached_tokens),
    )
    metrics.bind(
        running=lambda: len(batcher.running), available_blocks=lambda: blocks.num_available,
        free_blocks=lambda: blocks.num_free, used_blocks=lambda: blocks.num_used,
        total_blocks=blocks.num_blocks, max_num_seqs=config.max_num_seqs,
    )
    engine = EngineLoop(
        runner=model.runner, tokenizer=model.tokenizer, scheduler=scheduler, batcher=batcher,
        metrics=metrics, eos_token_ids=model.eos_token_ids, max_model_len=model.max_model_len,
        reserved_output_blocks=config.enc_dec_block_num,
    )
    return EngineParts(blocks, batcher, metrics, engine, Serving(scheduler, engine, metrics))
