"""Load generators of ``benchmarks/reliability.py``: chat requests, closed loops, slowloris.

Every request ends in exactly one outcome:

* ``ok``: a 200 with a complete answer (streams: ``data: [DONE]`` seen);
* ``sse_error``: a started stream that ended with a ``data: {"error": ...}`` event;
* ``truncated``: a started stream that ended with neither ``[DONE]`` nor an error event (a
  clean end without ``[DONE]``, or a broken chunked body);
* ``http_<status>``: an answer other than 200 (its body read whole);
* ``conn_error``: no answer at all (refused, reset before the headers, client timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing.connection
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

PROMPT = "Tell me about request {i}."


@dataclass
class Result:
    """One request as the client saw it (times are ``time.monotonic()`` seconds)."""

    start: float
    end: float
    outcome: str
    instance: str = ""  # the router's X-Router-Instance-URL
    ttft: float | None = None  # first content chunk, streams only
    detail: str = ""  # error event's code/type, or the exception

    @property
    def total(self) -> float:
        """Seconds from sending to the end of the answer."""
        return self.end - self.start


def chat_body(i: int, max_tokens: int, stream: bool) -> dict[str, Any]:
    """A short chat request; ``i`` varies the prompt."""
    return {
        "model": "sim",
        "messages": [{"role": "user", "content": PROMPT.format(i=i)}],
        "max_tokens": max_tokens,
        "stream": stream,
        "temperature": 0,
    }


async def chat(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], timeout: float = 120
) -> Result:
    """Send one chat completion to ``url`` (the router) and classify how it ended."""
    t0 = time.monotonic()
    instance, ttft, done, error = "", None, False, ""
    started = False
    try:
        async with session.post(
            f"{url}/v1/chat/completions",
            data=orjson.dumps(body),
            headers={"content-type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            instance = resp.headers.get("X-Router-Instance-URL", "")
            if resp.status != 200:
                return Result(t0, time.monotonic(), f"http_{resp.status}", instance,
                              detail=_error_type(await resp.read()))
            started = True
            if not body["stream"]:
                answer = orjson.loads(await resp.read())
                outcome = "ok" if answer.get("choices") else "truncated"
                return Result(t0, time.monotonic(), outcome, instance)
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    done = True
                    continue
                event = orjson.loads(data)
                if "error" in event:
                    err = event["error"]
                    error = f"{err.get('code')}/{err.get('type')}"
                elif ttft is None:
                    ttft = time.monotonic() - t0
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
        outcome = "truncated" if started else "conn_error"
        return Result(t0, time.monotonic(), outcome, instance, ttft, type(exc).__name__)
    if error:
        return Result(t0, time.monotonic(), "sse_error", instance, ttft, error)
    return Result(t0, time.monotonic(), "ok" if done else "truncated", instance, ttft)


def _error_type(body: bytes) -> str:
    """The ``error.type`` of an OpenAI error body, or its first bytes."""
    try:
        return str(orjson.loads(body)["error"]["type"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return body[:40].decode(errors="replace")


def session(limit: int) -> aiohttp.ClientSession:
    """A client session with ``limit`` connections at most (0: one per concurrent request)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), trust_env=False)


async def burst(url: str, bodies: Sequence[dict[str, Any]]) -> list[Result]:
    """All ``bodies`` at once, one connection each."""
    async with session(0) as s:
        return list(await asyncio.gather(*(chat(s, url, b) for b in bodies)))


async def closed_loop(
    url: str,
    clients: int,
    make_body: Callable[[int], dict[str, Any]],
    *,
    total: int | None = None,
    seconds: float | None = None,
    stop: asyncio.Event | None = None,
    results: list[Result] | None = None,
) -> list[Result]:
    """``clients`` workers, each sending its next request when the last one ended.

    Ends after ``total`` requests, ``seconds``, or when ``stop`` is set (whichever first);
    requests in flight then finish. Results are appended to ``results`` as they end.
    """
    out: list[Result] = [] if results is None else results
    counter = itertools.count()
    deadline = None if seconds is None else time.monotonic() + seconds

    def more() -> bool:
        return not (stop is not None and stop.is_set()) and (
            deadline is None or time.monotonic() < deadline
        )

    async def worker(s: aiohttp.ClientSession) -> None:
        while more():
            i = next(counter)
            if total is not None and i >= total:
                return
            out.append(await chat(s, url, make_body(i)))

    async with session(clients) as s:
        await asyncio.gather(*(worker(s) for _ in range(clients)))
    return out


