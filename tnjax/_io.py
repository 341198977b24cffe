"""Atomic file writes: a reader (or a run interrupted mid-write) never sees a half-written file."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable


def atomic_write(path, write: Callable[[str], object]) -> pathlib.Path:
  """Calls ``write(tmp)`` with a temporary name next to ``path``, then renames it to ``path``.

  Examples:
    >>> import tempfile
    >>> p = atomic_write(pathlib.Path(tempfile.mkdtemp()) / "a.txt", lambda t: pathlib.Path(t).write_text("hi"))
    >>> p.read_text()
    'hi'
  """
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    write(str(tmp))
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  return path


def copy_tree_linked(src, dst) -> None:
  """Copies the directory ``src`` to ``dst`` as hard links where the filesystem allows (read-only data such as
  token caches, which are replaced by rename, never written in place), else as copies."""
  import shutil

  def link_or_copy(a, b):
    try:
      os.link(a, b)
    except OSError:  # another filesystem, or no hard links
      shutil.copy2(a, b)

  shutil.copytree(src, dst, copy_function=link_or_copy)


def atomic_write_text(path, text: str) -> pathlib.Path:
  return atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))


def read_text(fn: str, name: str, path) -> str:
  """The UTF-8 text of a file; a missing, unreadable or binary file raises ValueError naming ``fn``, ``name`` and it.

  Examples:
    >>> read_text("eval", "--text", "/nowhere.txt")
    Traceback (most recent call last):
    ValueError: eval: --text file /nowhere.txt does not exist
  """
  path = pathlib.Path(path)
  where = f"{fn}: {name} file {path}"
  if not path.exists():
    raise ValueError(f"{where} does not exist")
  if not path.is_file():
    raise ValueError(f"{where} is not a regular file (a directory?); a UTF-8 text file is expected")
  try:
    data = path.read_bytes()
  except OSError as e:
    raise ValueError(f"{where} cannot be read ({e.strerror})") from e
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{where} is not UTF-8 text (byte {e.start}: {e.reason}); a text file is expected") from e
  if "\x00" in text:
    raise ValueError(f"{where} contains NUL bytes (binary data?); a text file is expected")
  return text


def read_json(fn: str, path):
  """A JSON file's value; a missing or unparsable file raises ValueError naming ``fn`` and the file."""
  text = read_text(fn, "JSON", path)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{fn}: {path} is not valid JSON ({e})") from e


def read_safetensors(fn: str, path) -> dict:
  """The tensors of a safetensors file as NumPy arrays, all finite.

  Raises:
    ValueError: naming ``fn`` and the file when it is missing, truncated or
      garbled, or when a floating tensor holds NaN or Inf (overwritten bytes).
  """
  import numpy as np
  from safetensors.numpy import load_file

  if not pathlib.Path(path).is_file():
    raise ValueError(f"{fn}: {path} does not exist or is not a file")
  try:
    tensors = load_file(str(path))
  except Exception as e:  # safetensors raises SafetensorError, not a ValueError, for truncated or garbled files
    raise ValueError(f"{fn}: {path} is not a readable safetensors file ({str(e)[:200]}); it is truncated or "
                     "corrupt") from e
  for name, value in tensors.items():
    if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
      raise ValueError(f"{fn}: tensor {name} in {path} has NaN or infinite values; the file is corrupt")
  return tensors
