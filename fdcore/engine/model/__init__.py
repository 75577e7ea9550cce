"""The ``torch`` model runner: Llama-family decoders from Hugging Face folders or GGUF files."""

from .loader import LoadedModel, load_model
from .tokenizer import TextTokenizer
from .torch_runner import TorchRunner

__all__ = ["LoadedModel", "TextTokenizer", "TorchRunner", "load_model"]
