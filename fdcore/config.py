"""Router configuration: FastDeploy's ``config.yaml`` (server, scheduler, manager, log) plus
fdcore's own sections, loaded strictly.

Every value can come from YAML, an environment variable (``FDCORE_<SECTION>_<KEY>``, e.g.
``FDCORE_MANAGER_HEALTH_CHECK_INTERVAL_SECS=2``; plugin options too, e.g.
``FDCORE_SCHEDULER_CACHE_BLOCK_SIZE=64``) or a flag; flags win. A string value ``$env:NAME`` in
YAML is replaced by that environment variable (for secrets). Errors name where each value came
from; plugin options are checked by :mod:`fdcore.options` once plugins are loaded
(:func:`policy_options`, :func:`health_check_options`).
"""

from __future__ import annotations

import copy
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationError
from pydantic_core import PydanticCustomError

from fdcore.errors import StartupError
from fdcore.options import (
    Choice,
    OptionsError,
    Origin,
    Validated,
    check_option_keys,
    error_lines,
    kebab,
    validate_options,
)
from fdcore.types import Role, StrictModel

if TYPE_CHECKING:
    from fdcore.registry import Component

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
    as in FastDeploy; ``options`` holds them until :func:`policy_options` validates them.
    """

    policy: str = "request_num"
    prefill_policy: str = "process_tokens"
    decode_policy: str = "request_num"
    stats_interval_secs: float = Field(5, gt=0)
    # fdcore, splitwise mode: conditional disaggregation (docs/pd.md, "Conditional
    # disaggregation"). A prompt estimated below pd-min-prompt-tokens, or a request arriving
    # while every prefill instance has pd-max-prefill-queue requests in flight, is served by a
    # decode instance alone. 0 turns each rule off. The router has no tokenizer: tokens are
    # estimated as prompt characters / pd-chars-per-token (1 for the sim's byte tokenizer).
    pd_min_prompt_tokens: int = Field(0, ge=0)
    pd_max_prefill_queue: int = Field(0, ge=0)
    pd_chars_per_token: float = Field(4.0, gt=0)
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
    # Splitwise mode (FastDeploy's router flags): a hand-off that fails with "PD Error" (or a
    # decode answer finishing "pd_reschedule") is retried on a new pair this many times, before
    # the client has seen a byte; with exclude-decode the failed pair's decode is not reused.
    preempt_retry_count: int = Field(3, ge=0)
    preempt_retry_exclude_decode: bool = False


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
    # key.path -> the variable or flag that gave it (values without an entry came from source)
    origins: dict[str, str] = Field(default_factory=dict, exclude=True)


_VERBATIM_ENV_SECTIONS = {"auth"}
_SCHEDULER_KEYS = frozenset({"policy", "prefill-policy", "decode-policy", "stats-interval-secs",
                             "pd-min-prompt-tokens", "pd-max-prefill-queue",
                             "pd-chars-per-token"})
_POLICY_KEYS = {Role.MIXED: "policy", Role.PREFILL: "prefill-policy", Role.DECODE: "decode-policy"}
# FastDeploy's scheduler section carries these whatever policy it selects, so a file of its
# loads unchanged: read by no selected policy, they are logged and ignored, not refused.
FASTDEPLOY_SCHEDULER_OPTIONS = frozenset({
    "eviction-interval-secs", "eviction-duration-mins", "cache-block-size", "tokenizer-url",
    "tokenizer-timeout-secs", "balance-abs-threshold", "balance-rel-threshold",
    "hit-ratio-weight", "load-balance-weight", "waiting-weight",
})
# Plugin options: their keys are known only once plugins load, so every variable under these
# prefixes is taken (FDCORE_SCHEDULER_CACHE_BLOCK_SIZE -> scheduler.cache-block-size) and
# validated with the YAML values; one no component reads is an error naming it.
_OPTION_ENV = {
    ("scheduler",): "FDCORE_SCHEDULER_",
    ("manager", "health-check-options"): "FDCORE_MANAGER_HEALTH_CHECK_OPTIONS_",
}


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


def _put(data: dict[str, Any], path: tuple[str, ...], value: Any) -> bool:
    """Set ``data[path]`` (kebab-case), replacing the key under any other spelling; ``False``
    when something on the way is not a mapping (validation reports that)."""
    *parents, key = path
    for part in parents:
        if data.get(part) is None:
            data[part] = {}
        data = data[part]
        if not isinstance(data, dict):
            return False
    for written in [k for k in data if kebab(k) == key]:
        del data[written]
    data[key] = value
    return True


def _env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Apply ``FDCORE_<SECTION>_<KEY>`` variables; returns ``{key.path: variable}``."""
    found: dict[tuple[str, ...], tuple[str, str]] = {}
    for section, info in RouterConfig.model_fields.items():
        if info.exclude or section == "launch":
            continue
        fields = info.annotation.model_fields  # type: ignore[union-attr]
        for field_name in (name for name, f in fields.items() if not f.exclude):
            name = f"FDCORE_{section.upper()}_{field_name.upper()}"
            if name in environ:
                found[(section, kebab(field_name))] = (name, environ[name])
    core = {name for name, _ in found.values()}
    for name, raw in environ.items():
        for where, prefix in _OPTION_ENV.items():
            rest = name.removeprefix(prefix)
            if name.startswith(prefix) and rest and name not in core:
                found[(*where, kebab(rest.lower()))] = (name, raw)
    origins = {}
    bad = []
    for path, (name, raw) in found.items():
        key = ".".join(path)
        try:
            # Secrets verbatim: YAML would read a key such as 0123 as a number.
            value = raw if path[0] in _VERBATIM_ENV_SECTIONS else yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            bad.append(Origin(name, key).line(f"not a YAML value: {' '.join(str(exc).split())}"))
            continue
        if _put(data, path, value):
            origins[key] = name
    if bad:
        raise OptionsError(bad)
    return origins


