"""Tokenizers through Hugging Face ``tokenizers``: load GPT-2 style ones, or train a byte-level BPE."""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tnjax._io import read_text

EOT = "<|endoftext|>"


def _byte_level(tok: Tokenizer) -> Tokenizer:
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  return tok


def load_tokenizer(path) -> Tokenizer:
  """A tokenizer from a ``tokenizer.json`` file, or a directory holding ``tokenizer.json`` or
  GPT-2's ``vocab.json`` + ``merges.txt``.

  Raises:
    ValueError: when none of those files exists.

  Examples:
    >>> import tempfile, pathlib
    >>> from tnjax.data import SAMPLE_DIR, train_tokenizer
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> train_tokenizer([SAMPLE_DIR / "valid.txt"], 300).save(str(d / "tokenizer.json"))
    >>> load_tokenizer(d).get_vocab_size()
    300
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise ValueError(f"load_tokenizer: {path} does not exist; a tokenizer.json file or a directory holding one "
                     "is expected")
  file = path if path.is_file() else path / "tokenizer.json"
  try:
    if file.is_file():
      return Tokenizer.from_file(str(file))
    if (path / "vocab.json").exists() and (path / "merges.txt").exists():
      file = path / "vocab.json"
      return _byte_level(Tokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt"))))
  except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
    raise ValueError(f"load_tokenizer: {file} is not a readable tokenizer ({str(e)[:200]})") from e
  raise ValueError(f"load_tokenizer: {path} has no tokenizer.json and no vocab.json + merges.txt")


def tokenizer_fingerprint(tokenizer) -> str:
  """The SHA-256 of a tokenizer's vocabulary: every token with its id, added tokens included. A model directory
  written by tnjax records it (`tnjax.interop.save_model`), so that a model is not read with another tokenizer
  whose ids mean other text (one trained on other text with the same size evaluated to perplexity 1256).

  The vocabulary, not the tokenizer's JSON: the JSON that Hugging Face ``tokenizers`` writes has changed between
  its versions, and a library upgrade must not refuse every model.

  Examples:
    >>> from tnjax.data import SAMPLE_DIR
    >>> tok = train_tokenizer([SAMPLE_DIR / "valid.txt"], 300)
    >>> len(tokenizer_fingerprint(tok)), tokenizer_fingerprint(tok) == tokenizer_fingerprint(tok)
    (64, True)
  """
  vocab = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda item: (item[1], item[0]))
  return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


def check_fingerprint(fn: str, tokenizer, where: str, recorded: dict | None, model_dir) -> None:
  """Refuses ``tokenizer`` (read from ``where``) for the model directory whose recorded tokenizer is ``recorded``
  (``{"fingerprint", "vocab_size"}``, or None for a directory that records none: nothing is checked).

  Raises:
    ValueError: naming both tokenizers, when the fingerprints differ.
  """
  if not recorded or recorded.get("fingerprint") == tokenizer_fingerprint(tokenizer):
    return
  raise ValueError(f"{fn}: the tokenizer {where} ({tokenizer.get_vocab_size():,} tokens, fingerprint "
                   f"{tokenizer_fingerprint(tokenizer)[:12]}) is not the one {model_dir} was written with "
                   f"({recorded.get('vocab_size')} tokens, fingerprint {str(recorded.get('fingerprint'))[:12]}; "
                   "its config.json records it): its ids would mean other text; give that tokenizer")


def train_tokenizer(files: Sequence, vocab_size: int, *, min_frequency: int = 2,
                    special_tokens: Sequence[str] = (EOT,)) -> Tokenizer:
  """Trains a byte-level BPE (GPT-2's scheme) on text files.

  Args:
    files: paths of UTF-8 text files.
    vocab_size: target size, at least 256 + len(special_tokens) (the byte alphabet).
    min_frequency: pairs seen fewer times are not merged.
    special_tokens: added first, so ``<|endoftext|>`` gets id 0.

  Raises:
    ValueError: on a missing file or too small a vocabulary.

  Examples:
    >>> from tnjax.data import SAMPLE_DIR
    >>> tok = train_tokenizer([SAMPLE_DIR / "valid.txt"], 300)
    >>> tok.get_vocab_size(), tok.decode(tok.encode("In the beginning").ids)
    (300, 'In the beginning')
  """
  files = [str(f) for f in files]
  for f in files:
    if not pathlib.Path(f).is_file():
      raise ValueError(f"train_tokenizer: file {f} does not exist")
  floor = 256 + len(special_tokens)
  if vocab_size < floor:
    raise ValueError(f"train_tokenizer: vocab_size={vocab_size} but at least {floor} is needed (256 bytes + "
                     "special tokens)")
  tok = _byte_level(Tokenizer(models.BPE()))
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=list(special_tokens),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  try:
    tok.train(files, trainer)
  except Exception as e:  # tokenizers raises a bare Exception for undecodable text; name the file
    for f in files:
      read_text("train_tokenizer", "text", f)
    raise ValueError(f"train_tokenizer: training on {files} failed ({e})") from e
  return tok
