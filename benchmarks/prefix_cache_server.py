"""OpenAI-compatible test instances with a real prefix cache, for routing-quality benchmarks.

Each instance (one per port, all in one process) keeps an LRU cache of block hashes over the
prompt's characters with a fixed capacity, as an engine's prefix cache keeps KV blocks. For a
request it finds how many leading blocks are cached, reports them as
``usage.prompt_tokens_details.cached_tokens`` (one token = one character), and models the time
to the first token as a queue wait plus a prefill proportional to the uncached characters:

* prefills run one at a time per instance (FIFO), taking ``prefill-overhead-ms`` plus
  ``prefill-us-per-token`` per uncached character, so a loaded instance queues its requests;
* the prompt's blocks enter the cache when its prefill ends;
* decoding then emits ``max_tokens`` (at most ``--max-output``) tokens, ``decode-ms`` apart,
  concurrently with other requests.

Endpoints: ``POST /v1/chat/completions`` and ``/v1/completions`` (JSON or SSE with a final usage
chunk), ``GET /health``, ``/v1/models``, ``/metrics`` (FastDeploy's running/waiting gauges),
``GET /stats`` and ``POST /reset`` (clear cache and counters). Every completion carries the
instance's port in ``system_fingerprint``.

Run: ``python benchmarks/prefix_cache_server.py --ports 8001,8002,8003,8004``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from aiohttp import web

MODEL = "prefix-cache-sim"


@dataclass(frozen=True)
class CostModel:
    """Timing and cache size of one simulated instance."""

    block_chars: int = 32
    capacity_blocks: int = 2000
    prefill_overhead_ms: float = 2.0
    prefill_us_per_token: float = 20.0
    decode_ms: float = 3.0
    max_output: int = 16


def prompt_text(body: dict[str, Any]) -> str:
    """The text an engine would prefill: message contents (or the prompt), space-joined."""
    if "messages" in body:
        parts: list[str] = []
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                parts.append(content.strip())
            elif isinstance(content, list):
                parts += [p["text"].strip() for p in content if isinstance(p, dict) and "text" in p]
        return " ".join(p for p in parts if p)
    prompt = body.get("prompt", "")
    return " ".join(prompt) if isinstance(prompt, list) else str(prompt)


class Instance:
    """One simulated engine: prefix cache, prefill queue, counters."""

    def __init__(self, port: int, cost: CostModel) -> None:
        self.port = port
        self.cost = cost
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.prefill = asyncio.Lock()
        self.running = 0
        self.waiting = 0
        self.reset()

    def reset(self) -> None:
        """Forget the cache and the counters."""
        self.cache.clear()
        self.stats = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0}

    def _blocks(self, text: str) -> list[int]:
        size, prev, out = self.cost.block_chars, 0, []
        for start in range(0, len(text) - size + 1, size):
            prev = hash((prev, text[start : start + size]))
            out.append(prev)
        return out

    def _lookup(self, blocks: list[int]) -> int:
        hit = 0
        for block in blocks:
            if block not in self.cache:
                break
            hit += 1
        return hit

    def _store(self, blocks: list[int]) -> None:
        for block in blocks:
            self.cache[block] = None
            self.cache.move_to_end(block)
        while len(self.cache) > self.cost.capacity_blocks:
            self.cache.popitem(last=False)

    async def _prefill(self, text: str) -> int:
        """Prefill ``text`` (the caller holds the prefill slot) and cache it; return cached."""
        blocks = self._blocks(text)
        cached = self._lookup(blocks) * self.cost.block_chars
        cost = self.cost
        uncached = len(text) - cached
        await asyncio.sleep(
            cost.prefill_overhead_ms / 1e3 + uncached * cost.prefill_us_per_token / 1e6
        )
        self._store(blocks)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(text)
        self.stats["cached_tokens"] += cached
        return cached

    async def complete(self, req: web.Request) -> web.StreamResponse:
        """Serve a chat or text completion, streamed or not."""
        try:
            body = await req.json()
        except ValueError:
            return web.json_response({"error": "invalid JSON"}, status=400)
        chat = req.path.endswith("/chat/completions")
        text = prompt_text(body)
        n_out = max(1, min(int(body.get("max_tokens") or 16), self.cost.max_output))
        self.waiting += 1
        try:
            await self.prefill.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            try:
                cached = await self._prefill(text)
            finally:
                self.prefill.release()
            usage = {
                "prompt_tokens": len(text),
                "completion_tokens": n_out,
                "total_tokens": len(text) + n_out,
                "prompt_tokens_details": {"cached_tokens": cached},
            }
            if body.get("stream"):
                return await self._stream(req, chat, n_out, usage)
            for _ in range(n_out):
                await asyncio.sleep(self.cost.decode_ms / 1e3)
            return web.json_response(self._chunk(chat, "x" * n_out, "stop", usage, stream=False))
        finally:
            self.running -= 1

    async def _stream(
        self, req: web.Request, chat: bool, n_out: int, usage: dict[str, Any]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)
        for i in range(n_out):
            if i:
                await asyncio.sleep(self.cost.decode_ms / 1e3)
            chunk = self._chunk(chat, "x", "stop" if i == n_out - 1 else None, None, stream=True)
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        final = self._chunk(chat, None, None, usage, stream=True)
        await resp.write(b"data: " + json.dumps(final).encode() + b"\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _chunk(
        self, chat: bool, text: str | None, finish: str | None, usage: Any, stream: bool
    ) -> dict[str, Any]:
        choices = []
        if text is not None:
            if chat:
                key = "delta" if stream else "message"
                choices = [
                    {
                        "index": 0,
                        key: {"role": "assistant", "content": text},
                        "finish_reason": finish,
                    }
                ]
            else:
                choices = [{"index": 0, "text": text, "finish_reason": finish}]
        kind = "chat.completion" if chat else "text_completion"
        return {
            "id": "cmpl-sim",
            "object": kind + (".chunk" if stream and chat else ""),
            "created": int(time.time()),
            "model": MODEL,
            "choices": choices,
            "system_fingerprint": str(self.port),
            "usage": usage,
        }

    async def metrics(self, req: web.Request) -> web.Response:
        """FastDeploy's two load gauges."""
        text = (
            "# TYPE fastdeploy:num_requests_running gauge\n"
            f"fastdeploy:num_requests_running {self.running}\n"
            "# TYPE fastdeploy:num_requests_waiting gauge\n"
            f"fastdeploy:num_requests_waiting {self.waiting}\n"
        )
        return web.Response(text=text, content_type="text/plain")

    def app(self) -> web.Application:
        """The instance's HTTP routes."""
        app = web.Application(client_max_size=64 * 1024 * 1024)

        async def ok(req: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def models(req: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

        async def stats(req: web.Request) -> web.Response:
            return web.json_response({**self.stats, "cache_blocks": len(self.cache)})

        async def reset(req: web.Request) -> web.Response:
            self.reset()
            return web.json_response({"status": "reset"})

        app.router.add_post("/v1/chat/completions", self.complete)
        app.router.add_post("/v1/completions", self.complete)
        app.router.add_get("/health", ok)
        app.router.add_get("/v1/models", models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/stats", stats)
        app.router.add_post("/reset", reset)
        return app


async def serve(ports: list[int], cost: CostModel) -> None:
    """Run one instance per port until cancelled."""
    runners = []
    for port in ports:
        runner = web.AppRunner(Instance(port, cost).app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
    try:
        await asyncio.Event().wait()
    finally:
        for runner in runners:
            await runner.cleanup()


def main() -> None:
    """Command line: the ports and the cost model."""
    defaults = CostModel()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ports", required=True, help="comma-separated ports, one instance each")
    parser.add_argument("--block-chars", type=int, default=defaults.block_chars)
    parser.add_argument("--capacity-blocks", type=int, default=defaults.capacity_blocks)
    parser.add_argument("--prefill-overhead-ms", type=float, default=defaults.prefill_overhead_ms)
    parser.add_argument("--prefill-us-per-token", type=float, default=defaults.prefill_us_per_token)
    parser.add_argument("--decode-ms", type=float, default=defaults.decode_ms)
    parser.add_argument("--max-output", type=int, default=defaults.max_output)
    args = parser.parse_args()
    cost = CostModel(
        args.block_chars,
        args.capacity_blocks,
        args.prefill_overhead_ms,
        args.prefill_us_per_token,
        args.decode_ms,
        args.max_output,
    )
    ports = [int(p) for p in args.ports.split(",")]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(ports, cost))


if __name__ == "__main__":
    main()
