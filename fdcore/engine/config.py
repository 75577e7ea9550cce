"""``fdcore engine`` settings: one strict model behind the flags and ``engine.yaml``.

Keys are the flag names without ``--`` (kebab or snake case). ``scheduler-<field>`` keys other
than ``scheduler-name`` belong to the chosen scheduler plugin and are validated against its
``Config`` once plugins are loaded. Precedence: ``engine.yaml`` < ``FDCORE_ENGINE_<KEY>``
environment variables < flags; ``$env:NAME`` values in the YAML file are read from the
environment (for secrets such as a Redis password).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BeforeValidator, Field, ValidationError

from fdcore.config import resolve_env_refs
from fdcore.errors import StartupError
from fdcore.types import Role, StrictModel

SCHEDULER_PREFIX = "scheduler-"
ENV_PREFIX = "FDCORE_ENGINE_"
# Secrets are read verbatim (YAML would make a key such as 0123 a number); the alias is the
# variable the router's docs name.
_VERBATIM = {"router-admin-key"}
_ENV_ALIASES = {"FDCORE_ROUTER_ADMIN_KEY": "router-admin-key"}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (int, float)):
        return [value]
    return value


def _parse_size(value: Any) -> Any:
    """``1073741824``, ``"1GiB"``, ``"512m"``: bytes (binary multiples)."""
    if isinstance(value, str) and (match := _SIZE.match(value)):
        return int(match[1]) * 1024 ** "kmgt".find(match[2].lower()) if match[2] else int(match[1])
    return value


CsvStr = Annotated[list[str], BeforeValidator(_split_csv)]
TRANSFER_PROTOCOLS = ("ipc", "tcp", "rdma")


def _protocols(value: list[str]) -> list[str]:
    names = [name.lower() for name in value]
    unknown = [name for name in names if name not in TRANSFER_PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown KV transport {unknown[0]!r} (known: "
                         f"{', '.join(TRANSFER_PROTOCOLS)})")
    if len(set(names)) != len(names):
        raise ValueError("a KV transport is listed twice")
    if not names:
        raise ValueError("at least one KV transport is needed")
    return names


Protocols = Annotated[list[str], BeforeValidator(_split_csv), AfterValidator(_protocols)]


def _one_rank(value: int) -> int:
    if value != 1:
        raise ValueError(f"{value}: this engine runs a model on one device; only 1 is supported "
                         "(run more engines behind the router instead)")
    return value


OneRank = Annotated[int, AfterValidator(_one_rank)]
CsvInt = Annotated[list[int], BeforeValidator(_split_csv)]
Bytes = Annotated[int, BeforeValidator(_parse_size), Field(ge=1)]
Port = Annotated[int, Field(ge=1, le=65535)]


class EngineConfig(StrictModel):
    """Every engine setting; the field docs are the flags' help."""

    model: str = Field(description="HF folder or .gguf file of the model, or `sim`")
    sim_profile: str | None = Field(None, description="YAML cost model for --model sim")
    host: str = Field("0.0.0.0", description="address the API listens on")
    port: Port = Field(8000, description="API port")
    metrics_port: Port | None = Field(None, description="/metrics port (default: the API port)")
    splitwise_role: Role = Field(Role.MIXED, description="mixed, prefill or decode")
    router: str | None = Field(None, description="host:port of a router to register with")
    router_admin_key: str | None = Field(
        None, description="the router's admin key, sent when registering (better: the "
        "FDCORE_ROUTER_ADMIN_KEY environment variable, which ps does not show)"
    )
    register_interval: float = Field(5.0, gt=0, description="seconds between re-registrations")
    scheduler_name: str = Field("local", description="scheduler plugin")
    max_num_seqs: int = Field(34, ge=1, description="sequences per batch at most")
    max_num_batched_tokens: int = Field(2048, ge=1, description="tokens per step at most")
    max_model_len: int | None = Field(None, ge=2, description="context length (default: model's)")
    block_size: int = Field(64, ge=1, description="tokens per KV-cache block")
    num_gpu_blocks: int | None = Field(None, ge=1, description="KV-cache blocks")
    kv_cache_memory: Bytes | None = Field(None, description="KV-cache bytes, e.g. 2GiB")
    enc_dec_block_num: int = Field(2, ge=0, description="blocks reserved per admitted request")
    enable_prefix_caching: bool = Field(True, description="reuse cached prompt prefixes")
    device: Literal["cpu", "cuda"] = Field("cpu", description="where the model runs")
    cpu_threads: int = Field(
        0, ge=0, description="torch CPU threads (0: torch's default, one per core)"
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="weights")
    served_model_name: str | None = Field(None, description="model name in the API")
    engine_worker_queue_port: int = Field(8002, ge=0, le=65535, description="registered only")
    cache_queue_port: int = Field(
        0, ge=0, le=65535, description="accepted for FastDeploy launch lines; unused (the KV "
        "cache is sent by the engine itself, not a separate cache process)"
    )
    tensor_parallel_size: OneRank = Field(1, description="devices per model (1 only)")
    quantization: str | None = Field(
        None, max_length=64, description="accepted for FastDeploy launch lines and ignored, "
        "with a warning: weights run as the model file stores them (a GGUF file carries its "
        "own quantization)"
    )
    pd_comm_port: CsvInt = Field(default_factory=list, description="PD control ports")
    cache_transfer_protocol: Protocols = Field(
        ["ipc"], description="KV transports this engine offers, any of ipc,tcp,rdma"
    )
    rdma_comm_ports: CsvStr = Field(default_factory=list, description="RDMA ports per device")
    pd_hold_secs: float = Field(
        10.0, gt=0, description="seconds a P-D reservation lives past the peer's last "
        "heartbeat (and each transfer step's deadline)"
    )
    pd_first_contact_secs: float = Field(
        30.0, gt=0, description="seconds D waits for P's prefill frame (and P for D's answer)"
    )
    device_ids: CsvStr = Field(["0"], description="device ids (registered)")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", description="log level"
    )
    log_format: Literal["console", "json"] = Field("console", description="log format")
    plugins: str = Field("default", description="plugins to load: default, default,NAME, all")
    block_plugins: CsvStr = Field(default_factory=list, description="plugins never to load")
    max_request_bytes: Bytes = Field(8 * 1024 * 1024, description="largest request body")
    header_timeout_secs: float = Field(10, gt=0, description="seconds to receive the headers")
    body_timeout_secs: float = Field(60, gt=0, description="seconds to receive the body")
    keep_alive_timeout_secs: float = Field(5, gt=0, description="idle seconds between requests")
    max_connections: int = Field(4096, ge=1, description="concurrent requests; more get 503")
    drain_grace_secs: float = Field(
        30, ge=0, description="after SIGTERM, seconds running requests may take to finish"
    )


