"""Runtime contracts between the fdcore host and its plugins.

Plugins register *classes* through the hooks in :mod:`fdcore.hookspecs`; the host builds
instances of them from YAML and calls them through the Protocols below. Pluggy is never on
the per-request path: these are plain (mostly async) method calls.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for every component's config model: unknown keys are errors, keys are kebab-case."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        alias_generator=lambda name: name.replace("_", "-"),
        frozen=True,
    )


class EmptyConfig(StrictModel):
    """Config model of a component that takes no options."""


class Role(enum.StrEnum):
    """What an inference instance does: FastDeploy numbers them 0, 1, 2 in that order."""

    MIXED = "mixed"
    PREFILL = "prefill"
    DECODE = "decode"


class Outcome(enum.StrEnum):
    """How a routed request ended, as seen by the router."""

    SUCCESS = "success"
    ERROR = "error"
    TIMEOUT = "timeout"
    DISCONNECT = "disconnect"


@dataclass(slots=True)
class Load:
    """The router's own in-flight counters for one instance (always released)."""

    requests: int = 0
    tokens: int = 0


@dataclass(slots=True, eq=False)
class Instance:
    """An inference instance known to the router, with its register payload and live state."""

    url: str
    role: Role
    host_ip: str
    port: int
    metrics_port: int
    connector_port: int = 0
    engine_worker_queue_port: int = 0
    transfer_protocol: list[str] = field(default_factory=list)
    rdma_ports: list[str] = field(default_factory=list)
    device_ids: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    healthy: bool = True
    load: Load = field(default_factory=Load)
    registered_at: float = 0.0
    last_seen: float = 0.0

    @property
    def metrics_url(self) -> str:
        """Where this instance serves Prometheus metrics."""
        return f"http://{self.host_ip}:{self.metrics_port}/metrics"


@dataclass(slots=True)
class RouteRequest:
    """What a selection policy sees of a request.

    ``prompt`` is the request's text as FastDeploy extracts it (chat message contents or the
    completion prompt, trimmed and joined by single spaces); ``token_estimate`` is what the
    router adds to the chosen instance's token counter.
    """

    request_id: str
    endpoint: str
    prompt: str
    body: Mapping[str, Any]
    token_estimate: int = 0
    role: Role = Role.MIXED


class InstanceView(Protocol):
    """Read-only access to the router's instance registry, for policies and health checks."""

    def instances(self, role: Role | None = None) -> Sequence[Instance]:
        """Every registered instance (healthy or not), optionally of one role."""
        ...


@dataclass(slots=True)
class PolicyContext:
    """What the router hands a selection policy when it builds one."""

    instances: InstanceView
    role: Role
    # The app's own prometheus_client CollectorRegistry: policies add their metrics here so
    # they appear on the router's /metrics (one registry per app keeps tests isolated).
    prometheus: Any = None


