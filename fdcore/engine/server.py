"""Builds an engine from its config and serves it with hypercorn on uvloop
(:mod:`fdcore.server`, the same serving as the router's)."""

from __future__ import annotations

import functools
import time
from typing import Any, cast

import structlog
from starlette.types import ASGIApp

from fdcore import __version__
from fdcore.engine.app import build_app, build_metrics_app
from fdcore.engine.config import SCHEDULER_PREFIX, EngineConfig
from fdcore.engine.disagg.transports import build_transports, pool_allocator
from fdcore.engine.engine import build_engine, engine_card, kv_layout_of
from fdcore.engine.loader import LoadedModel, load
from fdcore.engine.registration import advertised_ip
from fdcore.engine.torch_thread import on_torch_thread
from fdcore.errors import StartupError
from fdcore.options import Choice, Origin, check_option_keys, kebab, validate_options
from fdcore.plugins import load_plugins
from fdcore.registry import Component as Registered
from fdcore.server import run, serve_apps
from fdcore.server_limits import ServerLimits
from fdcore.types import HostInfo, Role, SchedulerContext, StrictModel, Transport

log = structlog.get_logger(__name__)


def scheduler_config(
    component: Registered, options: dict[str, Any], origin: dict[str, str],
    registered: list[Registered],
) -> StrictModel:
    """Validate ``--scheduler-*`` options against the chosen plugin's ``Config`` with
    :mod:`fdcore.options`: every problem, one line each, named by the flag, variable or file
    that gave the value (``origin``); ``registered`` is every scheduler."""
    flag = f"--{SCHEDULER_PREFIX}"
    check_option_keys(registered, {"scheduler": {"name"}})
    choice = Choice("scheduler", [component], registered, f"{flag}name {component.name}",
                    noun="option", spell=lambda key: flag + key, section_keys=("name",))
    checked = validate_options(choice, options,
                               lambda key: Origin(origin.get(key) or flag + kebab(key)))
    return cast(StrictModel, checked.configs[component.name])


def serve(config: EngineConfig, options: dict[str, Any], origin: dict[str, str]) -> int:
    """Load plugins and the model, then serve until SIGINT or SIGTERM; returns the exit code."""
    plugins = load_plugins(config.plugins, config.block_plugins,
                           host=HostInfo("engine", __version__))
    component = plugins.component("scheduler", config.scheduler_name)
    sched_config = scheduler_config(component, options, origin,
                                    [c for c in plugins.registry if c.family == "scheduler"])
    host_ip = advertised_ip(config.host)
    transports = (build_transports(plugins, config.cache_transfer_protocol, device=config.device,
                                   host=host_ip, instance_id=f"{host_ip}:{config.port}",
                                   ports=[int(p) for p in config.rdma_comm_ports])
                  if config.splitwise_role is not Role.MIXED else {})
    if config.quantization:
        log.warning("engine.flag_ignored", flag="--quantization", value=config.quantization,
                    reason="weights run as the model file stores them")
    log.info("engine.loading", model=config.model, device=config.device)
    started = time.perf_counter()
    allocate = pool_allocator(transports, config.device) if transports else None
    model = on_torch_thread(load, config, allocate)
    log.info("engine.loaded", model=model.name, seconds=round(time.perf_counter() - started, 1),
             kv_blocks=model.runner.num_blocks)
    if model.runner.num_blocks <= config.enc_dec_block_num:
        raise StartupError(
            f"the KV cache has {model.runner.num_blocks} blocks; it needs more than "
            f"--enc-dec-block-num ({config.enc_dec_block_num})"
        )
    run(functools.partial(_serve, config, component, sched_config, model, transports))
    return 0


async def _serve(
    config: EngineConfig, component: Registered, sched_config: StrictModel, model: LoadedModel,
    transports: dict[str, Transport],
) -> None:
    host_ip = advertised_ip(config.host)
    metrics_port = config.metrics_port or config.port
    context = SchedulerContext(
        f"{host_ip}:{config.port}", host_ip, config.port, config.block_size,
        role=config.splitwise_role, card=engine_card(config, host_ip, kv_layout_of(model)),
    )
    scheduler = component.cls(sched_config, context)
    engine = build_engine(config, model, scheduler, host_ip, transports)
    context.cancel = engine.loop.request_abort
    apps: list[tuple[ASGIApp, int]] = [(build_app(engine), config.port)]
    if metrics_port != config.port:
        apps.append((build_metrics_app(engine), metrics_port))
    # Started before the servers (not in their lifespan) so that a plugin's StartupError, such
    # as an unreachable Redis, ends start-up with its one-line message.
    await engine.start()
    log.info("engine.serving", model=engine.model_name, instance=engine.instance_id)
    try:
        await serve_apps(apps, config.host, "hypercorn", ServerLimits.from_config(config),
                         engine.drain)
    except OSError as exc:
        raise StartupError(f"cannot serve on {config.host}: {exc}") from None
    finally:
        await engine.stop()
    log.info("engine.stopped", used_blocks=engine.blocks.num_used,
             available_blocks=engine.blocks.num_available, total_blocks=engine.blocks.num_blocks)
