"""Real routers and test instances on loopback, for fdcore's tests and plugin authors' tests."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from fdcore.testing.processes import ServerProcess, free_port


class Backend:
    """A running ``fdcore.testing.backend`` process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = ServerProcess(
            [sys.executable, "-m", "fdcore.testing.backend", "--port", str(self.port),
             "--name", name],
            ready_url=f"{self.url}/health",
        )

    def payload(self, **extra: Any) -> dict[str, Any]:
        """A register payload for this backend."""
        return {"role": "mixed", "host_ip": "127.0.0.1", "port": self.port, **extra}

    async def state(self) -> dict[str, Any]:
        """The backend's ``/test/state``."""
        async with aiohttp.ClientSession() as s, s.get(f"{self.url}/test/state") as r:
            result: dict[str, Any] = await r.json()
            return result

    async def post(self, path: str, body: Any) -> None:
        """POST a test control call."""
        async with aiohttp.ClientSession() as s, s.post(self.url + path, json=body) as r:
            assert r.status == 200


class Router:
    """A running ``fdcore serve`` process and its config file."""

    def __init__(self, proc: ServerProcess, port: int, config_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.config_path = config_path
        # Sent with every call (e.g. {"Authorization": "Bearer <admin key>"} for a router
        # with keys).
        self.headers: dict[str, str] = {}

    async def get(self, path: str) -> tuple[int, Any]:
        """GET a JSON endpoint."""
        async with aiohttp.ClientSession() as s, s.get(self.url + path,
                                                       headers=self.headers) as r:
            return r.status, await r.json(content_type=None)

    async def post(self, path: str, body: Any = None, data: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        """POST JSON (or raw bytes) and return status, decoded JSON and headers."""
        async with aiohttp.ClientSession() as s, s.post(
            self.url + path, json=body if data is None else None, data=data,
            headers={**self.headers, **(headers or {})},
        ) as r:
            raw = await r.read()
            try:
                decoded: Any = json.loads(raw) if raw else None
            except ValueError:
                decoded = raw.decode()
            return r.status, decoded, {k.lower(): v for k, v in r.headers.items()}

    async def text(self, path: str) -> str:
        """GET a text endpoint (``/metrics``)."""
        async with aiohttp.ClientSession() as s, s.get(self.url + path,
                                                       headers=self.headers) as r:
            return await r.text()

    async def instances(self) -> list[dict[str, Any]]:
        """Every registered instance (all roles) from ``/registered``."""
        _, body = await self.get("/registered")
        return [w for role in ("mixed", "prefill", "decode") for w in body[role]]

    async def wait_healthy(self, count: int, timeout: float = 30) -> None:
        """Wait until ``count`` instances are healthy."""
        await wait_until(lambda: self._healthy_count(count), timeout)

    async def _healthy_count(self, count: int) -> bool:
        return sum(1 for w in await self.instances() if w["healthy"]) == count


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:
    """Poll an async condition until true; the deadline only bounds a broken run."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        await asyncio.sleep(0.05)


class RouterFactory:
    """Starts ``fdcore serve`` processes with configs written to ``directory``.

    ``start(instances, args=..., env=..., **sections)`` merges each keyword section (``server``,
    ``scheduler``, ``manager``, ...) into a test-friendly default config (fast health rounds,
    JSON debug logs) and lists ``instances`` in a ``register.yaml``.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Router] = []

    def __call__(
        self, instances: list[Backend] | None = None, *, args: list[str] | None = None,
        env: dict[str, str] | None = None, **sections: Any,
    ) -> Router:
        port = free_port()
        config: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": port},
            "manager": {"health-check-interval-secs": 0.2, "health-check-timeout-secs": 2},
            "scheduler": {"policy": "round_robin"},
            "log": {"level": "debug", "format": "json"},
        }
        for name, values in sections.items():
            if isinstance(values, dict):
                config.setdefault(name, {}).update(values)
            else:  # a list section such as ``launch``
                config[name] = values
        if instances:
            register = self.directory / f"register-{port}.yaml"
            register.write_text(yaml.safe_dump({"instances": [b.payload() for b in instances]}))
            config["manager"]["register-path"] = str(register)
        path = self.directory / f"config-{port}.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = ServerProcess(
            [sys.executable, "-m", "fdcore", "serve", "--config", str(path), *(args or [])],
            ready_url=f"http://127.0.0.1:{port}/health", env=env,
        ).start()
        router = Router(proc, port, path)
        self.started.append(router)
        return router

    def stop_all(self) -> None:
        """Stop every router this factory started."""
        for router in self.started:
            router.proc.stop()