def _kebab(key: Any) -> str:
    return str(key).replace("_", "-")


def read_yaml(path: str) -> dict[str, Any]:
    """``engine.yaml`` as kebab-case keys; a ``scheduler:`` mapping becomes ``scheduler-*``."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise StartupError(f"{path}: cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise StartupError(f"{path}: the top level must be a mapping of settings")
    flat: dict[str, Any] = {}
    for key, value in resolve_env_refs(data, path).items():
        if _kebab(key) == "scheduler" and isinstance(value, dict):
            flat.update({SCHEDULER_PREFIX + _kebab(k): v for k, v in value.items()})
        else:
            flat[_kebab(key)] = value
    return flat


def read_env(environ: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    """``FDCORE_ENGINE_<KEY>`` variables of known settings and of ``scheduler-*`` options, as
    ``{key: (variable, YAML-parsed value)}``."""
    found: dict[str, tuple[str, Any]] = {}
    for name, value in environ.items():
        key = _kebab(name.removeprefix(ENV_PREFIX).lower())
        if name.startswith(ENV_PREFIX) and (
            key.replace("-", "_") in EngineConfig.model_fields or key.startswith(SCHEDULER_PREFIX)
        ):
            found[key] = (name, value if key in _VERBATIM else yaml.safe_load(value))
    for name, key in _ENV_ALIASES.items():
        if name in environ and key not in found:
            found[key] = (name, environ[name])
    return found


def resolve(
    yaml_path: str | None, flags: dict[str, Any], environ: Mapping[str, str] | None = None
) -> tuple[EngineConfig, dict[str, Any], dict[str, str]]:
    """Merge ``engine.yaml``, environment and flags into the config and scheduler options.

    Returns ``(config, scheduler_options, origin)``; ``origin`` maps each scheduler option to
    where it came from, for error messages.
    """
    from_yaml = read_yaml(yaml_path) if yaml_path else {}
    from_env = read_env(os.environ if environ is None else environ)
    from_flags = {_kebab(k): v for k, v in flags.items()}
    merged = {**from_yaml, **{k: v for k, (_, v) in from_env.items()}, **from_flags}
    origin = {
        k: f"--{k}" if k in from_flags else from_env[k][0] if k in from_env
        else f"{yaml_path}: {k}"
        for k in merged
    }
    scheduler_name = SCHEDULER_PREFIX + "name"
    options = {
        k.removeprefix(SCHEDULER_PREFIX): v
        for k, v in merged.items()
        if k.startswith(SCHEDULER_PREFIX) and k != scheduler_name
    }
    settings = {k: v for k, v in merged.items() if not k.startswith(SCHEDULER_PREFIX)
                or k == scheduler_name}
    try:
        config = EngineConfig.model_validate(settings)
    except ValidationError as exc:
        raise StartupError(describe(exc, origin)) from None
    check_disaggregation(config)
    return config, options, {k: origin[SCHEDULER_PREFIX + k] for k in options}


def check_disaggregation(config: EngineConfig) -> None:
    """The PD settings that must come together (FastDeploy's launch lines give them all)."""
    problems = []
    if config.splitwise_role is not Role.MIXED and not config.pd_comm_port:
        problems.append(f"--splitwise-role {config.splitwise_role.value} needs --pd-comm-port "
                        "(the port of the P-D connector)")
    if "rdma" in config.cache_transfer_protocol and not config.rdma_comm_ports:
        problems.append("--cache-transfer-protocol rdma needs --rdma-comm-ports (one port per "
                        "device in --device-ids)")
    bad = [p for p in config.rdma_comm_ports if not (p.isdigit() and 0 < int(p) < 65536)]
    if bad:
        problems.append(f"--rdma-comm-ports: {bad[0]!r} is not a port number")
    if config.rdma_comm_ports and "rdma" not in config.cache_transfer_protocol:
        problems.append("--rdma-comm-ports is set but --cache-transfer-protocol does not list "
                        "rdma")
    if problems:
        raise StartupError("\n".join(problems))


def describe(exc: ValidationError, origin: dict[str, str]) -> str:
    """One line for the first error: ``file: key: message`` or ``--flag: message``."""
    err = exc.errors()[0]
    key = ".".join(str(part) for part in err["loc"] if isinstance(part, str)) or "settings"
    if err["type"] == "missing":
        return f"--{key} is required (or `{key}:` in the --config file)"
    message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
    return f"{origin.get(key, key)}: {message}"
