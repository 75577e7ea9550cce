"""``cache_aware``: send a prompt where its prefix is likely cached, unless load says otherwise."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

import fdcore
from fdcore.policies import BasePolicy
from fdcore.registry import Register
from fdcore.tasks import cancel_and_wait
from fdcore.types import Instance, PolicyContext, RouteRequest, StrictModel

from .block_hashes import block_hashes
from .cache_scores import CacheScoreConfig, CandidateState, choose, hit_percent
from .policy_metrics import PolicyMetrics
from .radix_tree import RadixTree
from .tokenizer_client import RemoteTokenizer, TokenizeFailed


class CacheAwareConfig(CacheScoreConfig):
    """Options of ``cache_aware`` (FastDeploy's keys and defaults, plus fdcore's bounds)."""

    cache_block_size: int = Field(64, ge=1)
    """Tokens per hashed block; a trailing partial block is not hashed."""
    tokenizer_url: str = ""
    """Tokenize endpoint; empty: tokens are the prompt's Unicode code points."""
    tokenizer_timeout_secs: float = Field(2.0, gt=0)
    """Limit on one tokenizer call; on failure the prompt is hashed as characters."""
    eviction_interval_secs: float = Field(60.0, gt=0)
    """Seconds between sweeps of expired tree entries."""
    eviction_duration_mins: float = Field(30.0, gt=0)
    """An instance's entry expires this long after a prompt through it was last sent there."""
    max_tree_blocks: int = Field(200_000, ge=1)
    """Most block hashes the tree holds; least recently used prefixes are dropped beyond it."""
    hash_seed: int = Field(0, ge=0, lt=1 << 64)
    """Start of every hash chain (FastDeploy picks one at random per process)."""


class CacheAwarePolicy(BasePolicy):
    """Prefix-cache-aware routing over a radix tree of the prompts sent to each instance.

    Each prompt is cut into blocks whose chained hashes are looked up in the tree; the hit
    ratio per candidate and the candidates' loads decide (see :func:`.cache_scores.choose`:
    bounded-load affinity by default, FastDeploy's score with ``load-factor: 0``), and the
    prompt is then recorded for the chosen instance. Load is the router's count of requests
    in flight.
    """

    name = "cache_aware"
    Config: ClassVar[type[StrictModel]] = CacheAwareConfig
    config: CacheAwareConfig

    def __init__(self, config: StrictModel, context: PolicyContext) -> None:
        super().__init__(config, context)
        cfg = self.config
        self.tree = RadixTree(cfg.max_tree_blocks, cfg.eviction_duration_mins * 60)
        self._metrics = context.metrics_once(PolicyMetrics)
        self._tokenizer = (
            RemoteTokenizer(cfg.tokenizer_url, cfg.tokenizer_timeout_secs)
            if cfg.tokenizer_url
            else None
        )
        self._turn = 0
        self._evictor: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the tokenizer client and start the expiry sweep."""
        await super().start()
        if self._tokenizer is not None:
            await self._tokenizer.start()
        self._evictor = asyncio.create_task(self._evict_forever(), name=f"{self.name} eviction")

    async def stop(self) -> None:
        """Stop the sweep and close the tokenizer client."""
        await cancel_and_wait(self._evictor)
        self._evictor = None
        if self._tokenizer is not None:
            await self._tokenizer.stop()
        await super().stop()

    def metrics(self, instance: Instance) -> tuple[float, float]:
        """``(running, waiting)``: the router's requests in flight, nothing known queued."""
        return instance.load.requests, 0.0

    def load(self, instance: Instance) -> float:
        """Requests on the instance, running or queued."""
        running, waiting = self.metrics(instance)
        return running + waiting

    async def tokens(self, prompt: str) -> str | list[int]:
        """The prompt's tokens: from ``tokenizer-url`` when set and working, else characters."""
        if self._tokenizer is None or not prompt:
            return prompt
        try:
            return await self._tokenizer.tokenize(prompt)
        except TokenizeFailed as exc:
            role = self.context.role.value
            self._metrics.tokenizer_fallbacks.labels(self.name, role, exc.reason).inc()
            return prompt

    async def select(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        """Choose by cache hit and load, then record the prompt for the chosen instance."""
        cfg = self.config
        tokens = await self.tokens(request.prompt)
        hashes = block_hashes(tokens, cfg.cache_block_size, cfg.hash_seed)
        matched = self.tree.match(hashes, [c.url for c in candidates]) if hashes else {}
        states = [
            CandidateState(
                hit=hit_percent(matched.get(c.url, 0), len(hashes)),
                load=self.load(c),
                tokens=c.load.tokens,
                cached_blocks=self.tree.instance_blocks(c.url),
            )
            for c in candidates
        ]
        index, branch = choose(states, cfg, self._turn)
        self._turn += 1
        chosen = candidates[index]
        if hashes:
            self.tree.insert(hashes, chosen.url, time.monotonic())
        role = self.context.role.value
        self._metrics.decisions.labels(self.name, role, branch.value).inc()
        self._metrics.tree_blocks.labels(self.name, role).set(self.tree.blocks)
        return chosen

    def evict(self, now: float | None = None) -> int:
        """Drop expired tree entries now; return the blocks freed."""
        freed = self.tree.evict_expired(time.monotonic() if now is None else now)
        self._metrics.tree_blocks.labels(self.name, self.context.role.value).set(self.tree.blocks)
        return freed

    def forget(self, instance: Instance) -> None:
        """Drop the instance from the tree."""
        super().forget(instance)
        self.tree.remove_instance(instance.url)

    async def _evict_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.eviction_interval_secs)
            self.evict()


@fdcore.hookimpl
def fdcore_register_policies(register: Register) -> None:
    """Register ``cache_aware``."""
    register.add_policy(CacheAwarePolicy)
