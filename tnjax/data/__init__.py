"""Data utilities: tokenizers (and, later, token caches and samplers)."""

from tnjax.data.tokenizer import EOT, load_tokenizer, train_tokenizer

__all__ = ["load_tokenizer", "train_tokenizer", "EOT"]
