"""Picks the model runner: ``sim`` here, anything else through the torch loader."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fdcore.engine.config import EngineConfig
from fdcore.engine.runner import ModelRunner, Tokenizer
from fdcore.engine.sim_runner import SimProfile, SimRunner
from fdcore.engine.tokenizer_sim import ByteTokenizer
from fdcore.errors import StartupError

SIM_MODEL = "sim"
SIM_MAX_MODEL_LEN = 8192
SIM_NUM_BLOCKS = 1024
# What SmolLM2-135M's cache costs per token in float16: --kv-cache-memory means the same for sim.
SIM_KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 2


class LoadedModel(Protocol):
    """What a loader returns: the runner, its tokenizer and the model's limits."""

    @property
    def runner(self) -> ModelRunner:
        """The model runner with its KV cache allocated."""

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer."""

    @property
    def name(self) -> str:
        """The model's name (default served name)."""

    @property
    def max_model_len(self) -> int:
        """Context length in tokens."""

    @property
    def eos_token_ids(self) -> Sequence[int]:
        """Tokens that end generation."""


@dataclass(slots=True)
class SimModel:
    """The ``sim`` model: :class:`SimRunner` with the byte tokenizer."""

    runner: SimRunner
    tokenizer: ByteTokenizer
    name: str
    max_model_len: int
    eos_token_ids: Sequence[int]


def load(config: EngineConfig) -> LoadedModel:
    """Load ``config.model`` with its KV cache sized by the config."""
    if config.model == SIM_MODEL:
        return _load_sim(config)
    import torch

    from fdcore.engine.model import load_model

    if config.cpu_threads:
        # Engines sharing a machine should not each spin a thread per core.
        torch.set_num_threads(config.cpu_threads)
    try:
        loaded: LoadedModel = load_model(
            config.model,
            device=config.device,
            dtype=config.dtype,
            block_size=config.block_size,
            num_blocks=config.num_gpu_blocks,
            kv_cache_memory_bytes=config.kv_cache_memory,
            max_model_len=config.max_model_len,
        )
    except ValueError as exc:
        raise StartupError(f"--model: {exc}") from None
    return loaded


def _load_sim(config: EngineConfig) -> SimModel:
    num_blocks = config.num_gpu_blocks or (
        max(1, config.kv_cache_memory // (config.block_size * SIM_KV_BYTES_PER_TOKEN))
        if config.kv_cache_memory
        else SIM_NUM_BLOCKS
    )
    max_model_len = config.max_model_len or SIM_MAX_MODEL_LEN
    runner = SimRunner(
        SimProfile.load(config.sim_profile), config.block_size, num_blocks, max_model_len
    )
    tokenizer = ByteTokenizer()
    return SimModel(runner, tokenizer, SIM_MODEL, max_model_len, tokenizer.eos_token_ids)
