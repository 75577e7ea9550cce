"""Router configuration: FastDeploy's ``config.yaml`` (server, scheduler, manager, log) plus
fdcore's own sections, loaded strictly.

Every value can come from YAML, an environment variable (``FDCORE_<SECTION>_<KEY>``, e.g.
``FDCORE_MANAGER_HEALTH_CHECK_INTERVAL_SECS=2``) or a flag; flags win. A string value
``$env:NAME`` in YAML is replaced by that environment variable (for secrets).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BeforeValidator, Field, ValidationError
from pydantic_core import PydanticCustomError

from fdcore.errors import StartupError
from fdcore.types import StrictModel

_ENV_REF = re.compile(r"^\$env:([A-Za-z_][A-Za-z0-9_]*)$")


class ServerConfig(StrictModel):
    """``server:`` — where the router listens and in which mode."""

    port: int = Field(9000, ge=1, le=65535)
    host: str = "0.0.0.0"
    mode: Literal["debug", "release", "test"] = "release"
    splitwise: bool = False
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0)  # fdcore: larger bodies get 413
    http_server: Literal["uvicorn", "hypercorn"] = "uvicorn"  # fdcore: hypercorn for HTTP/2
    # fdcore: bounded waits and graceful drain (docs/router.md, "Timeouts, limits and drain")
    header_timeout_secs: float = Field(10, gt=0)
    body_timeout_secs: float = Field(60, gt=0)
    keep_alive_timeout_secs: float = Field(75, gt=0)
    max_connections: int = Field(4096, ge=1)
    drain_grace_secs: float = Field(30, ge=0)


class SchedulerConfig(StrictModel):
    """``scheduler:`` — which policy picks instances for each role.

    Policy options (``cache-block-size``, ``waiting-weight``, ...) sit flat in the same section,
    as in FastDeploy; each is validated by the config model of the policy that declares it.
    """

    policy: str = "request_num"
    prefill_policy: str = "process_tokens"
    decode_policy: str = "request_num"
    stats_interval_secs: float = Field(5, gt=0)
    options: dict[str, Any] = Field(default_factory=dict, exclude=True)


def _network(value: str) -> str:
    try:
        ipaddress.ip_network(value)
    except ValueError as exc:
        raise PydanticCustomError(
            "network", "not a network such as 10.0.0.0/8: {problem}", {"problem": str(exc)}
        ) from None
    return value


Network = Annotated[str, AfterValidator(_network)]


class ManagerConfig(StrictModel):
    """``manager:`` — health checks and start-up registration."""

    health_failure_threshold: int = Field(1, ge=1)
    health_success_threshold: int = Field(1, ge=1)
    health_check_timeout_secs: float = Field(5, gt=0)
    health_check_interval_secs: float = Field(5, gt=0)
    health_check_endpoint: str = "/health"
    register_path: str = ""
    enable_infer_ready_check: bool = False
    health_check: str = "http"  # fdcore: the health-check plugin to use
    health_check_options: dict[str, Any] = Field(default_factory=dict)
    # fdcore: CIDRs a registering host must resolve into (empty: any host)
    register_allow_networks: list[Network] = Field(default_factory=list)
    remove_unhealthy_after_secs: float = Field(600, ge=0)  # fdcore: 0 keeps them forever


class LogConfig(StrictModel):
    """``log:`` — level, destination and format."""

    level: Literal["debug", "info", "warning", "warn", "error", "critical"] = "info"
    output: Literal["stdout", "stderr", "file"] = "stdout"
    file: str = "fdcore-router.log"
    format: Literal["console", "json"] = "console"


class ProxyConfig(StrictModel):
    """``proxy:`` (fdcore) — upstream timeouts and retries."""

    connect_timeout_secs: float = Field(5, gt=0)
    first_byte_timeout_secs: float = Field(600, gt=0)
    # A started stream that sends nothing for this long ends with an SSE error event (a stopped
    # or wedged instance must not hold its clients until the total deadline).
    stream_idle_timeout_secs: float = Field(120, gt=0)
    total_timeout_secs: float = Field(1800, gt=0)
    max_retries: int = Field(2, ge=0)  # extra attempts on other instances, before the first byte
    # 0 = no cap: FastDeploy engines queue and reject at their own capacity, which the router
    # cannot see; set it (e.g. twice the engines' max-num-seqs) to answer 429 instead.
    max_inflight_per_instance: int = Field(0, ge=0)
    retry_after_secs: int = Field(1, ge=1)  # the Retry-After of a 429 when every instance is full


class OutlierConfig(StrictModel):
    """``outlier:`` (fdcore) — passive ejection of instances that keep failing (Envoy's
    consecutive-5xx), see :mod:`fdcore.router.outliers`."""

    enabled: bool = True
    consecutive_failures: int = Field(5, ge=1)
    base_ejection_secs: float = Field(30, gt=0)
    max_ejection_secs: float = Field(300, gt=0)
    max_ejection_percent: int = Field(50, ge=0, le=100)


class PluginsConfig(StrictModel):
    """``plugins:`` (fdcore) — which plugins load (``--plugins`` and ``--block-plugins`` win)."""

    enable: list[str] = Field(default_factory=lambda: ["default"])
    block: list[str] = Field(default_factory=list)


class LaunchConfig(StrictModel):
    """One entry of ``launch:`` (fdcore): a local engine the router starts and supervises."""

    args: list[str]
    name: str = ""
    restart: bool = True


def _key_list(value: Any) -> Any:
    # FDCORE_AUTH_API_KEYS=key1,key2
    return [part.strip() for part in value.split(",") if part.strip()] if isinstance(
        value, str) else value


def _no_spaces(value: str) -> str:
    if any(char.isspace() for char in value):
        raise PydanticCustomError("key", "a key cannot contain spaces")
    return value


Key = Annotated[str, AfterValidator(_no_spaces)]
ApiKey = Annotated[str, Field(min_length=1), AfterValidator(_no_spaces)]


class AuthConfig(StrictModel):
    """``auth:`` (fdcore) — client API keys for inference, one admin key for the rest."""

    api_keys: Annotated[list[ApiKey], BeforeValidator(_key_list)] = Field(default_factory=list)
    admin_key: Key = ""  # empty: no admin key


class RouterConfig(StrictModel):
    """The whole router configuration."""

    server: ServerConfig = Field(default_factory=ServerConfig)  # type: ignore[arg-type]
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)  # type: ignore[arg-type]
    manager: ManagerConfig = Field(default_factory=ManagerConfig)  # type: ignore[arg-type]
    log: LogConfig = Field(default_factory=LogConfig)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)  # type: ignore[arg-type]
    outlier: OutlierConfig = Field(default_factory=OutlierConfig)  # type: ignore[arg-type]
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)
    launch: list[LaunchConfig] = Field(default_factory=list)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    source: str = Field("<defaults>", exclude=True)


_VERBATIM_ENV_SECTIONS = {"auth"}
_SCHEDULER_KEYS = {
    "policy", "prefill-policy", "decode-policy", "prefill_policy", "decode_policy",
    "stats-interval-secs", "stats_interval_secs",
}


def format_validation_error(source: str, exc: ValidationError, prefix: str = "") -> str:
    """``file: key.path: message`` lines, one per problem."""
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{source}: {path}: {message}")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a missing or malformed file is a :class:`StartupError`."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise StartupError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise StartupError(f"{path}: invalid YAML: {exc}") from None
    return {} if data is None else data


def resolve_env_refs(value: Any, source: str, path: str = "") -> Any:
    """Replace ``$env:NAME`` strings anywhere in ``value``."""
    if isinstance(value, str):
        match = _ENV_REF.match(value)
        if not match:
            return value
        name = match.group(1)
        if name not in os.environ:
            raise StartupError(f"{source}: {path}: environment variable {name} is not set")
        return os.environ[name]
    if isinstance(value, dict):
        return {
            k: resolve_env_refs(v, source, f"{path}.{k}" if path else str(k))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [resolve_env_refs(v, source, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    sections = {
        name: field.annotation
        for name, field in RouterConfig.model_fields.items()
        if name not in ("launch", "source")
    }
    for section, model in sections.items():
        for field_name in model.model_fields:  # type: ignore[union-attr]
            env_name = f"FDCORE_{section.upper()}_{field_name.upper()}"
            if env_name in environ:
                key = field_name.replace("_", "-")
                raw = environ[env_name]
                # Secrets verbatim: YAML would read a key such as 0123 as a number.
                value = raw if section in _VERBATIM_ENV_SECTIONS else yaml.safe_load(raw)
                data.setdefault(section, {})[key] = value


def load_router_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> RouterConfig:
    """Load ``path`` (or defaults), apply environment variables, then ``overrides`` (flags).

    Raises :class:`StartupError` whose message has one ``file: key.path: message`` line per
    problem.
    """
    source = str(path) if path else "<defaults>"
    data = read_yaml(path) if path else {}
    if not isinstance(data, dict):
        raise StartupError(f"{source}: the top level must be a mapping of sections")
    data = resolve_env_refs(data, source)
    _env_overrides(data, os.environ if environ is None else environ)
    for section, values in (overrides or {}).items():
        current = data.get(section)
        if current is None:
            current = data[section] = {}
        if not isinstance(current, dict):
            raise StartupError(f"{source}: {section}: must be a mapping")
        current.update(values)
    scheduler = data.get("scheduler")
    if isinstance(scheduler, dict):
        # Policy options are validated later against the policies that declare them.
        options = {k: v for k, v in scheduler.items() if k not in _SCHEDULER_KEYS}
        data["scheduler"] = {k: v for k, v in scheduler.items() if k in _SCHEDULER_KEYS}
        data["scheduler"]["options"] = options
    try:
        config = RouterConfig.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise StartupError(format_validation_error(source, exc)) from None
    return config


def policy_config(
    config: RouterConfig, policy_cls: type[Any], claimed: set[str]
) -> StrictModel:
    """Build ``policy_cls.Config`` from the ``scheduler:`` options it declares.

    ``claimed`` holds every option key some registered policy declares; any other key is an
    error naming the file.
    """
    options = config.scheduler.options
    unknown = sorted(set(options) - claimed)
    if unknown:
        known = ", ".join(sorted(claimed | _SCHEDULER_KEYS))
        raise StartupError(
            "\n".join(
                f"{config.source}: scheduler.{key}: unknown key (known: {known})" for key in unknown
            )
        )
    model: type[StrictModel] = policy_cls.Config
    mine = {k: v for k, v in options.items() if k in option_keys(model)}
    try:
        return model.model_validate(mine)
    except ValidationError as exc:
        raise StartupError(format_validation_error(config.source, exc, "scheduler")) from None


def option_keys(model: type[StrictModel]) -> set[str]:
    """The keys a config model accepts (kebab-case aliases and snake-case names)."""
    keys = set()
    for name, field in model.model_fields.items():
        keys.add(name)
        keys.add(field.alias or name)
    return keys
