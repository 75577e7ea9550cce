"""The step loop: pull work from the scheduler, run one batched forward pass, push outputs.

Planning and bookkeeping run on the event loop; the forward pass and sampling run in one
worker thread so the API stays responsive. Aborts are applied between steps, never while a
forward pass may still be writing a sequence's blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import structlog

from fdcore.engine.batcher import Batcher, Work
from fdcore.engine.block_manager import BlockManager
from fdcore.engine.metrics import EngineMetrics
from fdcore.engine.runner import ModelRunner, SeqInput, Tokenizer
from fdcore.engine.sampling import sample
from fdcore.engine.sequence import Sequence as Seq
from fdcore.types import RequestOutput, Scheduler

log = structlog.get_logger(__name__)

# How long an idle engine waits in ``get_requests`` before looking around again.
IDLE_WAIT_SECONDS = 0.5


class EngineLoop:
    """Runs the model over the batcher's plan, step after step, until stopped."""

    def __init__(
        self,
        *,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        scheduler: Scheduler,
        batcher: Batcher,
        metrics: EngineMetrics,
        eos_token_ids: Sequence[int],
        max_model_len: int,
        reserved_output_blocks: int,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.batcher = batcher
        self.blocks: BlockManager = batcher.blocks
        self.metrics = metrics
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.reserved_output_blocks = reserved_output_blocks
        self._aborts: list[tuple[set[str], asyncio.Future[None]]] = []
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fdcore-forward")
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start stepping in the background."""
        self._task = asyncio.create_task(self._run(), name="fdcore-engine-loop")

    async def stop(self) -> None:
        """Stop stepping; a forward pass in flight finishes in its thread."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def abort(self, request_ids: Iterable[str]) -> None:
        """Drop these sequences and free their blocks; returns once that is done."""
        ids = {rid for rid in request_ids if self.batcher.find(rid) is not None}
        if not ids:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._aborts.append((ids, done))
        await done

    async def _run(self) -> None:
        while True:
            await self._step()

    async def _step(self) -> None:
        self._apply_aborts()
        self.batcher.admit_waiting()
        if not self.batcher.waiting and self.batcher.room > 0:
            requests = await self.scheduler.get_requests(
                self.blocks.num_available,
                self.blocks.block_size,
                self.reserved_output_blocks,
                self.batcher.max_num_batched_tokens,
                batch=self.batcher.room,
                timeout=0.0 if self.batcher.has_work() else IDLE_WAIT_SECONDS,
            )
            for request in requests:
                self.batcher.add(Seq.from_request(request, self.tokenizer))
            self._apply_aborts()
        work = self.batcher.schedule()
        self.metrics.batch_size.set(len(work))
        if not work:
            return
        try:
            sampled = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._execute, work
            )
            outputs = self._complete(work, sampled)
        except Exception as exc:  # a failing step fails its requests, not the engine
            log.exception("engine.step_failed", batch=len(work))
            outputs = [self._fail(w.seq, f"engine step failed: {exc}") for w in work]
        await self.scheduler.put_results(outputs)

    def _execute(self, work: list[Work]) -> list[int]:
        inputs = [
            SeqInput(
                token_ids=w.seq.tokens[w.seq.num_computed : w.seq.num_computed + w.num_tokens],
                start_pos=w.seq.num_computed,
                block_table=w.seq.table.blocks,
            )
            for w in work
        ]
        logits = self.runner.forward(inputs)
        rows = [i for i, w in enumerate(work) if w.completes]
        if not rows:
            return []
        seqs = [work[i].seq for i in rows]
        return sample(
            logits[rows], [s.request.sampling for s in seqs], [s.generator for s in seqs]
        )

    def _complete(self, work: list[Work], sampled: list[int]) -> list[RequestOutput]:
        tokens = iter(sampled)
        outputs: list[RequestOutput] = []
        for w in work:
            seq = w.seq
            completes = w.completes
            seq.num_computed += w.num_tokens
            self.blocks.commit(seq.table, seq.tokens, seq.num_computed)
            if not completes:
                continue
            token = next(tokens)
            seq.tokens.append(token)
            reason = self._finish_reason(seq, token)
            outputs.append(seq.output([token], reason))
            if reason is not None:
                self.batcher.remove(seq)
        self.metrics.generation_tokens.inc(len(sampled))
        return outputs

    def _finish_reason(self, seq: Seq, token: int) -> str | None:
        params = seq.request.sampling
        if token in params.stop_token_ids or (
            not params.ignore_eos and token in self.eos_token_ids
        ):
            return "stop"
        seq.text.push(token)
        if seq.text.stopped:
            return "stop"
        if seq.num_output >= params.max_tokens or len(seq.tokens) >= self.max_model_len:
            return "length"
        return None

    def _fail(self, seq: Seq, message: str) -> RequestOutput:
        self.batcher.remove(seq)
        output = seq.output([], "error")
        output.error, output.error_code = message, 500
        return output

    def _apply_aborts(self) -> None:
        for ids, done in self._aborts:
            for rid in ids:
                seq = self.batcher.find(rid)
                if seq is not None:
                    self.batcher.remove(seq)
            if not done.done():
                done.set_result(None)
        self._aborts.clear()
