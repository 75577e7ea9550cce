"""The engine object: a loaded model and a scheduler wired into parts that start and stop in
order, with the names and limits the HTTP routes read (``app.state.engine``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from fdcore.drain import Drain
from fdcore.engine.batcher import Batcher
from fdcore.engine.block_manager import BlockManager
from fdcore.engine.config import EngineConfig
from fdcore.engine.disagg.pd import PD
from fdcore.engine.disagg.side import EngineParts, PDSettings
from fdcore.engine.engine_loop import EngineLoop
from fdcore.engine.loader import LoadedModel
from fdcore.engine.metrics import EngineMetrics
from fdcore.engine.registration import Registrar, kv_layout_payload, register_payload
from fdcore.engine.runner import Tokenizer
from fdcore.engine.sequence import Seq
from fdcore.engine.serving import Serving
from fdcore.errors import StartupError
from fdcore.kv import KVLayout
from fdcore.tasks import cancel_and_wait
from fdcore.types import RequestOutput, Role, Scheduler, Transport

log = structlog.get_logger(__name__)


class Part(Protocol):
    """A part with background work: the scheduler, the step loop, serving, the registrar."""

    async def start(self) -> None:
        """Start background work."""

    async def stop(self) -> None:
        """Stop background work."""


@dataclass(slots=True, eq=False)
class Engine:
    """One engine: its parts, names and limits.

    :meth:`start` starts the scheduler, the step loop, serving and (when registering with a
    router) the registrar, in that order; :meth:`stop` stops what was started, in reverse.
    While started it also watches the drain: once its grace is over, what still runs is aborted.
    """

    model_name: str  # the served name: what /v1/models lists and responses carry
    served_names: frozenset[str]  # names a request's ``model`` may give
    instance_id: str  # host:port, the origin of this engine's requests
    tokenizer: Tokenizer
    vocab_size: int
    max_model_len: int
    cache_tokens: int  # KV-cache capacity in tokens: what one sequence can use at most
    max_body_bytes: int
    scheduler: Scheduler
    blocks: BlockManager
    batcher: Batcher
    metrics: EngineMetrics
    loop: EngineLoop
    serving: Serving
    registrar: Registrar | None = None
    pd: PD | None = None  # the P-D hand-off, on a prefill or decode engine
    drain: Drain = field(default_factory=Drain)  # begun by the server on SIGTERM
    _started: list[Part] = field(default_factory=list, init=False, repr=False)
    _expiry: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    @property
    def parts(self) -> list[Part]:
        """What :meth:`start` starts, in order."""
        parts: list[Part] = [self.scheduler, *([self.pd] if self.pd else []), self.loop,
                             self.serving]
        if self.registrar is not None:
            parts.append(self.registrar)
        return parts

    async def start(self) -> None:
        """Start every part in order; when one fails, stop those started before it and raise."""
        for part in self.parts:
            try:
                await part.start()
            except BaseException:
                await self.stop()
                raise
            self._started.append(part)
        self._expiry = asyncio.create_task(self._abort_on_expiry(), name="fdcore-drain-abort")

    async def stop(self) -> None:
        """Stop what :meth:`start` started, in reverse order (a second call does nothing)."""
        await cancel_and_wait(self._expiry)
        self._expiry = None
        while self._started:
            await self._started.pop().stop()

    async def _abort_on_expiry(self) -> None:
        """When the drain's grace is over, abort what still runs: each stream ends with
        ``finish_reason: abort`` and its KV blocks return to the free pool."""
        await self.drain.expired.wait()
        ids = self.serving.active_ids()
        if ids:
            log.info("engine.drain_abort", requests=len(ids))
            await self.serving.abort(ids)


def build_engine(
    config: EngineConfig, model: LoadedModel, scheduler: Scheduler, host_ip: str,
    transports: dict[str, Transport] | None = None,
) -> Engine:
    """The engine for ``model`` behind ``scheduler``, reached at ``host_ip:config.port``; it
    registers with ``config.router`` when one is set. A prefill or decode engine hands KV off
    through ``transports`` (built by :func:`~fdcore.engine.disagg.transports.build_transports`
    before the model, whose pool they allocated)."""
    metrics = EngineMetrics()
    blocks = BlockManager(model.runner.num_blocks, config.block_size, config.enable_prefix_caching)
    layout = kv_layout_of(model)
    pd = _pd(config, host_ip, layout, transports or {}, blocks, metrics)

    def on_admit(seq: Seq) -> None:
        metrics.on_admit(seq.prompt_len, seq.num_cached_tokens)
        if pd is not None:
            pd.on_admitted(seq)

    batcher = Batcher(
        blocks, config.max_num_seqs, config.max_num_batched_tokens, on_admit=on_admit,
        on_remove=pd.on_removed if pd is not None else None,
    )
    metrics.bind(
        running=lambda: len(batcher.running), available_blocks=lambda: blocks.num_available,
        free_blocks=lambda: blocks.num_free, used_blocks=lambda: blocks.num_used,
        total_blocks=blocks.num_blocks, max_num_seqs=config.max_num_seqs,
    )
    loop = EngineLoop(
        runner=model.runner, tokenizer=model.tokenizer, scheduler=scheduler, batcher=batcher,
        metrics=metrics, eos_token_ids=model.eos_token_ids, max_model_len=model.max_model_len,
        reserved_output_blocks=config.enc_dec_block_num, pd=pd,
    )
    serving = Serving(scheduler, loop, metrics, take_over=pd.takes if pd is not None else None)
    loop.deliver = serving.deliver
    if pd is not None:
        pd.bind(EngineParts(
            batcher=batcher, blocks=blocks, tokenizer=model.tokenizer,
            finish=loop.finish_reason, emit=_emitter(config.splitwise_role, scheduler, loop),
            abort=loop.request_abort,
            on_admit=lambda seq: metrics.on_admit(seq.prompt_len, seq.num_cached_tokens)))
    name = config.served_model_name or model.name
    return Engine(
        model_name=name, served_names=frozenset({name, config.model, model.name}),
        instance_id=f"{host_ip}:{config.port}", tokenizer=model.tokenizer,
        vocab_size=model.runner.vocab_size, max_model_len=model.max_model_len,
        cache_tokens=blocks.num_blocks * blocks.block_size,
        max_body_bytes=config.max_request_bytes, scheduler=scheduler, blocks=blocks,
        batcher=batcher, metrics=metrics, loop=loop, serving=serving,
        registrar=(_registrar(config, config.router, host_ip, layout)
                   if config.router else None),
        pd=pd,
    )


def _emitter(
    role: Role, scheduler: Scheduler, loop: EngineLoop
) -> Callable[[list[RequestOutput]], Awaitable[None]]:
    """Where the hand-off's own outputs go: P's requests came through the scheduler; D's
    went straight to the hand-off, from the API or from a pairing scheduler
    (:meth:`EngineLoop.hand_out` tells which)."""
    return scheduler.put_results if role is Role.PREFILL else loop.hand_out


def _pd(
    config: EngineConfig, host_ip: str, layout: KVLayout | None,
    transports: dict[str, Transport], blocks: BlockManager, metrics: EngineMetrics,
) -> PD | None:
    if config.splitwise_role is Role.MIXED:
        return None
    if layout is None:
        raise StartupError("--splitwise-role needs a runner with a real KV cache")
    port = config.pd_comm_port[0]
    return PD(role=config.splitwise_role,
              settings=PDSettings(config.pd_hold_secs, config.pd_first_contact_secs),
              host=config.host, port=port, advertise=f"{host_ip}:{port}", layout=layout,
              transports=transports, blocks=blocks, registry=metrics.registry)


def kv_layout_of(model: LoadedModel) -> KVLayout | None:
    """The layout of ``model``'s KV pool, read off its runner's cache tensors (``None`` for a
    runner without a real cache)."""
    caches = model.runner.kv_caches()
    if not caches:
        return None
    keys, _ = caches[0]
    num_blocks, kv_heads, block_size, head_dim = keys.shape
    return KVLayout(num_layers=len(caches), num_blocks=num_blocks, kv_heads=kv_heads,
                    block_size=block_size, head_dim=head_dim,
                    dtype=str(keys.dtype).removeprefix("torch."), model=model.name)


def engine_card(config: EngineConfig, host_ip: str, layout: KVLayout | None) -> dict[str, Any]:
    """What this engine registers with a router (and a pairing scheduler publishes)."""
    return register_payload(
        role=config.splitwise_role.value, host_ip=host_ip, port=config.port,
        metrics_port=config.metrics_port or config.port,
        connector_port=config.pd_comm_port[0] if config.pd_comm_port else 0,
        engine_worker_queue_port=config.engine_worker_queue_port,
        transfer_protocol=config.cache_transfer_protocol,
        rdma_ports=config.rdma_comm_ports, device_ids=config.device_ids,
        kv_layout=None if layout is None else kv_layout_payload(layout),
    )


def _registrar(
    config: EngineConfig, router: str, host_ip: str, layout: KVLayout | None
) -> Registrar:
    payload = engine_card(config, host_ip, layout)
    local = "127.0.0.1" if config.host in ("", "0.0.0.0", "::") else host_ip
    health_url = f"http://{local}:{config.port}/health"
    return Registrar(router, payload, config.register_interval, health_url,
                     config.router_admin_key)
