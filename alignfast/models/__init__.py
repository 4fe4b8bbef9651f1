"""Tiny models and tokenizers built locally (no downloads), shared by tests and the demo."""
from alignfast.models.tiny import tiny_llama, tiny_tokenizer

__all__ = ["tiny_llama", "tiny_tokenizer"]
