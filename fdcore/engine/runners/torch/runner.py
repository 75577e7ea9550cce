"""The ``torch`` model runner: a real decoder over a paged KV cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fdcore.engine.runner import Allocate, SeqInput

from .attention import CacheShape, plan_batch
from .llama import LlamaDecoder

__all__ = ["TorchRunner", "kv_bytes_per_block"]


def kv_bytes_per_block(decoder: LlamaDecoder, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block id holds across all layers, K and V."""
    cfg = decoder.cfg
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * cfg.num_kv_heads * block_size * cfg.head_dim * elem


class TorchRunner:
    """Implements :class:`fdcore.engine.runner.ModelRunner` with a :class:`LlamaDecoder`.

    The cache is one zeroed allocation ``[layers, 2, num_blocks, kv_heads, block_size,
    head_dim]``; :meth:`kv_caches` hands out contiguous per-layer K and V views of it. Zeroing
    matters: masked-out slots still pass through the attention matmul, where uninitialised NaNs
    would poison the result.
    """

    def __init__(
        self,
        decoder: LlamaDecoder,
        *,
        block_size: int,
        num_blocks: int,
        max_model_len: int,
        device: torch.device,
        dtype: torch.dtype,
        allocate: Allocate | None = None,
    ) -> None:
        cfg = decoder.cfg
        self.decoder = decoder
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.vocab_size = cfg.vocab_size
        self.max_model_len = max_model_len
        self.device = device
        self.dtype = dtype
        self._heads_per_kv = cfg.num_heads // cfg.num_kv_heads
        shape = (cfg.num_layers, 2, num_blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
        if allocate is None:
            self._cache = torch.zeros(shape, dtype=dtype, device=device)
        else:
            self._cache = allocate(shape, dtype)
            if (tuple(self._cache.shape) != shape or self._cache.dtype != dtype
                    or self._cache.device != device or not self._cache.is_contiguous()):
                raise ValueError(f"KV pool allocator gave {tuple(self._cache.shape)} "
                                 f"{self._cache.dtype} on {self._cache.device}; wanted {shape} "
                                 f"{dtype} on {device}, contiguous")
        layers = self._cache.unbind(0)
        self._caches = [(layer[0], layer[1]) for layer in layers]
        self._kv_rows = [layer.view(-1, cfg.head_dim) for layer in layers]
        self._shape = CacheShape(num_blocks, cfg.num_kv_heads, block_size)

    def forward(self, seqs: Sequence[SeqInput]) -> torch.Tensor:
        """Write the fed tokens' K/V into the cache and return float32 logits
        ``[len(seqs), vocab_size]`` for each sequence's last fed token."""
        if not seqs:
            return torch.empty((0, self.vocab_size), dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            plan = plan_batch(
                seqs,
                cache=self._shape,
                max_model_len=self.max_model_len,
                heads_per_kv=self._heads_per_kv,
                device=self.device,
            )
            logits: torch.Tensor = self.decoder(plan, self._kv_rows)
        # An inference tensor refuses in-place ops (e.g. a sampler's temperature scaling) outside
        # inference mode; a clone outside it is an ordinary tensor.
        return logits.clone()

    def kv_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer ``(K, V)`` views, each ``[num_blocks, kv_heads, block_size, head_dim]``."""
        return list(self._caches)
