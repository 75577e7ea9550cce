"""A byte-level tokenizer for the ``sim`` model: every UTF-8 byte is a token."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

BOS_ID = 256
EOS_ID = 257
VOCAB_SIZE = 258


class ByteTokenizer:
    """Token ids 0-255 are bytes; 256 is BOS and 257 is EOS (both skipped when decoding)."""

    eos_token_ids: list[int] = [EOS_ID]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """UTF-8 bytes of ``text``, after BOS when ``add_special_tokens``."""
        ids = list(text.encode("utf-8"))
        return [BOS_ID, *ids] if add_special_tokens else ids

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of the byte tokens; an incomplete UTF-8 sequence decodes to U+FFFD."""
        return bytes(t for t in token_ids if t < BOS_ID).decode("utf-8", errors="replace")

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """``<|role|>`` headers before each message, like a minimal ChatML."""
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        return text + ("<|assistant|>\n" if add_generation_prompt else "")
