"""The tokenizer of a Hugging Face folder against transformers', and chat template rendering."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from fdcore.engine.runners.torch.chat_template import ChatTemplate
from fdcore.engine.runners.torch.tokenizer import TextTokenizer

from .conftest import CHAT_TEMPLATE, TinyModel

TEXTS = ["Hello world", "  leading spaces and émigrés 3.14159\n", "<|im_start|>user\nhi<|im_end|>"]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


@pytest.fixture
def folder(tiny_model: Callable[[str], TinyModel]) -> Path:
    return tiny_model("llama-gqa").path


def test_encode_decode_and_template_match_transformers(folder: Path) -> None:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(folder)
    tok = TextTokenizer.from_hf_folder(folder)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ref.encode(
            text, add_special_tokens=False
        )
        ids = tok.encode(text)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    for add in (True, False):
        assert tok.apply_chat_template(MESSAGES, add_generation_prompt=add) == (
            ref.apply_chat_template(MESSAGES, add_generation_prompt=add, tokenize=False)
        )
    assert tok.eos_token_ids == [ref.convert_tokens_to_ids("<|im_end|>")]


def test_content_parts_are_joined(folder: Path) -> None:
    tok = TextTokenizer.from_hf_folder(folder)
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template(
        [{"role": "user", "content": "ab"}]
    )


def test_raise_exception_becomes_value_error(folder: Path) -> None:
    tok = TextTokenizer.from_hf_folder(folder)
    with pytest.raises(ValueError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_jinja_file_and_missing_template(folder: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(folder / name, tmp_path / name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(ValueError, match="no chat template"):
        TextTokenizer.from_hf_folder(tmp_path).apply_chat_template([])
    (tmp_path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    tok = TextTokenizer.from_hf_folder(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]).endswith("assistant\n")
    assert tok.chat_template is not None and tok.chat_template.eos_token == "<|im_end|>"


def test_template_helpers() -> None:
    template = ChatTemplate(
        "{{ bos_token }}{{ messages | tojson }}{% for m in messages %}{% if loop.index > 1 %}"
        "{% break %}{% endif %}{{ m.content }}{% endfor %}{{ eos_token }}",
        bos_token="<s>",
        eos_token="</s>",
    )
    out = template.render([{"role": "user", "content": "é"}, {"role": "user", "content": "z"}])
    assert out == '<s>[{"role": "user", "content": "é"}, {"role": "user", "content": "z"}]é</s>'
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for %}")