@runtime_checkable
class SelectionPolicy(Protocol):
    """Chooses the instance for a request among healthy candidates.

    The router increments the chosen instance's :class:`Load` before the request is sent and
    calls :meth:`release` exactly once when it ends, however it ends.
    """

    name: ClassVar[str]
    Config: ClassVar[type[StrictModel]]

    async def start(self) -> None:
        """Start background work (scrapers, eviction); called once before the first request."""
        ...

    async def stop(self) -> None:
        """Stop background work; called once at shut-down."""
        ...

    async def select(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        """Return one of ``candidates`` (never empty, all healthy, sorted by url)."""
        ...

    def release(self, request: RouteRequest, instance: Instance, outcome: Outcome) -> None:
        """Note that ``request``, sent to ``instance``, has ended with ``outcome``."""
        ...

    def forget(self, instance: Instance) -> None:
        """Drop any state kept for an instance that left the registry."""
        ...


@runtime_checkable
class HealthCheck(Protocol):
    """Probes one instance; the health manager counts results across rounds."""

    name: ClassVar[str]
    Config: ClassVar[type[StrictModel]]

    async def start(self) -> None:
        """Open clients; called once before the first check."""
        ...

    async def stop(self) -> None:
        """Close clients; called once at shut-down."""
        ...

    async def check(self, instance: Instance) -> tuple[bool, str]:
        """Return ``(healthy, detail)``; must not raise and must honour its own timeout."""
        ...


# ---------------------------------------------------------------------------------------------
# Engine side: schedulers move requests between the API server and the batcher.


@dataclass(slots=True)
class SamplingParams:
    """Per-request sampling settings (OpenAI names)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass(slots=True)
class EngineRequest:
    """A tokenized request as it travels through a scheduler (JSON-serialisable)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    origin: str = ""  # the instance whose client waits for the results
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_len(self) -> int:
        """Number of prompt tokens."""
        return len(self.prompt_token_ids)


@dataclass(slots=True)
class RequestOutput:
    """One step's output for a request, pushed by the engine and drained by the API side."""

    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # Text of ``token_ids`` (detokenized by the engine that ran the request, stop strings trimmed).
    text: str = ""
    # HTTP status for ``error`` (e.g. 503 for a request that expired in a queue).
    error_code: int = 0


@runtime_checkable
class Scheduler(Protocol):
    """Queues work between an engine's API server and its batcher (FastDeploy's contract).

    ``local`` keeps it in process; ``global`` and ``splitwise`` share it through Redis. All
    methods are coroutines so network-backed schedulers fit without changing the engine.
    """

    name: ClassVar[str]
    Config: ClassVar[type[StrictModel]]

    async def start(self) -> None:
        """Connect and start background work."""
        ...

    async def stop(self) -> None:
        """Stop background work and close connections."""
        ...

    async def put_requests(self, requests: Sequence[EngineRequest]) -> list[tuple[str, str | None]]:
        """Enqueue; return ``(request_id, error or None)`` for each request, in order."""
        ...

    async def get_requests(
        self,
        available_blocks: int,
        block_size: int,
        reserved_output_blocks: int,
        max_num_batched_tokens: int,
        batch: int = 1,
        timeout: float = 0.0,
    ) -> list[EngineRequest]:
        """Hand the engine as much queued work as fits in ``available_blocks``.

        When nothing is queued, wait up to ``timeout`` seconds for work to arrive (the engine
        passes 0 while it has sequences running and a short wait when idle).
        """
        ...

    async def get_unhandled_request_num(self) -> int:
        """Number of this instance's requests still queued (not yet taken by an engine)."""
        ...

    async def put_results(self, results: Sequence[RequestOutput]) -> None:
        """Accept outputs from the engine (they go to the request's origin)."""
        ...

    async def get_results(self, timeout: float = 0.0) -> dict[str, list[RequestOutput]]:
        """Drain outputs for this instance's clients, waiting up to ``timeout`` seconds."""
        ...

    async def abort(self, request_ids: Sequence[str]) -> None:
        """Forget queued requests and drop their future results."""
        ...


# ---------------------------------------------------------------------------------------------
# KV transports move cache blocks from a prefill engine to a decode engine.


@dataclass(slots=True)
class TransferTarget:
    """Where blocks go: the decode instance's address and its transport-specific handle."""

    host: str
    port: int
    handle: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Transport(Protocol):
    """Copies KV-cache blocks between engines (``ipc`` on one host, ``tcp``/``rdma`` between)."""

    name: ClassVar[str]
    Config: ClassVar[type[StrictModel]]

    async def start(self) -> None:
        """Open devices, register memory, start listeners."""
        ...

    async def stop(self) -> None:
        """Release devices and memory registrations."""
        ...

    async def send_blocks(
        self, target: TransferTarget, src_block_ids: Sequence[int], dst_block_ids: Sequence[int]
    ) -> None:
        """Copy the listed blocks of every layer into the target's cache; raise on failure."""
        ...


@dataclass(slots=True)
class HealthContext:
    """What the router hands a health check when it builds one (from ``manager:``)."""

    endpoint: str
    timeout: float


@dataclass(slots=True)
class SchedulerContext:
    """What an engine hands its scheduler: who it is and how big its pages are."""

    instance_id: str
    host: str
    port: int
    block_size: int
