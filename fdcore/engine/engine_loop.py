"""The step loop: pull work from the scheduler, run one batched forward pass, push outputs.

Planning and bookkeeping run on the event loop; the forward pass and sampling run in one
worker thread so the API stays responsive. Aborts are applied between steps, never while a
forward pass may still be writing a sequence's blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import structlog

from fdcore.engine.batcher import Batcher, Work
from fdcore.engine.block_manager import BlockManager
from fdcore.engine.metrics import EngineMetrics
from fdcore.engine.runner import ModelRunner, SeqInput, Tokenizer
from fdcore.engine.sampling import sample
from fdcore.engine.sequence import Seq
from fdcore.engine.torch_thread import torch_executor
from fdcore.types import Capacity, EngineRequest, RequestOutput, Scheduler

if TYPE_CHECKING:
    from fdcore.engine.disagg.pd import PD

log = structlog.get_logger(__name__)

# How long an idle engine waits in ``get_requests`` before looking around again.
IDLE_WAIT_SECONDS = 0.5
# How long it waits instead while a P-D hand-off is in flight (its KV may land any moment).
HANDOFF_WAIT_SECONDS = 0.005


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
        pd: PD | None = None,
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
        self.pd = pd
        # Where outputs of sequences that bypass the scheduler go (set by the engine to its
        # API's Serving.deliver).
        self.deliver: Callable[[list[RequestOutput]], None] = lambda outputs: None
        # On D: hand-offs a pairing scheduler (``splitwise``) queued here; their outputs go
        # back through it, to the instance whose client waits.
        self._scheduled: set[str] = set()
        self._aborts: list[tuple[set[str], asyncio.Future[None]]] = []
        self._executor = torch_executor()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start stepping in the background."""
        self._task = asyncio.create_task(self._run(), name="fdcore-engine-loop")

    async def stop(self) -> None:
        """Stop stepping; a forward pass in flight finishes in its thread."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def abort(self, request_ids: Iterable[str]) -> None:
        """Drop these sequences and free their blocks; returns once that is done."""
        ids = {rid for rid in request_ids
               if self.batcher.find(rid) is not None or (self.pd and self.pd.knows(rid))}
        if not ids:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._aborts.append((ids, done))
        await done

    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except Exception:  # e.g. a network-backed scheduler failing: retry, keep serving
                log.exception("engine.loop_error")
                await asyncio.sleep(IDLE_WAIT_SECONDS)

    def request_abort(self, request_id: str) -> None:
        """Take ``request_id`` out of the batch at the next step (nobody waits for it)."""
        loop = asyncio.get_running_loop()
        self._aborts.append(({request_id}, loop.create_future()))

    async def _step(self) -> None:
        self._apply_aborts()
        await self._adopt()
        self.batcher.admit_waiting()
        if not self.batcher.waiting and self.batcher.room > 0:
            capacity = Capacity(
                available_blocks=self.blocks.num_available,
                block_size=self.blocks.block_size,
                reserved_output_blocks=self.reserved_output_blocks,
                max_num_batched_tokens=self.batcher.max_num_batched_tokens,
                batch=self.batcher.room,
            )
            idle = HANDOFF_WAIT_SECONDS if self.pd and self.pd.busy() else IDLE_WAIT_SECONDS
            requests = await self.scheduler.get_requests(
                capacity, timeout=0.0 if self.batcher.has_work() else idle
            )
            requests = [r for r in requests if not self._take_over(r)]
            rejected = [self._reject(r) for r in requests if not self._fits(r)]
            for request in requests:
                if self._fits(request):
                    self.batcher.add(Seq.from_request(request, self.tokenizer))
            if rejected:
                await self.scheduler.put_results(rejected)
            self._apply_aborts()
        preempted = self.batcher.num_preemptions
        work = self.batcher.schedule()
        self.metrics.request_preempted.inc(self.batcher.num_preemptions - preempted)
        self.metrics.batch_size.set(len(work))
        if not work:
            # Never a tight loop that starves the API: there is always an await per step.
            await asyncio.sleep(0)
            return
        if self.pd is not None:
            self.pd.on_step([w.seq for w in work])
        try:
            sampled = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._execute, work
            )
            outputs = self._complete(work, sampled)
        except Exception as exc:  # a failing step fails its requests, not the engine
            log.exception("engine.step_failed", batch=len(work))
            outputs = [self._fail(w.seq, f"engine step failed: {exc}") for w in work]
        await self._publish(outputs, {w.seq.request_id for w in work if w.seq.direct})

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
            reason = self.finish_reason(seq, token)
            if self.pd is not None and self.pd.hands_off(seq, token, reason):
                continue  # P's answer comes once D has the KV
            outputs.append(seq.output([token], reason))
            if reason is not None:
                self.batcher.remove(seq)
        self.metrics.generation_tokens.inc(len(sampled))
        return outputs

    def finish_reason(self, seq: Seq, token: int) -> str | None:
        """Why ``seq`` ends with ``token`` (``None``: it goes on); pushes its text."""
        params = seq.request.sampling
        if token in params.stop_token_ids or (
            not params.ignore_eos and token in self.eos_token_ids
        ):
            return "stop"
        seq.text.push(token)
        if seq.text.stopped:
            return "stop"
        if (
            seq.num_output >= params.max_tokens
            or len(seq.tokens) >= self.max_model_len
            # A sequence alone must always fit the cache, or it could never be resumed.
            or self.blocks.blocks_for(len(seq.tokens) + 1) > self.blocks.num_blocks
        ):
            return "length"
        return None

    def _fail(self, seq: Seq, message: str) -> RequestOutput:
        self.batcher.remove(seq)
        output = seq.output([], "error")
        output.error, output.error_code = message, 500
        return output

    def _fits(self, request: EngineRequest) -> bool:
        # A request validated by another instance (work stealing) may be too big for this one;
        # admitted anyway it would wait forever.
        return (
            request.prompt_len < self.max_model_len
            and self.blocks.blocks_for(request.prompt_len + 1) <= self.blocks.num_blocks
        )

    def _reject(self, request: EngineRequest) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            token_ids=[],
            finished=True,
            finish_reason="error",
            prompt_tokens=request.prompt_len,
            error=(
                f"the prompt ({request.prompt_len} tokens) does not fit this engine "
                f"(context {self.max_model_len}, KV cache {self.blocks.num_blocks} blocks of "
                f"{self.blocks.block_size})"
            ),
            error_code=400,
        )

    def _take_over(self, request: EngineRequest) -> bool:
        """On D: a hand-off a pairing scheduler queued here joins the hand-off, not the batch
        (its reservation, not admission, decides whether it fits)."""
        if self.pd is None or not self.pd.takes(request):
            return False
        self._scheduled.add(request.request_id)
        return True

    async def hand_out(self, outputs: list[RequestOutput]) -> None:
        """Outputs of P-D hand-offs taken over on D: back through the scheduler when it queued
        them here, else straight to this engine's API (the router sent them)."""
        scheduled = [o for o in outputs if o.request_id in self._scheduled]
        if len(scheduled) < len(outputs):
            self.deliver([o for o in outputs if o.request_id not in self._scheduled])
        if scheduled:
            self._scheduled.difference_update(o.request_id for o in scheduled if o.finished)
            await self.scheduler.put_results(scheduled)

    async def _publish(self, outputs: list[RequestOutput], direct: set[str]) -> None:
        """Outputs to their clients: through the scheduler, or (P-D hand-offs taken over on
        D) as :meth:`hand_out` says."""
        if direct:
            await self.hand_out([o for o in outputs if o.request_id in direct])
            outputs = [o for o in outputs if o.request_id not in direct]
        await self.scheduler.put_results(outputs)

    async def _adopt(self) -> None:
        """Sequences whose KV arrived from P: emit P's token first, then decode them."""
        if self.pd is None:
            return
        adopted = self.pd.take_adopted()
        if not adopted:
            return
        await self.hand_out([output for _, output in adopted])
        for seq, output in adopted:
            if output.finished:
                self.blocks.free(seq.table)
            else:
                self.batcher.adopt(seq)

    def _apply_aborts(self) -> None:
        for ids, done in self._aborts:
            for rid in ids:
                self._scheduled.discard(rid)
                seq = self.batcher.find(rid)
                if seq is not None:
                    self.batcher.remove(seq)
                if self.pd is not None:
                    self.pd.abort(rid)
            if not done.done():
                done.set_result(None)
        self._aborts.clear()
