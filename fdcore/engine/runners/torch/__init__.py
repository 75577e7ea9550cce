"""The ``torch`` model runner: Llama-family decoders from Hugging Face folders or GGUF files."""

from .loader import LoadedModel, load_model
from .runner import TorchRunner
from .tokenizer import TextTokenizer

__all__ = ["LoadedModel", "TextTokenizer", "TorchRunner", "load_model"]
