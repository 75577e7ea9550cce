"""Picks the model runner: the ``sim`` room for ``--model sim``, the ``torch`` room otherwise.

Each room is imported only when it is chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from fdcore.engine.config import EngineConfig
from fdcore.engine.runner import Allocate, ModelRunner, Tokenizer
from fdcore.errors import StartupError

SIM_MODEL = "sim"


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


def load(config: EngineConfig, allocate: Allocate | None = None) -> LoadedModel:
    """Load ``config.model`` with its KV cache sized by the config (allocated by ``allocate``
    when given: the KV transports' pool)."""
    if config.model == SIM_MODEL:
        from fdcore.engine.runners.sim.loader import load_sim

        return load_sim(config, allocate)
    import torch

    from fdcore.engine.runners.torch import load_model

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
            allocate=allocate,
        )
    except ValueError as exc:
        raise StartupError(f"--model: {exc}") from None
    return loaded

