"""A byte-level BPE tokenizer rebuilt from GGUF ``tokenizer.ggml.*`` metadata."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from .chat_template import ChatTemplate
from .tokenizer import TextTokenizer

__all__ = ["tokenizer_from_gguf"]

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the split regex its merges were learned with; others use GPT-2's.
_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


@cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _spelled(token: str, alphabet: set[str]) -> str:
    """Tokens outside the byte alphabet (llama.cpp writes some as raw text) respelled in it."""
    if set(token) <= alphabet:
        return token
    byte_map = _byte_alphabet()
    return "".join(byte_map[b] for b in token.encode("utf-8"))


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    split = _SPLITS.get(pre or "")
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def tokenizer_from_gguf(meta: Mapping[str, Any], path: Path) -> TextTokenizer:
    """Build the tokenizer a GGUF file describes (``tokenizer.ggml.model == "gpt2"``)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{path}: GGUF tokenizer {kind!r} is not supported (only 'gpt2' byte-level BPE)"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    alphabet = set(_byte_alphabet().values())
    vocab = {_spelled(t, alphabet): i for i, t in enumerate(tokens)}
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) must match whole and count as special when decoding.
    # One spelled outside the byte alphabet is a mislabel that no text could produce.
    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types, strict=False)
            if ty == _CONTROL and set(t) <= alphabet
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types, strict=False)
            if ty == _USER_DEFINED
        ]
    )

    def special(key: str) -> tuple[str, int] | None:
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return (tokens[idx], int(idx)) if isinstance(idx, int) and idx < len(tokens) else None

    bos, eos = special("bos"), special("eos")
    template = [bos[0]] if bos and meta.get("tokenizer.ggml.add_bos_token") else []
    suffix = [eos[0]] if eos and meta.get("tokenizer.ggml.add_eos_token") else []
    if template or suffix:
        backend.post_processor = processors.TemplateProcessing(
            single=[*template, "$A", *suffix],
            pair=[*template, "$A", *suffix, *template, "$B", *suffix],
            special_tokens=[t for t in (bos, eos) if t],
        )
    eos_ids = [t[1] for t in (eos, special("eot"), special("eom")) if t]
    source = meta.get("tokenizer.chat_template")
    chat = (
        ChatTemplate(source, bos_token=bos[0] if bos else "", eos_token=eos[0] if eos else "")
        if isinstance(source, str)
        else None
    )
    return TextTokenizer(backend, eos_token_ids=list(dict.fromkeys(eos_ids)), chat_template=chat)
