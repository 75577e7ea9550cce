"""Continuous batching: which sequences run in the next step and how many tokens each feeds.

Admission takes a request's whole prompt in blocks at once, so the number of available blocks
the scheduler sees is exact. Decoding sequences then grow one block at a time; when none is
left the most recently admitted sequence is preempted (its blocks are returned, its computed
blocks stay in the prefix cache) and it waits at the head of the queue to be recomputed.
Nothing is ever dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from fdcore.engine.block_manager import BlockManager, OutOfBlocks
from fdcore.engine.sequence import Seq


@dataclass(slots=True)
class Work:
    """One sequence's share of a step: feed ``num_tokens`` tokens from ``seq.num_computed``."""

    seq: Seq
    num_tokens: int

    @property
    def completes(self) -> bool:
        """Whether this chunk reaches the end of the sequence (so a token is sampled)."""
        return self.seq.num_computed + self.num_tokens == len(self.seq.tokens)


class Batcher:
    """Holds the running and waiting (preempted) sequences and plans each step."""

    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        on_admit: Callable[[Seq], None] | None = None,
        on_remove: Callable[[Seq], None] | None = None,
    ) -> None:
        self.blocks = blocks
        self.on_admit = on_admit
        self.on_remove = on_remove
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.running: list[Seq] = []
        self.waiting: deque[Seq] = deque()
        self.num_preemptions = 0

    @property
    def room(self) -> int:
        """How many more sequences may run."""
        return self.max_num_seqs - len(self.running)

    def has_work(self) -> bool:
        """Whether any sequence is running or waiting."""
        return bool(self.running or self.waiting)

    def find(self, request_id: str) -> Seq | None:
        """The running or waiting sequence with this id."""
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None

    def add(self, seq: Seq) -> None:
        """Admit a new sequence, or queue it behind any waiting ones."""
        if self.waiting or not self._try_admit(seq):
            self.waiting.append(seq)

    def admit_waiting(self) -> None:
        """Admit waiting sequences, oldest first, while they fit."""
        while self.waiting and self.room > 0 and self._try_admit(self.waiting[0]):
            self.waiting.popleft()

    def remove(self, seq: Seq) -> None:
        """Take ``seq`` out (finished or aborted) and free its blocks."""
        self.detach(seq)
        self.blocks.free(seq.table)
        if self.on_remove is not None:
            self.on_remove(seq)

    def detach(self, seq: Seq) -> None:
        """Take ``seq`` out, leaving its blocks to the caller (a P-D hand-off pins them)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def adopt(self, seq: Seq) -> None:
        """Run ``seq`` whose table already covers its computed tokens (KV from a P-D
        hand-off); it may take the batch past ``max_num_seqs`` for a while, never the cache
        past its blocks (they are already its own)."""
        self.running.append(seq)

    def schedule(self) -> list[Work]:
        """Plan one step within the token budget: decodes first, then prefill chunks."""
        budget = self.max_num_batched_tokens
        planned: dict[Seq, int] = {}
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running or not seq.is_decoding:
                continue
            while not self.blocks.grow(seq.table, len(seq.tokens)):
                victim = self.running[-1]
                self._preempt(victim)
                budget += planned.pop(victim, 0)
                if victim is seq:
                    break
            else:
                planned[seq] = 1
                budget -= 1
        for seq in self.running:
            if budget == 0:
                break
            if seq not in planned and not seq.is_decoding:
                planned[seq] = min(len(seq.tokens) - seq.num_computed, budget)
                budget -= planned[seq]
        return [Work(seq, n) for seq, n in planned.items()]

    def _try_admit(self, seq: Seq) -> bool:
        if self.room <= 0:
            return False
        try:
            cached = self.blocks.allocate_prompt(seq.table, seq.tokens)
        except OutOfBlocks:
            return False
        seq.num_computed = cached
        if not seq.admitted_once:
            seq.num_cached_tokens = cached
            seq.admitted_once = True
            if self.on_admit is not None:
                self.on_admit(seq)
        self.running.append(seq)
        return True

    def _preempt(self, seq: Seq) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.table)
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
