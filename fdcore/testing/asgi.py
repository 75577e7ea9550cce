"""A router app served inside the test's own event loop, over ASGI: no port, no process.

::

    async with InProcessRouter({"scheduler": {"policy": "pinned", "pinned-port": 8001}},
                               plugins=load_plugins("default", extra=[("pinned", pinned)]),
                               instances=[backend.payload() for backend in backends]) as router:
        answer = await router.post("/v1/chat/completions", {"messages": [...]})
        assert answer.status == 200 and answer.json()["choices"]

The router is built by the same :func:`fdcore.router.app.create_app` as ``fdcore serve``; its
lifespan (health manager, policies' ``start``/``stop``) runs on enter and exit. The proxy
still reaches instances over loopback, so the instances are real servers (the ``backends`` or
``engines`` fixtures) unless a test only exercises paths that never reach one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson

from fdcore.config import RouterConfig, load_router_config
from fdcore.plugins import PluginSet
from fdcore.router.app import RouterApp, create_app
from fdcore.router.payload import parse_instance
from fdcore.router.state import RouterState

# The health manager's rounds stay out of the way: its first round runs on start, the next
# an hour later; a test that wants rounds sets ``manager`` itself.
_QUIET_MANAGER = {"health-check-interval-secs": 3600}


@dataclass(slots=True)
class Answer:
    """One HTTP answer of the in-process router."""

    status: int
    headers: dict[str, str]
    body: bytes
    chunks: list[bytes] = field(default_factory=list)  # body messages as the app sent them

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)

    def events(self) -> list[Any]:
        """The ``data:`` events of an SSE body, parsed (``[DONE]`` left out)."""
        out = []
        for line in self.body.split(b"\n"):
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                out.append(orjson.loads(line[6:]))
        return out


class InProcessRouter:
    """The router's ASGI app with its lifespan running, and a small client for it.

    :param config: a :class:`RouterConfig`, or sections as a mapping (validated exactly as
        ``config.yaml`` is; ``manager`` defaults to one health round at start).
    :param plugins: the plugin set (default: what ``config.plugins`` selects).
    :param instances: register payloads added as healthy instances before the first request.
    """

    def __init__(
        self, config: RouterConfig | Mapping[str, Mapping[str, Any]] | None = None,
        plugins: PluginSet | None = None, instances: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        if not isinstance(config, RouterConfig):
            sections = {"manager": dict(_QUIET_MANAGER), **(config or {})}
            config = load_router_config(sections=sections, environ={}, source="<InProcessRouter>")
        self.config = config
        self.app: RouterApp = create_app(config, plugins)
        self._instances = list(instances)
        self._lifespan: asyncio.Task[None] | None = None
        self._to_app: asyncio.Queue[MutableMapping[str, Any]] = asyncio.Queue()
        self._from_app: asyncio.Queue[MutableMapping[str, Any]] = asyncio.Queue()

    @property
    def state(self) -> RouterState:
        """The router's state: ``instances``, ``selector`` (with ``policies``), ``metrics``."""
        state: RouterState = self.app.state.fdcore
        return state

    async def __aenter__(self) -> InProcessRouter:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._lifespan = asyncio.create_task(
            self.app.starlette(scope, self._to_app.get, self._from_app.put)
        )
        await self._lifespan_step("startup")
        for payload in self._instances:
            self.state.instances.upsert(parse_instance(payload), healthy=True)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._lifespan is not None and not self._lifespan.done():
            await self._lifespan_step("shutdown")
            await self._lifespan

    async def _lifespan_step(self, step: str) -> None:
        await self._to_app.put({"type": f"lifespan.{step}"})
        async with asyncio.timeout(30):
            message = await self._from_app.get()
        if message["type"] != f"lifespan.{step}.complete":
            raise RuntimeError(f"router {step} failed: {message.get('message', message)}")

    async def request(
        self, method: str, path: str, body: bytes = b"",
        headers: Mapping[str, str] | None = None, timeout: float = 60,
    ) -> Answer:
        """Send one request through the app and collect its whole answer."""
        raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                       for k, v in (headers or {}).items()]
        if body:
            raw_headers.append((b"content-length", str(len(body)).encode()))
        path_part, _, query = path.partition("?")
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path_part, "raw_path": path_part.encode(),
            "query_string": query.encode(), "root_path": "", "headers": raw_headers,
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80), "state": {},
        }
        sent = False
        finished = asyncio.Event()

        async def receive() -> MutableMapping[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await finished.wait()  # the client stays until the answer is complete
            return {"type": "http.disconnect"}

        answer = Answer(0, {}, b"")

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer.status = message["status"]
                answer.headers = {k.decode("latin-1"): v.decode("latin-1")
                                  for k, v in message.get("headers", [])}
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if chunk:
                    answer.chunks.append(chunk)
                if not message.get("more_body", False):
                    finished.set()

        async with asyncio.timeout(timeout):
            try:
                await self.app(scope, receive, send)
            finally:
                finished.set()
        answer.body = b"".join(answer.chunks)
        return answer

    async def post(
        self, path: str, payload: Any, headers: Mapping[str, str] | None = None,
        timeout: float = 60,
    ) -> Answer:
        """POST ``payload`` as JSON."""
        merged = {"content-type": "application/json", **(headers or {})}
        return await self.request("POST", path, orjson.dumps(payload), merged, timeout)

    async def get(self, path: str, headers: Mapping[str, str] | None = None) -> Answer:
        """GET ``path``."""
        return await self.request("GET", path, headers=headers)
