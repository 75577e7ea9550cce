"""A request as the engine runs it: its tokens, cache blocks and progress."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fdcore.engine.block_manager import BlockTable
from fdcore.engine.detokenizer import IncrementalText
from fdcore.engine.disagg.info import DisaggInfo, disagg_of
from fdcore.engine.runner import Tokenizer
from fdcore.engine.sampling import make_generator
from fdcore.types import EngineRequest, RequestOutput


@dataclass(eq=False, slots=True)
class Seq:
    """Prompt plus generated tokens; ``num_computed`` of them have their K/V in the cache.

    After preemption the blocks are given back and ``num_computed`` drops to 0: the sequence
    is recomputed from its tokens (mostly prefix-cache hits) when it is admitted again.
    """

    request: EngineRequest
    tokens: list[int]
    text: IncrementalText
    generator: torch.Generator | None
    table: BlockTable = field(default_factory=BlockTable)
    num_computed: int = 0
    num_cached_tokens: int = 0
    admitted_once: bool = False
    disagg: DisaggInfo | None = None  # a P-D hand-off's pairing (prefill engines only)
    direct: bool = False  # outputs go straight to the API (a hand-off taken over on D)
    adopted_at: float = 0.0  # wall time its KV arrived from P, until its first decode step

    @classmethod
    def from_request(cls, request: EngineRequest, tokenizer: Tokenizer) -> Seq:
        """A fresh sequence for ``request``."""
        sampling = request.sampling
        return cls(
            request=request,
            tokens=list(request.prompt_token_ids),
            text=IncrementalText(tokenizer, sampling.stop),
            generator=make_generator(sampling),
            disagg=disagg_of(request.extra),
        )

    @property
    def request_id(self) -> str:
        """The request's id."""
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        """Prompt tokens."""
        return self.request.prompt_len

    @property
    def num_output(self) -> int:
        """Generated tokens so far."""
        return len(self.tokens) - self.prompt_len

    @property
    def is_decoding(self) -> bool:
        """Exactly one token (normally the last sampled one) is left to feed."""
        return len(self.tokens) - self.num_computed == 1

    def output(
        self, token_ids: list[int], finish_reason: str | None = None
    ) -> RequestOutput:
        """This step's output for the request."""
        return RequestOutput(
            request_id=self.request_id,
            token_ids=token_ids,
            finished=finish_reason is not None,
            finish_reason=finish_reason,
            prompt_tokens=self.prompt_len,
            cached_tokens=self.num_cached_tokens,
            completion_tokens=self.num_output,
            text=self.text.take(final=finish_reason is not None),
        )
