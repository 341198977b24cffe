"""Atomic file writes: a reader (or a run interrupted mid-write) never sees a half-written file; and a directory
lock, so that two runs never write into one directory at once."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import re
import socket
import time
from collections.abc import Callable

LOCK_NAME = ".tnjax.lock"


def atomic_write(path, write: Callable[[str], object]) -> pathlib.Path:
  """Calls ``write(tmp)`` with a temporary name next to ``path``, then renames it to ``path``.

  Examples:
    >>> import tempfile
    >>> p = atomic_write(pathlib.Path(tempfile.mkdtemp()) / "a.txt", lambda t: pathlib.Path(t).write_text("hi"))
    >>> p.read_text()
    'hi'
  """
  path = pathlib.Path(path)
  tmp = temporary_name(path)
  try:
    write(str(tmp))
    os.replace(tmp, path)
  except OSError as e:
    if e.filename is not None:
      raise
    # a writer's own OSError (numpy's tofile: "25540 requested and 15000 written") names no file: this one does
    raise OSError(e.errno, f"writing it failed ({e.strerror or e}; is the disk full?)", str(path)) from e
  finally:
    tmp.unlink(missing_ok=True)
  return path


def temporary_name(path: pathlib.Path) -> pathlib.Path:
  """The hidden name ``path`` is written under before it is renamed into place (no loader reads it)."""
  return path.with_name(f".{path.name}.{os.getpid()}.tmp")


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


class LazyTensor:
  """One tensor of a safetensors file, read only when converted (``np.asarray``); its shape and NumPy dtype come
  from the file's header. A checkpoint's tensors are read one at a time, so loading holds one tensor beside
  the model, not the whole checkpoint."""

  def __init__(self, fn: str, path: pathlib.Path, name: str, shape, dtype):
    self.fn, self.path, self.name, self.shape, self.dtype = fn, path, name, tuple(shape), dtype
    self.ndim = len(self.shape)

  def __array__(self, dtype=None, copy=None):
    from safetensors import safe_open

    try:
      with safe_open(str(self.path), framework="numpy") as f:
        value = f.get_tensor(self.name)
    except Exception as e:  # SafetensorError for a file truncated or garbled past its header
      raise ValueError(f"{self.fn}: tensor {self.name} of {self.path} cannot be read ({str(e)[:200]}); the file "
                       "is truncated or corrupt") from e
    check_finite(self.fn, self.name, self.path, value)
    return value if dtype is None else value.astype(dtype)


def read_safetensors(fn: str, path) -> dict[str, LazyTensor]:
  """The tensors of a safetensors file as unread `LazyTensor` objects: the header is read and checked now,
  each tensor when it is used (and then refused if a floating one holds NaN or Inf).

  Raises:
    ValueError: naming ``fn`` and the file when it is missing, truncated or
      garbled, or when a floating tensor holds NaN or Inf (overwritten bytes).
  """
  import numpy as np
  from safetensors import safe_open

  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"{fn}: {path} does not exist or is not a file")
  names = {code: name for name, code in _SAFETENSORS_DTYPES.items()}
  try:
    with safe_open(str(path), framework="numpy") as f:
      return {k: LazyTensor(fn, path, k, f.get_slice(k).get_shape(), np.dtype(names[f.get_slice(k).get_dtype()]))
              for k in f.keys()}
  except Exception as e:  # safetensors raises SafetensorError, not a ValueError, for truncated or garbled files
    raise ValueError(f"{fn}: {path} is not a readable safetensors file ({str(e)[:200]}); it is truncated or "
                     "corrupt") from e


_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                      "int32": "I32", "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32",
                      "uint16": "U16", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(path, tensors: dict, metadata: dict[str, str] | None = None, dtype=None) -> None:
  """Writes ``tensors`` as a safetensors file, one tensor at a time, each in ``dtype`` (default its own).

  A value is a JAX or NumPy array, a `LazyTensor`, or a zero-argument callable that computes the tensor (JAX
  code: its shape and dtype come from ``jax.eval_shape``, so the header is written before anything is
  computed). Each value is computed and moved to the host only when its bytes are written, and dropped before
  the next: the host holds one tensor, not the model.

  ``safetensors.numpy.save_file`` serializes every tensor into memory before writing, a second full copy
  of a model (16 GB for an 8B model in bf16); this writes the format's header (its length as 8 little-endian
  bytes, then JSON with each tensor's dtype, shape and byte range, padded to 8 bytes) and then each tensor's
  bytes in turn. The file reads back with the safetensors library, and has the process's default permissions
  (``save_file`` makes its files readable by the owner only).

  Examples:
    >>> import tempfile, numpy as np
    >>> from safetensors.numpy import load_file
    >>> path = tempfile.mkdtemp() + "/t.safetensors"
    >>> write_safetensors(path, {"b": np.ones(3, np.float32), "a": lambda: np.arange(4, dtype=np.int8).reshape(2, 2)})
    >>> {k: v.tolist() for k, v in sorted(load_file(path).items())}
    {'a': [[0, 1], [2, 3]], 'b': [1.0, 1.0, 1.0]}
  """
  import numpy as np

  names = sorted(tensors)
  specs = {name: _spec(name, tensors[name], dtype) for name in names}
  header, offset = {}, 0
  for name in names:
    shape, dt = specs[name]
    size = math.prod(shape) * dt.itemsize
    header[name] = {"dtype": _SAFETENSORS_DTYPES[dt.name], "shape": list(shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  if metadata:
    header["__metadata__"] = metadata
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for name in names:
      value = tensors[name]
      array = np.ascontiguousarray(np.asarray(value() if callable(value) else value, specs[name][1]))
      f.write(array.reshape(-1).view(np.uint8).data)
      del array  # before the next one is computed


def _spec(name: str, value, dtype) -> tuple[tuple[int, ...], object]:
  """The shape and little-endian NumPy dtype ``value`` is written with (a callable's from ``jax.eval_shape``)."""
  import numpy as np

  if callable(value):
    import jax

    value = jax.eval_shape(value)
  dt = np.dtype(dtype or value.dtype).newbyteorder("<")  # the format is little-endian
  if dt.name not in _SAFETENSORS_DTYPES:
    raise ValueError(f"write_safetensors: tensor {name} has dtype {dt.name}, which safetensors cannot store; one "
                     f"of {sorted(_SAFETENSORS_DTYPES)} is expected")
  return tuple(value.shape), dt


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_SIZE = "5GB"  # transformers' default
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def shard_bytes(fn: str, max_shard_size) -> int:
  """``max_shard_size`` in bytes: a positive int, or a size as ``transformers`` writes it ("5GB" is 5 * 10**9
  bytes, "500MB", "2GiB" is 2 * 2**30).

  Raises:
    ValueError: naming ``fn`` for anything else.

  Examples:
    >>> shard_bytes("save_hf", "5GB"), shard_bytes("save_hf", "1.5KiB"), shard_bytes("save_hf", 100)
    (5000000000, 1536, 100)
  """
  if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool) and max_shard_size > 0:
    return max_shard_size
  found = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-z]+)\s*", max_shard_size.lower()) \
      if isinstance(max_shard_size, str) else None
  if found and found.group(2) in _UNITS and float(found.group(1)) * _UNITS[found.group(2)] >= 1:
    return int(float(found.group(1)) * _UNITS[found.group(2)])
  raise ValueError(f"{fn}: max_shard_size={max_shard_size!r} but a positive number of bytes or a size such as "
                   "'5GB', '500MB' or '2GiB' is expected")


