"""Runtime contracts between the fdcore host and its plugins.

Plugins register *classes* through the hooks in :mod:`fdcore.hookspecs`; the host builds
instances of them from YAML and calls them through the Protocols below. Pluggy is never on
the per-request path: these are plain (mostly async) method calls.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import orjson
from pydantic import BaseModel, ConfigDict

from fdcore.metrics import once_per_app

T = TypeVar("T")


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


@dataclass(frozen=True, slots=True)
class HostInfo:
    """What the register hooks learn about the process loading them.

    ``process`` is ``router`` (``fdcore serve``), ``engine`` (``fdcore engine``) or ``cli``
    (``fdcore plugins``, tests); new fields will have defaults.
    """

    process: str = "cli"
    version: str = ""


class Role(enum.StrEnum):
    """What an inference instance does: FastDeploy numbers them 0, 1, 2 in that order."""

    MIXED = "mixed"
    PREFILL = "prefill"
    DECODE = "decode"


# What a prefill/decode engine's error message starts with when a KV hand-off failed; a router
# retries such a request on another pair (FastDeploy's rule, with its ``pd_reschedule``
# finish reason).
PD_ERROR = "PD Error"
PD_RESCHEDULE = "pd_reschedule"


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
    """What the router hands a selection policy when it builds one.

    New fields will have defaults.
    """

    instances: InstanceView
    role: Role
    # The app's own prometheus_client CollectorRegistry: policies add their metrics here so
    # they appear on the router's /metrics (one registry per app keeps tests isolated).
    prometheus: Any = None

    def metrics_once(self, factory: Callable[[Any], T]) -> T:
        """``factory(self.prometheus)``, run once per app (see :mod:`fdcore.metrics`): the
        way to create Prometheus collectors, since one app may build several policies."""
        return once_per_app(self.prometheus, factory)


@runtime_checkable
class Component(Protocol):
    """What every plugin component has, whatever its family.

    ``name`` is what configuration selects it by (unique in its family) and ``Config`` its
    strict options model (class attributes: ``name = "mine"``, ``Config = MineConfig``). The
    host calls :meth:`start` once before first use and :meth:`stop` once at shut-down.
    """

    name: ClassVar[str]

    @property
    def Config(self) -> type[StrictModel]:
        """The component's strict options model."""
        ...

    async def start(self) -> None:
        """Open clients, connect, start background work (a policy's scrapers, a scheduler's
        Redis link). A :class:`fdcore.errors.StartupError` raised here ends start-up with its
        one-line message."""
        ...

    async def stop(self) -> None:
        """Stop background work and close what :meth:`start` opened."""
        ...


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts an instance reported in its answer's OpenAI ``usage`` object."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # ``usage.prompt_tokens_details.cached_tokens``


class RequestResult:
    """How one routed attempt ended, as the router measured it; what ``release`` receives.

    ``outcome`` follows the instance's answer: a 2xx, 3xx or 4xx answer is
    :attr:`Outcome.SUCCESS` (the instance worked; a 4xx is the client's fault), a 5xx, a
    connection failure or a broken stream is :attr:`Outcome.ERROR`, a deadline
    :attr:`Outcome.TIMEOUT`, and a client that left (or a router that drained) mid-request
    :attr:`Outcome.DISCONNECT`. ``status`` is the instance's HTTP status (0 when none arrived);
    ``streamed`` whether the answer was relayed as a stream; ``ttfb`` the seconds from the
    router receiving the request to the instance's first response byte (``None`` when none
    arrived) and ``total`` the seconds until the attempt ended. :attr:`usage` is parsed only
    when read, from the answer (the body, or a stream's last events): ``None`` when the answer
    carried no ``usage``. New fields will have defaults.
    """

    __slots__ = ("_answer", "_usage", "instance", "outcome", "request", "status", "streamed",
                 "total", "ttfb")

    def __init__(
        self, request: RouteRequest, instance: Instance, outcome: Outcome, status: int = 0,
        streamed: bool = False, ttfb: float | None = None, total: float = 0.0,
        answer: bytes = b"",
    ) -> None:
        self.request = request
        self.instance = instance
        self.outcome = outcome
        self.status = status
        self.streamed = streamed
        self.ttfb = ttfb
        self.total = total
        self._answer = answer
        self._usage: Usage | bool | None = False  # False: not parsed yet

    @property
    def usage(self) -> Usage | None:
        """The answer's ``usage`` (parsed on first access), or ``None`` when it had none."""
        if self._usage is False:
            self._usage = parse_usage(self._answer)
        return self._usage  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (f"RequestResult({self.request.request_id!r}, {self.instance.url!r}, "
                f"{self.outcome.value}, status={self.status}, streamed={self.streamed}, "
                f"ttfb={self.ttfb}, total={self.total})")


