"""Token caches: text files tokenized once into a memory-mapped array with a JSON manifest, and batch samplers.

The cache ``<name>.bin`` holds uint16 ids (uint32 when the vocabulary is
larger than 65535); ``<name>.json`` records the tokenizer's hash, each
source file's path, size and SHA-256, and the cache's own token count and
SHA-256. A later run with the same tokenizer and files reuses the cache
after checking its count and hash (a truncated or changed cache is refused,
naming it); any change of the inputs rebuilds it. Both files are written to
a temporary name and renamed, so an interrupted build never leaves a cache
that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Sequence

import numpy as np

from tnjax._io import atomic_write, atomic_write_text, read_json, read_text
from tnjax.data.tokenizer import EOT


def file_sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
  return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def _manifest(files: Sequence[pathlib.Path], tokenizer) -> dict:
  return {"tokenizer": tokenizer_hash(tokenizer),
          "files": [{"path": str(f.resolve()), "size": f.stat().st_size, "sha256": file_sha256(f)} for f in files]}


def _encode_file(path: pathlib.Path, tokenizer, chunk_lines: int = 2000) -> list[int]:
  lines = read_text("token_cache", "text", path).splitlines(keepends=True)
  chunks = ["".join(lines[i:i + chunk_lines]) for i in range(0, len(lines), chunk_lines)]
  return [t for enc in tokenizer.encode_batch(chunks) for t in enc.ids]


def token_cache(files: Sequence, tokenizer, cache_dir, name: str) -> np.ndarray:
  """Token ids of ``files`` (joined by ``<|endoftext|>`` when the tokenizer has it), cached on disk.

  Returns:
    A read-only memory-mapped 1-d array of uint16 or uint32 ids.

  Raises:
    ValueError: on a missing file or text that encodes to no tokens; naming the cache's files when its
      manifest is not valid JSON, or the cache does not hold the tokens its manifest records (a truncated
      or changed file: delete it to rebuild it).
  """
  files = [pathlib.Path(f) for f in files]
  for f in files:
    if not f.is_file():
      raise ValueError(f"token_cache: file {f} does not exist")
  cache_dir = pathlib.Path(cache_dir)
  cache_dir.mkdir(parents=True, exist_ok=True)
  binary, meta = cache_dir / f"{name}.bin", cache_dir / f"{name}.json"
  manifest = _manifest(files, tokenizer)
  dtype = np.uint16 if tokenizer.get_vocab_size() <= 65536 else np.uint32
  manifest["dtype"] = np.dtype(dtype).name
  if meta.exists() and binary.exists():
    try:
      saved = read_json("token_cache", meta)
    except ValueError as e:
      raise ValueError(f"{e}; it is the manifest of the token cache {binary}: delete both files to rebuild "
                       "them") from e
    # a manifest written before caches recorded their own count and hash is rebuilt once
    if isinstance(saved, dict) and "tokens" in saved and {k: saved.get(k) for k in manifest} == manifest:
      _check_cache(binary, meta, saved, dtype)
      return np.memmap(binary, dtype=dtype, mode="r")
  eot = tokenizer.token_to_id(EOT)
  ids: list[int] = []
  for f in files:
    ids.extend(_encode_file(f, tokenizer))
    if eot is not None:
      ids.append(eot)
  if not ids:
    raise ValueError(f"token_cache: {[str(f) for f in files]} encode to no tokens")
  array = np.asarray(ids, dtype)
  atomic_write(binary, array.tofile)
  manifest.update(tokens=int(array.size), sha256=hashlib.sha256(array.tobytes()).hexdigest())
  atomic_write_text(meta, json.dumps(manifest, indent=1))
  return np.memmap(binary, dtype=dtype, mode="r")


def _check_cache(binary: pathlib.Path, meta: pathlib.Path, saved: dict, dtype) -> None:
  """Refuses a cache file that does not hold the token count and SHA-256 its manifest records."""
  size, tokens, itemsize = binary.stat().st_size, saved["tokens"], np.dtype(dtype).itemsize
  if not isinstance(tokens, int) or size != tokens * itemsize:
    what = f"{size // itemsize:,} tokens ({size:,} bytes)"
  elif file_sha256(binary) != saved.get("sha256"):
    what = f"{tokens:,} tokens whose SHA-256 differs from the recorded one"
  else:
    return
  raise ValueError(f"token_cache: {binary} holds {what} but its manifest {meta} records tokens={tokens!r} and their "
                   "SHA-256; the cache is truncated or was changed: delete it to rebuild it from the text")


def train_batch(tokens: np.ndarray, step: int, batch_size: int, block_size: int, seed: int):
  """The training batch of ``step``: random windows drawn from a generator seeded by (seed, step).

  Stateless, so a resumed run draws exactly the batches an uninterrupted one would.

  Returns:
    ``(x, y)`` int32 arrays of shape (batch_size, block_size), y shifted by one.

  Examples:
    >>> import numpy as np
    >>> x, y = train_batch(np.arange(100), step=3, batch_size=2, block_size=8, seed=0)
    >>> x.shape, bool((y[:, :-1] == x[:, 1:]).all())
    ((2, 8), True)
  """
  n = len(tokens) - block_size - 1
  if n < 1:
    raise ValueError(f"train_batch: {len(tokens)} tokens but more than block_size + 1 = {block_size + 1} are needed")
  starts = np.random.default_rng([seed, step]).integers(0, n, batch_size)
  return _windows(tokens, starts, block_size)


def eval_batches(tokens: np.ndarray, num_batches: int, batch_size: int, block_size: int):
  """Fixed, evenly spaced windows for validation: the same every call.

  Examples:
    >>> import numpy as np
    >>> batches = eval_batches(np.arange(100), num_batches=3, batch_size=2, block_size=8)
    >>> x, y = batches[0]
    >>> len(batches), x.shape
    (3, (2, 8))
  """
  n = len(tokens) - block_size - 1
  if n < 1:
    raise ValueError(f"eval_batches: {len(tokens)} tokens but more than block_size + 1 = {block_size + 1} are needed")
  total = num_batches * batch_size
  starts = np.linspace(0, n, total, dtype=np.int64) if total > 1 else np.zeros(1, np.int64)
  return [_windows(tokens, starts[i * batch_size:(i + 1) * batch_size], block_size) for i in range(num_batches)]


def _windows(tokens, starts, block_size):
  idx = starts[:, None] + np.arange(block_size + 1)[None, :]
  w = np.asarray(tokens[idx], np.int32)
  return w[:, :-1], w[:, 1:]