def write_checkpoint(directory, tensors: dict, *, max_shard_size=MAX_SHARD_SIZE, metadata: dict | None = None,
                     dtype=None, fn: str = "write_checkpoint") -> list[str]:
  """Writes ``tensors`` (values as `write_safetensors` takes them, in the order shards are filled) into
  ``directory`` as ``transformers`` does: one ``model.safetensors`` when they fit one shard of
  ``max_shard_size`` (see `shard_bytes`), else shards ``model-00001-of-0000N.safetensors`` of at most that
  size (a tensor larger than a shard gets its own) and ``model.safetensors.index.json`` (``metadata.total_size``,
  the bytes of every tensor, and a ``weight_map`` from each tensor to its shard). Returns the files written.

  No loader ever reads a mix of two saves. One file is renamed over the old one; shards are written under
  hidden names first (a failure then leaves the old model as it was), the old ``model.safetensors`` and
  index are removed, the shards renamed into place, and the index written last. Files of an earlier save into
  ``directory`` that this one does not use (its index or single file, its shards) are removed after that.
  """
  directory = pathlib.Path(directory)
  limit = shard_bytes(fn, max_shard_size)
  sizes = {}
  for name, value in tensors.items():
    shape, dt = _spec(name, value, dtype)
    sizes[name] = math.prod(shape) * dt.itemsize
  groups: list[list[str]] = [[]]
  for name in tensors:
    if groups[-1] and sum(sizes[k] for k in groups[-1]) + sizes[name] > limit:
      groups.append([])
    groups[-1].append(name)
  if len(groups) == 1:
    atomic_write(directory / SINGLE_FILE, lambda tmp: write_safetensors(tmp, tensors, metadata, dtype))
    _remove_stale(directory, [SINGLE_FILE])
    return [SINGLE_FILE]
  files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
  temps = [temporary_name(directory / name) for name in files]
  try:
    for tmp, group in zip(temps, groups):
      write_safetensors(tmp, {k: tensors[k] for k in group}, metadata, dtype)
    for old in (SINGLE_FILE, INDEX_FILE):  # from here until the index is written no loader accepts the directory
      (directory / old).unlink(missing_ok=True)
    for tmp, name in zip(temps, files):
      os.replace(tmp, directory / name)
  finally:
    for tmp in temps:
      tmp.unlink(missing_ok=True)
  index = {"metadata": {"total_size": sum(sizes.values())},
           "weight_map": {k: name for name, group in zip(files, groups) for k in group}}
  atomic_write_text(directory / INDEX_FILE, json.dumps(index, indent=2))
  _remove_stale(directory, files + [INDEX_FILE])
  return files + [INDEX_FILE]