class BackendFactory:
    """Starts ``fdcore.testing.backend`` processes named ``b0``, ``b1``, ..."""

    def __init__(self) -> None:
        self.started: list[Backend] = []

    def __call__(self, n: int) -> list[Backend]:
        new = [Backend(f"b{len(self.started) + i}") for i in range(n)]
        for backend in new:
            backend.proc.start()
        self.started.extend(new)
        return new

    def stop_all(self) -> None:
        """Stop every backend this factory started."""
        for backend in self.started:
            backend.proc.stop()


# Fast simulated steps: tests finish quickly, yet a long request still runs while a test acts.
FAST_SIM_PROFILE = {
    "prefill-seconds-per-token": 0.0,
    "decode-seconds-per-step": 0.002,
    "decode-seconds-per-seq": 0.0,
}


class EngineHandle:
    """A running ``fdcore engine`` process."""

    def __init__(self, proc: ServerProcess, port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def payload(self, **extra: Any) -> dict[str, Any]:
        """A register payload for this engine (for ``router(instances=...)``)."""
        return {"role": "mixed", "host_ip": "127.0.0.1", "port": self.port, **extra}


class EngineFactory:
    """Starts ``fdcore engine`` processes: ``--model sim`` with a fast profile by default.

    ``engines(n, router=r)`` makes them register with (and heartbeat to) router ``r``;
    ``profile=`` sets the sim cost model (the keys of ``fdcore engine --sim-profile``, merged
    over :data:`FAST_SIM_PROFILE`): one mapping for every engine, or a list of one per engine,
    e.g. ``engines(2, profile=[{}, {"decode-seconds-per-step": 0.05}])`` for a slow second one.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[EngineHandle] = []
        self.profile = directory / "sim-profile.yaml"
        self.profile.write_text(yaml.safe_dump(FAST_SIM_PROFILE))

    def _profile_file(self, overrides: Mapping[str, Any] | None) -> Path:
        if not overrides:
            return self.profile
        path = self.directory / f"sim-profile-{len(self.started)}.yaml"
        path.write_text(yaml.safe_dump({**FAST_SIM_PROFILE, **overrides}))
        return path

    def __call__(
        self, n: int = 1, *, router: Router | None = None, model: str = "sim",
        flags: list[str] | None = None, ready_timeout: float = 120,
        profile: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    ) -> list[EngineHandle]:
        profiles = list(profile) if isinstance(profile, Sequence) else [profile] * n
        if len(profiles) != n:
            raise ValueError(f"profile: {len(profiles)} profiles given for {n} engines")
        new = []
        for index in range(n):
            port = free_port()
            argv = [sys.executable, "-m", "fdcore", "engine", "--model", model,
                    "--host", "127.0.0.1", "--port", str(port), *(flags or [])]
            if model == "sim":
                argv += ["--sim-profile", str(self._profile_file(profiles[index]))]
            if router is not None:
                argv += ["--router", f"127.0.0.1:{router.port}", "--register-interval", "0.5"]
            proc = ServerProcess(argv, ready_url=f"http://127.0.0.1:{port}/health",
                                 ready_timeout=ready_timeout)
            handle = EngineHandle(proc, port)
            self.started.append(handle)
            new.append(handle)
        for handle in new:
            handle.proc.start()
        return new

    def stop_all(self) -> None:
        """Stop every engine this factory started."""
        for handle in self.started:
            handle.proc.stop()
