"""tnjax's own model format: the config as JSON and every parameter (TT cores included) in safetensors.

A compressed model stays small on disk: cores are stored as cores. Core
shapes are read from the file, so ranks chosen by a tolerance (which differ
per layer) load back exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import tnjax
from tnjax._io import (
    INDEX_FILE,
    MAX_SHARD_SIZE,
    SINGLE_FILE,
    atomic_write,
    atomic_write_text,
    checkpoint_entry,
    read_checkpoint,
    read_json,
    write_checkpoint,
)
from tnjax.models.decoder import Decoder
from tnjax.models.family import FAMILIES, build, config_from_dict
from tnjax.nn import TTParam

FORMAT = "tnjax-gpt"  # the marker of every family's files (the name predates other families)


def _key(path) -> str:
  return ".".join(str(p) for p in path)


def save_model(model: Decoder, path, *, max_shard_size: int | str = MAX_SHARD_SIZE, tokenizer=None) -> pathlib.Path:
  """Writes ``config.json`` (format marker, tnjax version, model family, config) and the parameters: one
  ``model.safetensors``, or above ``max_shard_size`` shards with an index as `tnjax.interop.save_hf` writes
  them. With a ``tokenizer``, also ``tokenizer.json``, and config.json records its fingerprint
  (`tnjax.data.tokenizer_fingerprint`), which ``tnjax`` commands check against the tokenizer they read.

  Each parameter goes to the host only as it is written. Files of an earlier save into ``path`` are replaced,
  never mixed with this one's (see `tnjax._io.write_checkpoint`).

  Args:
    model: any tnjax model.
    path: the directory (created if needed).
    max_shard_size: the largest shard, in bytes or as "5GB", "500MB", "2GiB" (default "5GB").
    tokenizer: a `tokenizers.Tokenizer` to save beside the model (optional).

  Raises:
    ValueError: for a bad ``max_shard_size``.

  Examples:
    >>> import tempfile
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny", layers={"mlp.c_fc": {"kind": "ttm", "rank": 4}}), rngs=nnx.Rngs(0))
    >>> path = save_model(model, tempfile.mkdtemp())
    >>> is_native(path), load_model(path).num_params == model.num_params
    (True, True)
  """
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  write_checkpoint(path, model_tensors(model), max_shard_size=max_shard_size, fn="save_model")
  meta = {"format": FORMAT, "tnjax_version": tnjax.__version__, "family": model.config.FAMILY,
          "config": model.config.to_dict()}
  if tokenizer is not None:
    from tnjax.data.tokenizer import tokenizer_fingerprint  # tokenizers is imported only by what uses one

    atomic_write(path / "tokenizer.json", tokenizer.save)
    meta["tokenizer"] = {"fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": tokenizer.get_vocab_size()}
  atomic_write_text(path / "config.json", json.dumps(meta, indent=2))  # last: the directory is complete
  return path


def saved_tokenizer(path) -> dict | None:
  """``{"fingerprint", "vocab_size"}`` of the tokenizer a `save_model` directory was written with, or None (a
  Hugging Face directory, or one written before models recorded their tokenizer)."""
  if not is_native(path):
    return None
  recorded = json.loads((pathlib.Path(path) / "config.json").read_text(encoding="utf-8")).get("tokenizer")
  return recorded if isinstance(recorded, dict) else None


def is_native(path) -> bool:
  """Whether ``path`` holds a model written by `save_model` (its config.json says so)."""
  cfg = pathlib.Path(path) / "config.json"
  if not cfg.is_file():
    return False
  try:
    meta = json.loads(cfg.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError):
    return False  # load_model or load_hf_gpt2 then names the file
  return isinstance(meta, dict) and meta.get("format") == FORMAT


def load_model(path, *, param_dtype: str | None = None) -> Decoder:
  """Loads a directory written by `save_model` (one file or shards, each tensor read as it is placed);
  ``param_dtype`` as in `tnjax.interop.load_hf` (floating parameters are cast to it; int8 weights stay int8).

  Raises:
    ValueError: missing files, a directory of another format, or parameters
      missing, unexpected or (other than TT cores) of the wrong shape, by name; an unknown ``param_dtype``;
      parameters that would not fit in memory (`check_fits`), before any tensor is read.
  """
  fn = "load_model"
  path = pathlib.Path(path)
  check_param_dtype(fn, param_dtype)
  if not (path / "config.json").exists():
    raise ValueError(f"{fn}: {path / 'config.json'} does not exist; expected a directory written by save_model")
  entry = checkpoint_entry(path)
  if entry is None:
    raise ValueError(f"{fn}: {path / SINGLE_FILE} does not exist (nor {INDEX_FILE}); expected a directory written "
                     "by save_model")
  meta = read_json(fn, path / "config.json")
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    got = meta.get("format") if isinstance(meta, dict) else meta
    raise ValueError(f"{fn}: {path / 'config.json'} has format={got!r} but {FORMAT!r} is expected "
                     "(for a Hugging Face directory use load_hf)")
  name = meta.get("family", "gpt2")  # files written before model families existed are GPT-2's
  kind = FAMILIES[name].config.__name__.removesuffix("Config") if name in FAMILIES else repr(name)
  try:
    cfg = config_from_dict(meta["config"], name)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{fn}: {path / 'config.json'} has no valid {kind} config ({type(e).__name__}: {e})") from e
  tensors = read_checkpoint(fn, path)  # headers only: each tensor is read as it is placed
  try:
    return model_from_tensors(cfg.replace(dtype=compute_dtype(cfg.dtype, param_dtype)), tensors, fn=fn,
                              param_dtype=param_dtype, check_memory=True)
  except ValueError as e:
    raise ValueError(f"{e} (in {entry})") from e


def model_tensors(module: nnx.Module) -> dict[str, jax.Array]:
  """Every parameter of a module (a model or one layer) by dotted name, as `save_model` stores them."""
  return {_key(p): v[...] for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def model_from_tensors(cfg, tensors: dict, *, fn: str = "model_from_tensors", param_dtype: str | None = None,
                       check_memory: bool = False) -> Decoder:
  """A model of config ``cfg`` (any family) holding ``tensors`` (names as `model_tensors` gives them).

  Every tensor's shape and kind of dtype (floating, integer) are checked against the model the config builds
  (its abstract form, ``nnx.eval_shape``), before any tensor is read. TT cores are checked too: against the
  per-bond ``ranks`` the layer's spec records (what compression writes), or, in files written before specs
  recorded ranks (and trained TT-matrix models, whose spec gives one ``rank``), against the model built with
  the bond ranks of the file's own cores, so that cores whose ranks do not chain, or whose mode sizes are not
  the layer's, are refused by name.

  With ``check_memory`` (loading a file), the model is first refused by `check_fits` when its parameters
  would not fit (shapes and dtypes from the config and the tensors' headers; nothing is read).

  Raises:
    ValueError: parameters missing, unexpected, or of the wrong shape or dtype (float parameters stored as
      integers), by name, with the shape and dtype found and expected; with ``check_memory``, a model too large
      for the memory available.
  """
  model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  flat = nnx.to_flat_state(params)

  def exact(p, variable):  # whether the config sets the shape (TT cores of specs without ranks take the file's)
    return not isinstance(variable, TTParam) or cfg.spec_of(_layer_name(p)).ranks is not None

  if check_memory:
    check_fits(fn, [(variable.shape, variable.dtype) if _key(p) not in tensors else
                    (variable.shape if exact(p, variable) else tensors[_key(p)].shape,
                     _placed_dtype(tensors[_key(p)].dtype, param_dtype) or tensors[_key(p)].dtype)
                   for p, variable in flat])
  names = {_key(p) for p, _ in flat}
  missing, unexpected = sorted(names - set(tensors)), sorted(set(tensors) - names)
  if missing or unexpected:
    raise ValueError(f"{fn}: parameters missing {missing[:8]}, unexpected {unexpected[:8]}")
  expected = {_key(p): v for p, v in _with_file_ranks(cfg, flat, tensors)}
  for p, variable in flat:
    name, value = _key(p), tensors[_key(p)]
    want = expected[name]
    if tuple(value.shape) != tuple(want.shape):
      chain = ("; a TT core's first and last axes are the ranks it shares with its neighbours, its middle ones the "
               "layer's mode sizes") if isinstance(variable, TTParam) else ""
      raise ValueError(f"{fn}: parameter {name} has shape {tuple(value.shape)} but {tuple(want.shape)} is "
                       f"expected{chain}")
    if _dtype_kind(value.dtype) != _dtype_kind(want.dtype):
      raise ValueError(f"{fn}: parameter {name} has dtype {value.dtype} but a {_dtype_kind(want.dtype)} dtype "
                       f"({want.dtype}) is expected")
    variable.set_value(jnp.asarray(value, _placed_dtype(value.dtype, param_dtype)))
  return with_concrete_state(nnx.merge(graphdef, nnx.from_flat_state(flat), rest))


def _placed_dtype(stored, param_dtype):
  """The dtype a stored tensor is converted to: ``param_dtype`` for a floating one when given, else None (its
  own)."""
  return param_dtype if param_dtype and jnp.issubdtype(stored, jnp.floating) else None


def _dtype_kind(dtype) -> str:
  """"floating" (bfloat16 included), "integer" or the dtype's name: what a stored parameter must agree in."""
  if jnp.issubdtype(dtype, jnp.floating):
    return "floating"
  return "integer" if jnp.issubdtype(dtype, jnp.integer) else str(dtype)


def _with_file_ranks(cfg, flat, tensors):
  """The abstract parameters ``(path, variable)`` a file is checked against: ``flat`` (the model of ``cfg``), or,
  when TT layers (kind "ttm" or "mps") record no per-bond ranks, those of the model whose specs record the ranks
  of the file's cores (core k's last axis is bond k), built abstractly once more."""
  cores: dict[str, dict[int, tuple]] = {}
  for p, variable in flat:
    parts = [str(q) for q in p]
    if isinstance(variable, TTParam) and "cores" in parts:
      cores.setdefault(_layer_name(p), {})[int(parts[parts.index("cores") + 1])] = tuple(tensors[_key(p)].shape)
  specs = {}
  for name, shapes in cores.items():
    spec = cfg.spec_of(name)
    bonds = tuple(shapes[k][-1] if shapes[k] else 0 for k in range(len(shapes) - 1))
    if spec.kind in ("ttm", "mps") and spec.ranks is None and bonds and min(bonds) >= 1:
      specs[name] = dataclasses.replace(spec, ranks=bonds)
  if not specs:
    return flat
  try:
    model = nnx.eval_shape(lambda: build(cfg.replace(layers={**cfg.layers, **specs}), rngs=nnx.Rngs(0)))
  except ValueError:  # ranks that build no model: each core is then compared with the config's own
    return flat
  return nnx.to_flat_state(nnx.split(model, nnx.Param, ...)[1])


PARAM_DTYPES = ("float32", "bfloat16", "float16")


def check_param_dtype(fn: str, param_dtype) -> None:
  if param_dtype is not None and param_dtype not in PARAM_DTYPES:
    raise ValueError(f"{fn}: param_dtype={param_dtype!r} but one of {PARAM_DTYPES} is expected")


MEMORY_MARGIN = 0.1  # of the memory available, kept for the runtime, the tensor being read and the first activations


def available_memory() -> list[tuple[str, int, str]]:
  """Where a loaded model's parameters go, as (what, bytes available, where that number comes from): the host's
  ``MemAvailable`` (``/proc/meminfo``; skipped on other OSes) when JAX's default device is the CPU, and the
  device's ``bytes_limit`` less its ``bytes_in_use`` when it reports them (``memory_stats()``: GPUs). A GPU
  host is not counted: the parameters are read one tensor at a time into device memory."""
  device = jax.devices()[0]
  out = []
  meminfo = pathlib.Path("/proc/meminfo")
  if device.platform == "cpu" and meminfo.is_file():
    for line in meminfo.read_text().splitlines():
      if line.startswith("MemAvailable:"):
        out.append(("host", int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"))
  stats = device.memory_stats() or {}
  if "bytes_limit" in stats:
    out.append((f"device {device.device_kind}", stats["bytes_limit"] - stats.get("bytes_in_use", 0),
                "its memory_stats bytes_limit less bytes_in_use"))
  return out


def _size(n: float) -> str:
  """Bytes as people read them (decimal units).

  Examples:
    >>> _size(3.2e9), _size(27.5e12), _size(512)
    ('3.2 GB', '27.5 TB', '512 B')
  """
  unit = next((u for u, k in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)) if n >= k), "B")
  return f"{n:.0f} B" if unit == "B" else f"{n / dict(TB=1e12, GB=1e9, MB=1e6, KB=1e3)[unit]:.1f} {unit}"


def check_fits(fn: str, params) -> None:
  """Refuses, before any tensor is read, a model whose parameters (``params``: (shape, dtype) pairs as they will
  be placed) take more than ``1 - MEMORY_MARGIN`` of the memory `available_memory` reports; the message names
  the size, what is available and, for float32 parameters that would fit in bfloat16, that option.

  Raises:
    ValueError: naming ``fn``, the bytes needed, the memory and the bytes available.
  """
  need, float32 = 0, 0
  for shape, dtype in params:
    n = math.prod(shape) * np.dtype(dtype).itemsize
    need += n
    float32 += n if np.dtype(dtype) == np.float32 else 0
  for where, available, source in available_memory():
    usable = (1 - MEMORY_MARGIN) * available
    if need <= usable:
      continue
    if float32 and need - float32 / 2 <= usable:
      hint = (f'pass param_dtype="bfloat16" (--param-dtype bfloat16): it stores the float32 parameters in half '
              f"the bytes ({_size(need - float32 / 2)} in all)")
    else:
      bf16 = f" (still {_size(need - float32 / 2)} in bfloat16)" if float32 else ""
      hint = f"use a machine with more memory or a smaller model{bf16}"
    raise ValueError(f"{fn}: the parameters need {_size(need)} but the {where} has {_size(available)} available "
                     f"({source}; at most {1 - MEMORY_MARGIN:.0%} of it may hold parameters); {hint}")


def compute_dtype(dtype, param_dtype):
  """The computation dtype of a model loaded with ``param_dtype``: ``dtype`` if set, else float32 when the
  parameters are stored in another dtype (a CPU has no fast bf16 matmul: a bf16 calibration of a 0.5B model
  took over twice as long; the numbers stay the float32 model's), else None (the parameters' own)."""
  return dtype or ("float32" if param_dtype else None)


def with_concrete_state(model: nnx.Module) -> nnx.Module:
  """``model`` built by ``nnx.eval_shape`` and given its parameters, with the non-parameter state no file holds
  (dropout RNG keys and counters, still abstract) made concrete."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return nnx.merge(graphdef, params, jax.tree_util.tree_map(_concrete, rest))


def _layer_name(path) -> str:
  """The layer name ("h.0.mlp.c_fc", "embedding", "lm_head") of a TT core's parameter path."""
  parts = [str(q) for q in path]
  name = ".".join(parts[: parts.index("cores") if "cores" in parts else parts.index("scales")])
  return "embedding" if name == "wte" else name


def _concrete(leaf):
  if not isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return jax.random.split(jax.random.key(0), leaf.shape) if leaf.shape else jax.random.key(0)
  return jnp.zeros(leaf.shape, leaf.dtype)
