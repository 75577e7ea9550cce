"""Starts and supervises the local engines listed under ``launch:`` in the router's config."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

import structlog

from fdcore.config import LaunchConfig, RouterConfig

log = structlog.get_logger("fdcore.launcher")
_MAX_BACKOFF = 30.0


class Launcher:
    """Runs ``fdcore engine <args> --router <this router>`` for each ``launch:`` entry.

    Engines register themselves with the router once their model is loaded; an engine that
    exits is restarted with a growing back-off when ``restart`` is set.
    """

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self._tasks: list[asyncio.Task[None]] = []
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._stopping = False

    def argv(self, entry: LaunchConfig) -> list[str]:
        """The command line of one engine."""
        args = list(entry.args)
        if "--router" not in args:
            host = self.config.server.host
            host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
            args += ["--router", f"{host}:{self.config.server.port}"]
        return [sys.executable, "-m", "fdcore", "engine", *args]

    def environment(self) -> dict[str, str]:
        """The engines' environment: this process's, plus the key they register with.

        The key travels in the environment, not on the command line, where ``ps`` shows it.
        """
        env = dict(os.environ)
        auth = self.config.auth
        key = auth.admin_key or (auth.api_keys[0] if auth.api_keys else "")
        if key:
            env["FDCORE_ROUTER_ADMIN_KEY"] = key
        return env

    async def start(self) -> None:
        """Start every engine (the router does not wait for them to load)."""
        for index, entry in enumerate(self.config.launch):
            name = entry.name or f"engine-{index}"
            self._tasks.append(asyncio.create_task(self._supervise(name, entry), name=name))
        if self.config.launch:
            print(self.hint(), flush=True)

    def hint(self) -> str:
        """What to try once the engines have registered."""
        host = self.config.server.host
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        body = ('{"messages":[{"role":"user","content":"What is the capital of France?"}],'
                '"max_tokens":32,"temperature":0}')
        return (
            f"fdcore: {len(self.config.launch)} engines are loading; each joins the router "
            f"('instance registered') when ready. Then try:\n"
            f"  curl -s http://{host}:{self.config.server.port}/v1/chat/completions "
            f"-H 'content-type: application/json' -d '{body}'"
        )

    async def stop(self) -> None:
        """Terminate the engines and wait for them."""
        self._stopping = True
        for proc in self._procs.values():
            if proc.returncode is None:
                proc.terminate()
        for proc in self._procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _supervise(self, name: str, entry: LaunchConfig) -> None:
        backoff = 1.0
        while not self._stopping:
            argv = self.argv(entry)
            log.info("starting engine", engine=name, command=" ".join(argv[2:]))
            proc = await asyncio.create_subprocess_exec(*argv, env=self.environment())
            self._procs[name] = proc
            code = await proc.wait()
            if self._stopping:
                return
            log.warning("engine exited", engine=name, code=code)
            if not entry.restart:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)