def _remove_stale(directory: pathlib.Path, keep: list[str]) -> None:
  """Removes the model files of an earlier save (single file, index, shards) that are not in ``keep``."""
  for path in directory.iterdir():
    if path.name not in keep and (path.name in (SINGLE_FILE, INDEX_FILE) or _SHARD.fullmatch(path.name)):
      path.unlink(missing_ok=True)


def checkpoint_entry(directory) -> pathlib.Path | None:
  """The file a loader starts from: ``model.safetensors`` if present (as ``transformers`` prefers it), else the
  shard index, else None."""
  directory = pathlib.Path(directory)
  return next((directory / name for name in (SINGLE_FILE, INDEX_FILE) if (directory / name).is_file()), None)


def read_checkpoint(fn: str, directory) -> dict[str, LazyTensor] | None:
  """Every tensor of ``directory``'s ``model.safetensors`` or of the shards its index names, as unread
  `LazyTensor` objects (see `read_safetensors`); None when it has neither.

  Raises:
    ValueError: naming ``fn`` and the file, for an index without a ``weight_map`` or a shard that is missing
      or unreadable.
  """
  entry = checkpoint_entry(directory)
  if entry is None or entry.name == SINGLE_FILE:
    return None if entry is None else read_safetensors(fn, entry)
  index = read_json(fn, entry)
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise ValueError(f"{fn}: {entry} has no weight_map object; expected a safetensors index")
  tensors = {}
  for shard in sorted(set(weight_map.values())):
    tensors.update(read_safetensors(fn, entry.parent / shard))
  return tensors


