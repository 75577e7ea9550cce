"""The real model: SmolLM2-135M-Instruct (GGUF, Q4_1) against transformers loading the same file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fdcore.engine.runner import SeqInput
from fdcore.engine.runners.torch import LoadedModel, load_model

# Both sides use the same de-quantised float32 weights (checked equal); what differs is the
# summation order over 30 layers. Measured max |diff| ~4e-5 on logits of magnitude ~30.
ATOL = 5e-4
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> LoadedModel:
    return load_model(str(smollm2_path), max_model_len=1024)


@pytest.fixture(scope="module")
def reference(smollm2_path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": smollm2_path.name}
    model = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, dtype=torch.float32, **kwargs)
    return model.eval(), AutoTokenizer.from_pretrained(smollm2_path.parent, **kwargs)


def test_logits_match_transformers(smollm2: LoadedModel, reference: tuple[Any, Any]) -> None:
    model, _ = reference
    ids = smollm2.tokenizer.encode("Paged attention keeps the KV cache in blocks, so " * 4)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    table = [7, 3, 11, 0, 5]
    prompt = len(ids) - 4
    logits = smollm2.runner.forward([SeqInput(ids[:prompt], 0, table)])
    torch.testing.assert_close(logits[0], ref[prompt - 1], atol=ATOL, rtol=0)
    for pos in range(prompt, len(ids)):
        logits = smollm2.runner.forward([SeqInput([ids[pos]], pos, table)])
        torch.testing.assert_close(logits[0], ref[pos], atol=ATOL, rtol=0)


def test_tokenizer_matches_transformers(smollm2: LoadedModel, reference: tuple[Any, Any]) -> None:
    _, ref = reference
    tok = smollm2.tokenizer
    texts = [
        "Hello world, héllo  123!",
        "def f(x):\n\treturn x ** 2  # 3.14159\n\n",
        "日本語のテキストと emoji 🙂 mixed",
        "<|im_start|>user\nWhat?<|im_end|>\n",
    ]
    for text in texts:
        assert tok.encode(text) == ref.encode(text)
        assert tok.decode(tok.encode(text)) == ref.decode(
            ref.encode(text), skip_special_tokens=True
        )
    prompt = tok.apply_chat_template(QUESTION)
    assert prompt == ref.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert smollm2.eos_token_ids == [ref.convert_tokens_to_ids("<|im_end|>")]


def test_greedy_chat_answer_names_paris(smollm2: LoadedModel) -> None:
    tok, runner = smollm2.tokenizer, smollm2.runner
    ids = tok.encode(tok.apply_chat_template(QUESTION), add_special_tokens=False)
    table = list(range(-(-(len(ids) + 32) // runner.block_size)))
    logits = runner.forward([SeqInput(ids, 0, table)])
    answer: list[int] = []
    while len(answer) < 32:
        answer.append(int(logits[0].argmax()))
        if answer[-1] in smollm2.eos_token_ids:
            break
        logits = runner.forward([SeqInput(answer[-1:], len(ids) + len(answer) - 1, table)])
    assert "Paris" in tok.decode(answer)
