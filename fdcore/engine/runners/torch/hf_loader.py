"""Reading a Hugging Face model folder: config.json, *.safetensors, tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .tokenizer import TextTokenizer

__all__ = ["read_hf_folder"]


def read_hf_folder(
    path: Path, device: torch.device, dtype: torch.dtype
) -> tuple[ModelConfig, dict[str, torch.Tensor], TextTokenizer]:
    """Config, weights (Hugging Face names, on ``device`` in ``dtype``) and tokenizer."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path}: no config.json (expected a Hugging Face model folder)")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_file}: not valid JSON: {exc}") from None
    cfg = ModelConfig.from_hf(raw, cfg_file)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors weight files")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                weights[name] = st.get_tensor(name).to(device=device, dtype=dtype)
    return cfg, weights, TextTokenizer.from_hf_folder(path)