def parse_usage(answer: bytes) -> Usage | None:
    """The last OpenAI ``usage`` object in a JSON body or in SSE ``data:`` events."""
    at = answer.rfind(b'"usage"')
    if at < 0:
        return None
    start = answer.rfind(b"data:", 0, at)
    start = 0 if start < 0 else start + 5
    end = answer.find(b"\n", at)
    try:
        doc = orjson.loads(answer[start:] if end < 0 else answer[start:end])
    except orjson.JSONDecodeError:
        return None
    usage = doc.get("usage") if isinstance(doc, dict) else None
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None

    def count(value: Any) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    return Usage(count(usage.get("prompt_tokens")), count(usage.get("completion_tokens")),
                 count(cached))


@runtime_checkable
class SelectionPolicy(Component, Protocol):
    """Chooses the instance for a request among healthy candidates.

    The router increments the chosen instance's :class:`Load` before the request is sent and
    calls :meth:`release` exactly once when that attempt ends, however it ends. A request the
    router retries on another instance (the connection failed before any byte was sent back)
    is one attempt per instance: ``select`` runs again over the candidates left and every
    attempt is released on its own, the failed ones with :attr:`Outcome.ERROR` and
    ``status`` 0. An exception in ``select``, or a return value that is not one of the
    candidates, answers that request with a 500 naming the plugin; the router keeps serving.
    """

    async def select(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        """Return one of ``candidates`` (never empty, all healthy, sorted by url)."""
        ...

    def release(self, result: RequestResult) -> None:
        """Note that ``result.request``, sent to ``result.instance``, has ended: see
        :class:`RequestResult` for what the router measured. Runs on the request's path:
        keep it short and never raise."""
        ...

    def forget(self, instance: Instance) -> None:
        """Drop any state kept for an instance that left the registry."""
        ...


@runtime_checkable
class HealthCheck(Component, Protocol):
    """Probes one instance; the health manager counts results across rounds."""

    async def check(self, instance: Instance) -> tuple[bool, str]:
        """Return ``(healthy, detail)``.

        The host bounds every call by ``manager.health-check-timeout-secs`` (a check still
        running then counts as failed, "timed out") and counts an exception as a failure,
        logged with the plugin's name: neither stops the rounds.
        """
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


@dataclass(frozen=True, slots=True)
class Capacity:
    """What an engine can take now, handed to :meth:`Scheduler.get_requests`.

    ``available_blocks`` free KV blocks of ``block_size`` tokens; each admitted request also
    costs ``reserved_output_blocks`` for its output; ``batch`` sequences at most;
    ``max_num_batched_tokens`` is the engine's per-step token budget (it prefills in chunks of
    it, so it does not limit admission). New fields will have defaults.
    """

    available_blocks: int
    block_size: int
    reserved_output_blocks: int = 0
    max_num_batched_tokens: int = 8192
    batch: int = 1

    @property
    def empty(self) -> bool:
        """Nothing can be admitted: no sequence slot, or no block beyond the output reserve."""
        return self.batch < 1 or self.available_blocks <= self.reserved_output_blocks

    def admissible(self, requests: Sequence[EngineRequest]) -> int:
        """How many leading ``requests`` fit now: FastDeploy's admission rule, which every
        scheduler applies in its ``get_requests``.

        Each costs the blocks of its prompt plus ``reserved_output_blocks``; requests are
        taken in order while the running sum fits; the first is taken whenever its prompt
        alone fits, so an engine with room never starves behind the reserve. Nothing is
        taken when :attr:`empty`.
        """
        if self.empty:
            return 0
        available = self.available_blocks
        block_size = self.block_size
        reserve = self.reserved_output_blocks
        needed = 0
        taken = 0
        for request in requests[: self.batch]:
            prompt_blocks = -(-request.prompt_len // block_size)
            needed += prompt_blocks + reserve
            if needed > available and not (taken == 0 and prompt_blocks <= available):
                break
            taken += 1
        return taken


class RejectionKind(enum.StrEnum):
    """Why a scheduler refused a request; the engine maps each to one HTTP status."""

    QUEUE_FULL = "queue_full"  # 429: the scheduler holds as many requests as it may
    DUPLICATE_ID = "duplicate_id"  # 409: a request with this id is already in flight
    UNAVAILABLE = "unavailable"  # 503: the scheduler cannot queue now (its backend is down)
    INVALID = "invalid"  # 400: the request cannot be served by this scheduler


@dataclass(frozen=True, slots=True)
class Rejection:
    """A request :meth:`Scheduler.put_requests` refused: which, why, and a message for the
    client."""

    request_id: str
    kind: RejectionKind
    message: str


@runtime_checkable
class Scheduler(Component, Protocol):
    """Queues work between an engine's API server and its batcher (FastDeploy's contract).

    ``local`` keeps it in process; ``global`` and ``splitwise`` share it through Redis. All
    methods but :meth:`health` are coroutines so network-backed schedulers fit without changing
    the engine. :class:`fdcore.bases.BaseScheduler` gives no-op ``start``/``stop``/``health``.
    """

    def health(self) -> str | None:
        """``None`` when the scheduler can take work, else the problem: the engine's
        ``/health`` then answers 503 with it as ``detail``. Called per health probe: cheap."""
        ...

    async def put_requests(self, requests: Sequence[EngineRequest]) -> list[Rejection]:
        """Enqueue ``requests``; return the ones refused (none: all were queued)."""
        ...

    async def get_requests(self, capacity: Capacity, timeout: float = 0.0) -> list[EngineRequest]:
        """Hand the engine as much queued work as fits ``capacity`` (see
        :meth:`Capacity.admissible`).

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
class TransportContext:
    """What an engine hands a KV transport when it builds one.

    ``layout`` is the engine's KV pool layout (:class:`fdcore.kv.KVLayout`); ``pool`` the pool
    tensor (``layout.shape``; set by the engine after :meth:`Transport.allocate` and before
    :meth:`Transport.start`); ``device`` where it lives (``cpu``, ``cuda:0``); ``host`` the
    address peers reach this engine on; ``on_torch_thread(fn)`` runs ``fn()`` on the engine's
    torch thread and awaits its result (copies belong there: a second OpenMP team costs more
    than it gains). ``accept_write(transfer_id, dst_block_ids)`` tells a receiver whose own
    code lands the bytes (``tcp``) whether those blocks are reserved for that transfer right
    now; data for anything else is discarded, never written (a late write after an abort or an
    expiry). New fields will have defaults.
    """

    layout: Any  # fdcore.kv.KVLayout (kept untyped here so this module imports nothing more)
    device: str = "cpu"
    host: str = "127.0.0.1"
    instance_id: str = ""
    pool: Any = None
    on_torch_thread: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None
    accept_write: Callable[[str, Sequence[int]], bool] | None = None
    ports: tuple[int, ...] = ()  # the ports the engine was given for it (--rdma-comm-ports)


@runtime_checkable
class TransportLink(Protocol):
    """A sender's connection to one receiver's exposed pool (from :meth:`Transport.connect`)."""

    async def write(
        self, src_block_ids: Sequence[int], dst_block_ids: Sequence[int],
        layers: Sequence[int] | None = None, *, transfer_id: str = "",
    ) -> int:
        """Copy the sender's ``src_block_ids[i]`` into the receiver's ``dst_block_ids[i]``, K
        and V of every layer (or of ``layers``); return the bytes moved. Raise on failure. A
        write that returns has landed; whether the receiver may use the blocks is told on the
        control plane, never inferred. ``transfer_id`` names the reservation the blocks
        belong to, for receivers that check it (``TransportContext.accept_write``)."""
        ...

    async def close(self) -> None:
        """Release what the link holds (mappings, sockets, queue pairs)."""
        ...


@runtime_checkable
class Transport(Component, Protocol):
    """Moves KV-cache blocks from a prefill engine's pool into a decode engine's reserved
    blocks (``ipc`` on one host, ``tcp`` or ``rdma`` between hosts). Both halves live in one
    class: a receiver exposes its pool once (:meth:`expose`), a sender connects to a
    handle and writes through the link. Built as ``cls(config, context: TransportContext)``.
    """

    def allocate(self, layout: Any) -> Any | None:
        """The engine's KV pool tensor, allocated where this transport can reach it (shared
        memory, registered memory), or ``None`` to leave allocation to the engine. Called
        once, before :meth:`start`; at most one enabled transport may allocate."""
        ...

    async def expose(self) -> dict[str, Any]:
        """The receiver half: a serialisable handle (msgpack-able: str, int, bytes, lists and
        dicts of them) that lets a sender reach this engine's pool (a shared-memory name and
        layout, CUDA IPC handles, an rkey and addresses, host:port)."""
        ...

    async def connect(self, handle: Mapping[str, Any]) -> TransportLink:
        """The sender half: a link to the pool a receiver exposed as ``handle``; raise with
        a clear message when the handle cannot be used from here (another host for ``ipc``,
        a layout that differs)."""
        ...


@dataclass(slots=True)
class HealthContext:
    """What the router hands a health check when it builds one (from ``manager:``).

    ``timeout`` is ``manager.health-check-timeout-secs``: the host cancels a check that runs
    longer. New fields will have defaults.
    """

    endpoint: str
    timeout: float
    prometheus: Any = None  # the app's CollectorRegistry, as for policies

    def metrics_once(self, factory: Callable[[Any], T]) -> T:
        """``factory(self.prometheus)``, run once per app (see :mod:`fdcore.metrics`)."""
        return once_per_app(self.prometheus, factory)


@dataclass(slots=True)
class SchedulerContext:
    """What an engine hands its scheduler: who it is, its role and how big its pages are.

    ``card`` is what the engine registers with a router (FastDeploy's register payload plus
    ``kv_layout``): a scheduler that pairs prefill and decode instances itself publishes it.
    ``cancel(request_id)`` takes a request this engine runs out of its batch at the next step
    (its hand-off included, blocks freed); the engine sets it once built, so a scheduler whose
    requests' clients wait elsewhere can stop work nobody waits for. New fields will have
    defaults.
    """

    instance_id: str
    host: str
    port: int
    block_size: int
    role: Role = Role.MIXED
    card: dict[str, Any] = field(default_factory=dict)
    cancel: Callable[[str], None] | None = None
