"""What the HTTP handlers need from a running engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from fdcore.drain import Drain
from fdcore.engine.metrics import EngineMetrics
from fdcore.engine.runner import Tokenizer
from fdcore.engine.serving import Serving
from fdcore.types import Scheduler


@dataclass(slots=True)
class EngineContext:
    """The engine's parts and limits, shared by every route (``app.state.engine``)."""

    model_name: str
    served_names: frozenset[str]
    tokenizer: Tokenizer
    vocab_size: int
    max_model_len: int
    cache_tokens: int  # KV-cache capacity in tokens: what one sequence can use at most
    serving: Serving
    scheduler: Scheduler
    metrics: EngineMetrics
    instance_id: str
    max_body_bytes: int
    drain: Drain = field(default_factory=Drain)  # begun by the server on SIGTERM
