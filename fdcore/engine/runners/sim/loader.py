"""Builds the ``sim`` model from the engine config: its cache sized like a real model's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fdcore.engine.config import EngineConfig
from fdcore.engine.runner import Allocate
from fdcore.engine.runners.sim.runner import SimProfile, SimRunner
from fdcore.engine.runners.sim.tokenizer import ByteTokenizer

SIM_MAX_MODEL_LEN = 8192
SIM_NUM_BLOCKS = 1024
# What SmolLM2-135M's cache costs per token in float16: --kv-cache-memory means the same for sim.
SIM_KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 2


@dataclass(slots=True)
class SimModel:
    """The ``sim`` model: :class:`SimRunner` with the byte tokenizer."""

    runner: SimRunner
    tokenizer: ByteTokenizer
    name: str
    max_model_len: int
    eos_token_ids: Sequence[int]


def load_sim(config: EngineConfig, allocate: Allocate | None = None) -> SimModel:
    """The sim model with ``--num-gpu-blocks`` blocks, else as many as ``--kv-cache-memory``
    would hold for SmolLM2, else :data:`SIM_NUM_BLOCKS`."""
    num_blocks = config.num_gpu_blocks or (
        max(1, config.kv_cache_memory // (config.block_size * SIM_KV_BYTES_PER_TOKEN))
        if config.kv_cache_memory
        else SIM_NUM_BLOCKS
    )
    max_model_len = config.max_model_len or SIM_MAX_MODEL_LEN
    runner = SimRunner(
        SimProfile.load(config.sim_profile), config.block_size, num_blocks, max_model_len,
        allocate=allocate,
    )
    tokenizer = ByteTokenizer()
    return SimModel(runner, tokenizer, config.model, max_model_len, tokenizer.eos_token_ids)
