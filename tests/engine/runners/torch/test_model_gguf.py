"""GGUF loading on a tiny model written as llama.cpp would (Q8_0, permuted Q/K, BPE metadata)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from fdcore.engine.runner import SeqInput
from fdcore.engine.runners.torch import load_model
from fdcore.engine.runners.torch.gguf_tokenizer import tokenizer_from_gguf

from .conftest import TinyModel, write_tiny_gguf

# Both sides de-quantise the same Q8_0 blocks to float32; measured max |diff| ~1e-6.
ATOL = 1e-4


@pytest.fixture(scope="module", params=["llama-gqa", "qwen2-bias-tied"])
def tiny_gguf(
    request: pytest.FixtureRequest,
    tiny_model: Callable[[str], TinyModel],
    tiny_tokenizer: Tokenizer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    model = tiny_model(request.param)
    return write_tiny_gguf(model, tiny_tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_gguf_logits_match_transformers_loading_the_same_file(tiny_gguf: Path) -> None:
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32
    ).eval()
    loaded = load_model(str(tiny_gguf), num_blocks=32)
    assert loaded.name == "tiny"
    ids = list(range(5, 60, 2))
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0]
    table = [3, 1, 2]
    logits = loaded.runner.forward([SeqInput(ids[:-4], 0, table)])
    torch.testing.assert_close(logits[0], ref[-5], atol=ATOL, rtol=0)
    for pos in range(len(ids) - 4, len(ids)):
        logits = loaded.runner.forward([SeqInput([ids[pos]], pos, table)])
        torch.testing.assert_close(logits[0], ref[pos], atol=ATOL, rtol=0)


def test_gguf_tokenizer_matches_the_trained_one(tiny_gguf: Path, tiny_tokenizer: Tokenizer) -> None:
    tok = load_model(str(tiny_gguf), num_blocks=32).tokenizer
    for text in ["The quick brown fox", "naïve   cafés 12345!\n\tdef x():", "<|im_start|>user\nhi"]:
        assert tok.encode(text) == tiny_tokenizer.encode(text).ids
        assert tok.decode(tok.encode(text)) == text.replace("<|im_start|>", "")
    assert tok.eos_token_ids == [tiny_tokenizer.token_to_id("<|im_end|>")]
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def _metadata_only_gguf(
    path: Path, arch: str, hparams: bool = True, tensors: dict[str, np.ndarray] | None = None
) -> Path:
    """A GGUF with architecture metadata (unless ``hparams`` is false), no tokenizer and only
    the given tensors."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    if hparams:
        writer.add_block_count(1)
        writer.add_context_length(64)
        writer.add_embedding_length(8)
        writer.add_feed_forward_length(16)
        writer.add_head_count(2)
        writer.add_layer_norm_rms_eps(1e-5)
    for name, data in (tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_errors(tmp_path: Path) -> None:
    gpt2 = _metadata_only_gguf(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(ValueError, match=r"gpt2\.gguf: GGUF architecture 'gpt2' is not supported"):
        load_model(str(gpt2))
    bare = _metadata_only_gguf(tmp_path / "bare.gguf", "llama", hparams=False)
    with pytest.raises(ValueError, match=r"bare\.gguf: GGUF metadata lacks llama\.attention"):
        load_model(str(bare))
    stray = {"blk.0.ssm_a.weight": np.zeros(4, dtype=np.float32)}
    odd = _metadata_only_gguf(tmp_path / "odd.gguf", "llama", tensors=stray)
    with pytest.raises(ValueError, match=r"tensor 'blk\.0\.ssm_a\.weight' has no place"):
        load_model(str(odd))
    untokenized = _metadata_only_gguf(tmp_path / "untokenized.gguf", "llama")
    with pytest.raises(ValueError, match="GGUF tokenizer None is not supported"):
        load_model(str(untokenized))
    with pytest.raises(ValueError, match=r"x\.gguf: GGUF tokenizer 'llama' is not supported"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "llama"}, Path("x.gguf"))
