"""The one thread that runs torch in an engine process.

libgomp gives every thread that opens a parallel region its own OpenMP team. With two teams
(say, weights loaded on the main thread and forward passes on a worker) the process has more
OpenMP threads than cores, libgomp throttles its spin-waiting, and every parallel region pays a
futex wake-up: a batch-16 SmolLM2 decode step measured 100 ms that way against 85 ms with one
team on 2 cores. So model loading and every forward pass run on this single thread.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
_executor: ThreadPoolExecutor | None = None


def torch_executor() -> ThreadPoolExecutor:
    """The process-wide single-thread executor for torch work (created on first use)."""
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(1, thread_name_prefix="fdcore-torch")
    return _executor


def on_torch_thread(fn: Callable[..., T], *args: object) -> T:
    """Run ``fn(*args)`` on the torch thread and wait for it (for use outside an event loop)."""
    return torch_executor().submit(fn, *args).result()
