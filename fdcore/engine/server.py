"""Builds an engine from its config and serves it with hypercorn on uvloop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
import uvloop
from pydantic import ValidationError
from starlette.types import ASGIApp

from fdcore.drain import Drain
from fdcore.engine.app import Component, build_app, build_metrics_app
from fdcore.engine.assembly import assemble
from fdcore.engine.config import SCHEDULER_PREFIX, EngineConfig, describe
from fdcore.engine.context import EngineContext
from fdcore.engine.loader import LoadedModel, load
from fdcore.engine.registration import Registrar, advertised_ip, register_payload
from fdcore.engine.serving import Serving
from fdcore.engine.torch_thread import on_torch_thread
from fdcore.errors import StartupError
from fdcore.plugins import load_plugins
from fdcore.registry import Component as Registered
from fdcore.server import serve_apps
from fdcore.server_limits import ServerLimits
from fdcore.types import SchedulerContext, StrictModel

log = structlog.get_logger(__name__)


def scheduler_config(
    component: Registered, options: dict[str, Any], origin: dict[str, str]
) -> StrictModel:
    """Validate ``--scheduler-*`` options against the chosen plugin's ``Config``."""
    config_cls: type[StrictModel] = component.cls.Config
    known = sorted(f.alias or name for name, f in config_cls.model_fields.items())
    for key in options:
        if key.replace("_", "-") not in known:
            takes = ", ".join(f"--{SCHEDULER_PREFIX}{k}" for k in known) or "no options"
            raise StartupError(
                f"{origin[key]}: unknown option of scheduler {component.name!r} "
                f"(plugin {component.plugin!r}; it takes {takes})"
            )
    try:
        return config_cls.model_validate({k.replace("_", "-"): v for k, v in options.items()})
    except ValidationError as exc:
        by_field = {k.replace("_", "-"): where for k, where in origin.items()}
        raise StartupError(describe(exc, by_field)) from None


def serve(config: EngineConfig, options: dict[str, Any], origin: dict[str, str]) -> int:
    """Load plugins and the model, then serve until SIGINT or SIGTERM; returns the exit code."""
    plugins = load_plugins(config.plugins, config.block_plugins)
    component = plugins.registry.get("scheduler", config.scheduler_name)
    sched_config = scheduler_config(component, options, origin)
    log.info("engine.loading", model=config.model, device=config.device)
    started = time.perf_counter()
    model = on_torch_thread(load, config)
    log.info("engine.loaded", model=model.name, seconds=round(time.perf_counter() - started, 1),
             kv_blocks=model.runner.num_blocks)
    if model.runner.num_blocks <= config.enc_dec_block_num:
        raise StartupError(
            f"the KV cache has {model.runner.num_blocks} blocks; it needs more than "
            f"--enc-dec-block-num ({config.enc_dec_block_num})"
        )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(config, component, sched_config, model))
    return 0


async def _serve(
    config: EngineConfig, component: Registered, sched_config: StrictModel, model: LoadedModel
) -> None:
    host_ip = advertised_ip(config.host)
    metrics_port = config.metrics_port or config.port
    scheduler = component.cls(
        sched_config,
        SchedulerContext(f"{host_ip}:{config.port}", host_ip, config.port, config.block_size),
    )
    parts = assemble(config, model, scheduler)
    cache_tokens = parts.blocks.num_blocks * parts.blocks.block_size
    name = config.served_model_name or model.name
    ctx = EngineContext(
        model_name=name, served_names=frozenset({name, config.model, model.name}),
        tokenizer=model.tokenizer, vocab_size=model.runner.vocab_size,
        max_model_len=model.max_model_len, cache_tokens=cache_tokens,
        serving=parts.serving, scheduler=scheduler, metrics=parts.metrics,
        instance_id=f"{host_ip}:{config.port}", max_body_bytes=config.max_request_bytes,
    )
    components: list[Component] = [parts.engine, parts.serving]
    if config.router:
        payload = register_payload(
            role=config.splitwise_role.value, host_ip=host_ip, port=config.port,
            metrics_port=metrics_port,
            connector_port=config.pd_comm_port[0] if config.pd_comm_port else 0,
            engine_worker_queue_port=config.engine_worker_queue_port,
            transfer_protocol=config.cache_transfer_protocol,
            rdma_ports=config.rdma_comm_ports, device_ids=config.device_ids,
        )
        local = "127.0.0.1" if config.host in ("", "0.0.0.0", "::") else host_ip
        health_url = f"http://{local}:{config.port}/health"
        components.append(Registrar(config.router, payload, config.register_interval, health_url,
                                    config.router_admin_key))
    drain = ctx.drain
    apps: list[tuple[ASGIApp, int]] = [(build_app(ctx, components), config.port)]
    if metrics_port != config.port:
        apps.append((build_metrics_app(ctx), metrics_port))
    # Started before the servers (not in their lifespan) so that a plugin's StartupError, such
    # as an unreachable Redis, ends start-up with its one-line message.
    await scheduler.start()
    aborting = asyncio.create_task(_abort_on_expiry(drain, parts.serving))
    try:
        await serve_apps(apps, config.host, "hypercorn", ServerLimits.from_config(config), drain)
    except OSError as exc:
        raise StartupError(f"cannot serve on {config.host}: {exc}") from None
    finally:
        aborting.cancel()
        await scheduler.stop()
    log.info("engine.stopped", used_blocks=parts.blocks.num_used,
             available_blocks=parts.blocks.num_available, total_blocks=parts.blocks.num_blocks)


async def _abort_on_expiry(drain: Drain, serving: Serving) -> None:
    """When the drain's grace is over, abort what still runs: each stream ends with
    ``finish_reason: abort`` and its KV blocks return to the free pool."""
    await drain.expired.wait()
    ids = serving.active_ids()
    if ids:
        log.info("engine.drain_abort", requests=len(ids))
        await serving.abort(ids)
