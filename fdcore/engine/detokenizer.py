"""Incremental detokenization with stop strings, for streaming text as tokens arrive."""

from __future__ import annotations

from fdcore.engine.runner import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalText:
    """Turns a growing list of output token ids into text deltas.

    Tokens are decoded in a short window (``prefix`` .. end) because many tokenizers only
    produce the right spacing and multi-byte characters in context. When stop strings are
    set, the last ``max(len(stop)) - 1`` characters are held back until they cannot start one.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> None:
        """Add one generated token; sets ``stopped`` when the text now contains a stop string."""
        self._ids.append(token_id)
        before = self._tokenizer.decode(self._ids[self._prefix : self._read])
        after = self._tokenizer.decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(_REPLACEMENT):
            return  # an incomplete character: wait for the next token
        start = len(self.text)
        self.text += after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._check_stop(max(0, start - self._holdback))

    def take(self, final: bool) -> str:
        """Text not yet returned that can no longer turn out to be part of a stop string."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._holdback
        if end <= self._emitted:
            return ""
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta

    def _check_stop(self, search_from: int) -> None:
        hits = [i for s in self._stop if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