def check_finite(fn: str, name: str, path, value) -> None:
  """Refuses a floating tensor (bfloat16 included) read from ``path`` that holds NaN or Inf (overwritten bytes)."""
  import jax.numpy as jnp
  import numpy as np

  if jnp.issubdtype(value.dtype, jnp.floating) and not np.isfinite(value).all():
    raise ValueError(f"{fn}: tensor {name} in {path} has NaN or infinite values; the file is corrupt")


def _lock_alive(holder: dict) -> bool:
  """Whether the process that wrote a lock may still run: False only for a PID of this host that no longer exists
  (another host's processes cannot be checked from here, and Windows' os.kill would terminate one)."""
  pid = holder.get("pid")
  if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0 or os.name == "nt":
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _break_stale_lock(lock: pathlib.Path, seen: str) -> None:
  """Removes ``lock`` if it still holds ``seen`` (a dead process's). Renamed aside first: of two runs breaking one
  stale lock at once, the second would otherwise remove the fresh lock the first has just taken."""
  aside = lock.with_name(f"{lock.name}.{os.getpid()}.stale")
  try:
    os.replace(lock, aside)
  except FileNotFoundError:  # another run broke it first
    return
  if aside.read_text(encoding="utf-8", errors="replace") == seen:
    aside.unlink()
  else:  # a live run's fresh lock, taken since the stale one was read: put it back
    os.replace(aside, lock)


@contextlib.contextmanager
def dir_lock(fn: str, directory):
  """Holds ``directory/.tnjax.lock`` for the block, so that one run at a time writes into ``directory``.

  The lock file is created with ``O_CREAT | O_EXCL`` and records the holder's PID, host and start time; the block's
  end removes it, errors and Ctrl-C included. A lock left by a process that is gone (a PID of this host that no
  longer runs: SIGKILL, SIGTERM, a crash) is stale and taken over; a live holder's, or one written on another host
  (whose processes cannot be checked from here), refuses, saying how to clear it by hand.

  Raises:
    ValueError: naming ``fn``, the directory, the holder and the lock file, when another run holds it.

  Examples:
    >>> import tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with dir_lock("compress", d):
    ...   (d / LOCK_NAME).exists()
    True
    >>> (d / LOCK_NAME).exists()
    False
  """
  directory = pathlib.Path(directory)
  lock = directory / LOCK_NAME
  mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": fn,
                     "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
  for _ in range(3):  # again when the lock is released or broken as stale meanwhile (other runs racing for it)
    try:
      fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      try:
        seen = lock.read_text(encoding="utf-8", errors="replace")
      except FileNotFoundError:  # released meanwhile
        continue
      try:
        holder = json.loads(seen)
      except json.JSONDecodeError:
        holder = None
      if isinstance(holder, dict) and not _lock_alive(holder):
        _break_stale_lock(lock, seen)
        continue
      who = (f"pid {holder.get('pid')} on host {holder.get('host')}, tnjax {holder.get('command')} since "
             f"{holder.get('since')}") if isinstance(holder, dict) \
          else "holder unknown: the lock file is empty or unreadable"
      raise ValueError(f"{fn}: {directory} is in use by another run ({who}; lock file {lock}); wait for it to end or "
                       f"choose another directory; if that process is gone, delete {lock}") from None
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(mine)
    except BaseException:  # a full disk or Ctrl-C between create and write: an empty lock would never go stale
      lock.unlink(missing_ok=True)
      raise
    break
  else:
    raise ValueError(f"{fn}: {directory} is in use: its lock {lock} was taken by another run as this one broke a "
                     "stale one; try again")
  try:
    yield lock
  finally:
    with contextlib.suppress(OSError):
      if lock.read_text(encoding="utf-8") == mine:  # never another run's (one that broke ours as stale)
        lock.unlink()