def load_router_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
    sections: Mapping[str, Any] | None = None,
    source: str | None = None,
) -> RouterConfig:
    """Load ``path`` (or defaults), apply environment variables, then ``overrides`` (flags).

    ``sections`` (named ``source`` in messages) stand in for the file's content: what tests
    and embedders pass instead of writing a YAML file. Raises :class:`StartupError` whose
    message has one ``source: key.path: message`` line per problem; ``source`` is the file,
    or the variable or flag that gave the value.
    """
    source = source or (str(path) if path else "<defaults>")
    data = read_yaml(path) if path else copy.deepcopy(dict(sections or {}))
    if not isinstance(data, dict):
        raise StartupError(f"{source}: the top level must be a mapping of sections")
    data = resolve_env_refs(data, source)
    origins = _env_overrides(data, os.environ if environ is None else environ)
    for section, values in (overrides or {}).items():
        current = data.setdefault(section, {})
        if not isinstance(current, dict):
            raise StartupError(f"{source}: {section}: must be a mapping")
        for key, value in values.items():
            _put(data, (section, kebab(key)), value)
            origins[f"{section}.{kebab(key)}"] = f"--{kebab(key)}"
    scheduler = data.get("scheduler")
    if isinstance(scheduler, dict):
        # Policy options are validated later against the policies that declare them.
        data["scheduler"] = {k: v for k, v in scheduler.items() if kebab(k) in _SCHEDULER_KEYS}
        data["scheduler"]["options"] = {
            k: v for k, v in scheduler.items() if kebab(k) not in _SCHEDULER_KEYS
        }
    try:
        return RouterConfig.model_validate({**data, "source": source, "origins": origins})
    except ValidationError as exc:
        locate = _locator(source, origins, "")
        raise OptionsError(error_lines(exc, locate, depth=2)) from None


def _locator(source: str, origins: Mapping[str, str], prefix: str) -> Callable[[str], Origin]:
    def locate(key: str) -> Origin:
        path = f"{prefix}.{key}" if prefix else key
        return Origin(origins.get(kebab(path), source), path)

    return locate


def policy_options(
    config: RouterConfig, selected: Mapping[Role, Component], registered: Iterable[Component]
) -> Validated:
    """The ``scheduler:`` options validated for the policy of every role in use at once (a key
    one of them reads is not unknown to another). FastDeploy's own options that no selected
    policy reads come back in ``ignored``, to be logged, so that its files load unchanged.

    ``registered`` is every policy, for "read only by ..." errors and the type check of
    :func:`~fdcore.options.check_option_keys`. Raises :class:`OptionsError`, one line per
    problem, or :class:`StartupError` for a clash between registered policies.
    """
    policies = list(registered)
    check_option_keys(policies, {"policy": _SCHEDULER_KEYS})
    choice = Choice(
        "policy", list(selected.values()), policies,
        ", ".join(f"scheduler.{_POLICY_KEYS[role]}: {c.name}" for role, c in selected.items()),
        section_keys=_SCHEDULER_KEYS, tolerated=FASTDEPLOY_SCHEDULER_OPTIONS,
    )
    return validate_options(
        choice, config.scheduler.options, _locator(config.source, config.origins, "scheduler")
    )


def health_check_options(
    config: RouterConfig, selected: Component, registered: Iterable[Component]
) -> BaseModel:
    """``manager.health-check-options`` validated for the selected health check, as
    :func:`policy_options` does for policies."""
    checks = list(registered)
    check_option_keys(checks)
    choice = Choice("health check", [selected], checks,
                    f"manager.health-check: {selected.name}")
    locate = _locator(config.source, config.origins, "manager.health-check-options")
    checked = validate_options(choice, config.manager.health_check_options, locate)
    return checked.configs[selected.name]
