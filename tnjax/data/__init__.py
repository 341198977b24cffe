"""Data: tokenizers, token caches, batch samplers, a prefetcher, and a small public-domain sample corpus."""

import pathlib

from tnjax.data.cache import eval_batches, token_cache, tokenizer_hash, train_batch
from tnjax.data.prefetch import Prefetcher
from tnjax.data.tokenizer import EOT, check_fingerprint, load_tokenizer, tokenizer_fingerprint, train_tokenizer

SAMPLE_DIR = pathlib.Path(__file__).parent / "sample"
"""The packaged sample: train.txt (400 KB) and valid.txt (40 KB) of the King James Bible, from the
project corpus's train and valid splits."""

__all__ = ["load_tokenizer", "train_tokenizer", "EOT", "token_cache", "tokenizer_hash", "tokenizer_fingerprint",
           "check_fingerprint", "train_batch", "eval_batches", "Prefetcher", "SAMPLE_DIR"]
