"""The :class:`~fdcore.engine.runner.Tokenizer` implementation over ``tokenizers``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from .chat_template import ChatTemplate

__all__ = ["TextTokenizer"]


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


class TextTokenizer:
    """Text <-> ids with a ``tokenizers`` backend, and the model's chat template.

    BOS handling lives in the backend's post-processor, so ``encode(text)`` adds BOS exactly when
    the model wants it. Rendered chat prompts already contain their special tokens: encode them
    with ``add_special_tokens=False``.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        eos_token_ids: list[int],
        chat_template: ChatTemplate | None,
    ) -> None:
        self.backend = backend
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (with the model's BOS where it wants one)."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``, special tokens skipped."""
        return str(self.backend.decode(list(token_ids), skip_special_tokens=True))

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render OpenAI-style messages with the model's chat template."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; use the completions API")
        return self.chat_template.render(messages, add_generation_prompt)

    @classmethod
    def from_hf_folder(cls, path: Path) -> TextTokenizer:
        """Load ``tokenizer.json``, ``tokenizer_config.json`` (or ``chat_template.jinja``) and
        the EOS ids named by the tokenizer, ``generation_config.json`` and ``config.json``."""
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ValueError(f"{path}: no tokenizer.json (only fast tokenizers are supported)")
        backend = Backend.from_file(str(file))
        tok_cfg = _read_json(path / "tokenizer_config.json")
        eos_ids = _ids(_read_json(path / "generation_config.json").get("eos_token_id"))
        eos_ids += _ids(_read_json(path / "config.json").get("eos_token_id"))
        eos_text = _token_text(tok_cfg.get("eos_token"))
        eos_id = backend.token_to_id(eos_text) if eos_text else None
        if eos_id is not None:
            eos_ids.append(eos_id)
        source = tok_cfg.get("chat_template")
        if isinstance(source, list):
            # Several named templates: the "default" one serves chat.
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        jinja_file = path / "chat_template.jinja"
        if source is None and jinja_file.is_file():
            source = jinja_file.read_text(encoding="utf-8")
        template = None
        if isinstance(source, str):
            template = ChatTemplate(
                source,
                bos_token=_token_text(tok_cfg.get("bos_token")) or "",
                eos_token=eos_text or "",
            )
        return cls(backend, eos_token_ids=list(dict.fromkeys(eos_ids)), chat_template=template)