def pct(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``values`` by the nearest-rank rule, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def summarize(results: Sequence[Result]) -> dict[str, Any]:
    """Outcome counts and TTFT/total percentiles (ms) over ``results``."""
    ok = [r for r in results if r.outcome == "ok"]
    ttfts = [r.ttft * 1000 for r in ok if r.ttft is not None]
    totals = [r.total * 1000 for r in ok]
    out: dict[str, Any] = {
        "requests": len(results),
        "outcomes": dict(Counter(r.outcome for r in results)),
        "details": dict(Counter(f"{r.outcome}:{r.detail}" for r in results if r.detail)),
    }
    for name, values in (("ttft", ttfts), ("total", totals)):
        for q in (0.5, 0.99):
            value = pct(values, q)
            out[f"{name}_p{int(q * 100)}_ms"] = None if value is None else round(value, 1)
    return out


# --------------------------------------------------------------------------- slowloris


@dataclass
class SlowlorisStats:
    """What one kind of slow connection saw; ``lifetimes`` are seconds from connect to close."""

    opened: int = 0
    connect_failures: int = 0
    closed_by_server: int = 0
    answered: int = 0  # closes that came with response bytes (e.g. a 408)
    lifetimes: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Counts and lifetime percentiles."""
        out: dict[str, Any] = {k: v for k, v in self.__dict__.items() if k != "lifetimes"}
        for q in (0.5, 0.99):
            value = pct(self.lifetimes, q)
            out[f"lifetime_p{int(q * 100)}_s"] = None if value is None else round(value, 2)
        return out


_HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
         b"Content-Type: application/json\r\n")


async def _slowloris(port: int, n: int, interval: float, pipe: Any) -> dict[str, Any]:
    # Even-numbered connections trickle a request head a byte every ``interval`` seconds (it
    # never ends); odd ones send nothing. A connection the server closes is opened again.
    kinds = {"trickle": SlowlorisStats(), "silent": SlowlorisStats()}
    stopping = asyncio.Event()
    open_now = 0
    held: list[int] = []

    async def one(k: int) -> None:
        nonlocal open_now
        stats = kinds["trickle" if k % 2 == 0 else "silent"]
        while not stopping.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                stats.connect_failures += 1
                await asyncio.sleep(interval)
                continue
            stats.opened += 1
            open_now += 1
            t0, sent = time.monotonic(), 0
            try:
                while not stopping.is_set():
                    if k % 2 == 0:
                        writer.write(_HEAD[sent % len(_HEAD) : sent % len(_HEAD) + 1])
                        sent += 1
                    with contextlib.suppress(asyncio.TimeoutError):
                        data = await asyncio.wait_for(reader.read(4096), interval)
                        stats.closed_by_server += 1
                        stats.answered += bool(data)
                        stats.lifetimes.append(time.monotonic() - t0)
                        break
            except OSError:
                stats.closed_by_server += 1
                stats.lifetimes.append(time.monotonic() - t0)
            finally:
                open_now -= 1
                writer.close()

    tasks = []
    for k in range(n):  # ramp up in steps so the accept queue does not overflow
        tasks.append(asyncio.create_task(one(k)))
        if k % 200 == 199:
            await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    pipe.send({"ready": open_now})
    loop = asyncio.get_running_loop()
    while not await loop.run_in_executor(None, pipe.poll, 1.0):
        held.append(open_now)
    pipe.recv()
    stopping.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"held_min": min(held, default=None), "held_max": max(held, default=None),
            **{kind: stats.to_json() for kind, stats in kinds.items()}}


def slowloris_child(port: int, n: int, interval: float, pipe: Any) -> None:
    """Process entry point: hold ``n`` slow connections (reopening closed ones) until told to
    stop through ``pipe``; then send the stats back through it."""
    pipe.send(asyncio.run(_slowloris(port, n, interval, pipe)))


def wait_message(pipe: multiprocessing.connection.Connection, timeout: float) -> Any:
    """The next message on ``pipe``, or ``TimeoutError``."""
    if not pipe.poll(timeout):
        raise TimeoutError(f"no message from the slowloris process within {timeout:.0f}s")
    return pipe.recv()
