"""Hugging Face checkpoints (config.json + safetensors) in and out, for every model family.

`load_hf` reads a local directory (``model.safetensors``, a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin`` read weights-only)
and `save_hf` writes one that ``transformers`` loads. What a family's
checkpoints look like lives in one mapping module per family (named by its
[`ModelFamily`][tnjax.models.family.ModelFamily]'s ``hf_mapping``:
`tnjax.interop.hf_gpt2`, `tnjax.interop.hf_llama`), which provides:

* ``MODEL_TYPES``: the ``model_type`` values it reads;
* ``config_from_hf(hf, fn)``: the tnjax config, refusing unsupported options by name;
* ``hf_config(cfg)``: the ``config.json`` dict;
* ``checkpoint_tensors(tensors, cfg)``: the checkpoint's tensors under the names ``targets`` uses (prefixes
  stripped, buffers and a tied head dropped);
* ``targets(model)``: ``{name: (variable, layout)}`` for a dense model, layout "" (as stored), "T" (stored
  transposed, (out, in)) or "rows" (an embedding table that tnjax pads with rows);
* ``hf_tensors(model)``: ``{checkpoint name: function}`` of any model, each a zero-argument JAX function
  computing one tensor (tensorized layers written dense, narrowed blocks zero-padded to full width), in the
  order shards are filled: `save_hf` computes, writes and drops them one at a time.

Loading reads tensors with ``safetensors.numpy`` (no PyTorch needed).
``pytorch_model.bin`` is read only through ``torch.load(weights_only=True)``,
which refuses pickled code; it needs torch installed.
"""

from __future__ import annotations

import importlib
import json
import pathlib
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tnjax._io import MAX_SHARD_SIZE, atomic_write_text, read_checkpoint, read_json, write_checkpoint
from tnjax.interop.native import check_fits, check_param_dtype, compute_dtype, with_concrete_state
from tnjax.models.decoder import Decoder
from tnjax.models.family import FAMILIES, build, family


def mapping_of(model_or_config) -> ModuleType:
  """The Hugging Face mapping module of a model's (or config's) family."""
  return importlib.import_module(family(model_or_config).hf_mapping)


def mapping_for(fn: str, model_type, allowed: tuple[str, ...] | None = None) -> ModuleType:
  """The mapping module that reads checkpoints of ``model_type`` (restricted to ``allowed`` when given)."""
  mappings = {t: m for f in FAMILIES.values() for m in [importlib.import_module(f.hf_mapping)] for t in m.MODEL_TYPES}
  known = allowed or tuple(sorted(mappings))
  if model_type not in known:
    expected = repr(known[0]) if len(known) == 1 else f"one of {list(known)}"
    raise ValueError(f"{fn}: config model_type={model_type!r} but {expected} is expected")
  return mappings[model_type]


def read_tensors(fn: str, path: pathlib.Path) -> dict:
  """Every tensor of a Hugging Face directory: one safetensors file or shards (as unread
  `tnjax._io.LazyTensor` objects), or ``pytorch_model.bin`` (read whole, as NumPy arrays)."""
  tensors = read_checkpoint(fn, path)
  if tensors is not None:
    return tensors
  binary = path / "pytorch_model.bin"
  if binary.exists():
    try:
      import torch
    except ImportError as e:
      raise ValueError(f"{fn}: {path} has only pytorch_model.bin, which needs torch to read; install torch or "
                       "convert the checkpoint to model.safetensors") from e
    state = torch.load(str(binary), map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}
  raise ValueError(f"{fn}: {path} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _assign(fn: str, name: str, variable: nnx.Variable, value, layout: str, rows: int, dtype) -> None:
  """Checks a checkpoint tensor's shape (as stored, before reading it) against the variable it fills, then reads
  it and fills the variable in ``dtype``."""
  expected = tuple(variable.shape)
  if layout == "T":
    expected = expected[::-1]
  elif layout == "rows":
    expected = (rows,) + expected[1:]
  if tuple(value.shape) != expected:
    raise ValueError(f"{fn}: tensor {name} has shape {tuple(value.shape)} but {expected} is expected")
  value = np.asarray(value)
  if layout == "T":
    value = value.T
  elif layout == "rows" and variable.shape[0] > rows:  # tnjax pads the table; the rows past the vocabulary stay 0
    value = np.pad(value, ((0, variable.shape[0] - rows), (0, 0)))
  variable.set_value(jnp.asarray(value, dtype))


def load_hf(path, *, dtype: str | None = None, param_dtype: str | None = None, fn: str = "load_hf",
            model_types: tuple[str, ...] | None = None) -> Decoder:
  """Loads a local Hugging Face directory (GPT-2, Llama, Qwen2) into a dense tnjax model of its family.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` (or a
      sharded safetensors index, or ``pytorch_model.bin`` read weights-only).
    dtype: computation dtype of the model.
    param_dtype: dtype the parameters are stored in (default float32); "bfloat16" keeps a bf16
      checkpoint's size in memory (half of float32's), for evaluation and compression at 1-8B sizes. The
      computation stays float32 unless ``dtype`` is given (each product upcasts its operands).
    fn: the name errors start with.
    model_types: the ``model_type`` values accepted (default: every family's).

  Raises:
    ValueError: missing files, an unsupported ``model_type`` or config option
      (named), missing, unexpected or wrongly shaped tensors (named), parameters that would not fit in
      memory (`tnjax.interop.native.check_fits`: the size from config.json, the option that helps), all
      before any weight is read; an unknown ``param_dtype``; a tensor with NaN or infinite values.

  Tensors are read one at a time into a model that was never initialized (no random init, no second copy).

  Examples:
    >>> import tempfile
    >>> from flax import nnx
    >>> from tnjax.models import Llama, preset
    >>> model = Llama(preset("llama-tiny"), rngs=nnx.Rngs(0))
    >>> again = load_hf(save_hf(model, tempfile.mkdtemp()))
    >>> ids = jnp.ones((1, 4), jnp.int32)
    >>> type(again).__name__, bool(jnp.allclose(again(ids), model(ids), atol=1e-5))
    ('Llama', True)
  """
  path = pathlib.Path(path)
  check_param_dtype(fn, param_dtype)
  if not (path / "config.json").exists():
    raise ValueError(f"{fn}: {path / 'config.json'} does not exist; expected a Hugging Face model directory")
  hf = read_json(fn, path / "config.json")
  if not isinstance(hf, dict):
    raise ValueError(f"{fn}: {path / 'config.json'} holds {type(hf).__name__} but a JSON object is expected")
  mapping = mapping_for(fn, hf.get("model_type"), model_types)
  try:
    cfg = mapping.config_from_hf(hf, fn).replace(dtype=compute_dtype(dtype, param_dtype))
  except (KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"{fn}: {path / 'config.json'} is not a {hf.get('model_type')} config "
                     f"({type(e).__name__}: {e})") from e
  except ValueError as e:  # an option refused, or a field of the wrong type or range: name the file too
    raise ValueError(f"{e} (in {path / 'config.json'})") from e
  model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))  # no parameter allocated or initialized yet
  targets = mapping.targets(model)
  # from the config alone, before any file is opened (pytorch_model.bin is read whole)
  check_fits(fn, [(variable.shape, param_dtype or variable.dtype) for variable, _ in targets.values()])
  tensors = mapping.checkpoint_tensors(read_tensors(fn, path), cfg)
  missing = sorted(set(targets) - set(tensors))
  unexpected = sorted(set(tensors) - set(targets))
  if missing or unexpected:
    raise ValueError(f"{fn}: checkpoint tensors missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                     f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
  for name, (variable, layout) in targets.items():
    _assign(fn, name, variable, tensors[name], layout, cfg.vocab_size, param_dtype or variable.dtype)
  return with_concrete_state(model)


SAVE_DTYPES = ("float32", "bfloat16", "float16")


def save_hf(model: Decoder, path, *, max_shard_size: int | str = MAX_SHARD_SIZE,
            dtype: str | None = "float32") -> pathlib.Path:
  """Writes ``model`` as a Hugging Face directory that ``transformers`` loads (``GPT2LMHeadModel``,
  ``LlamaForCausalLM`` or ``Qwen2ForCausalLM``), its tensors in ``dtype``.

  Tensorized projections and embeddings are written as their dense
  reconstruction (Hugging Face has no TT layers), int8 weights dequantized,
  and blocks narrowed by MoDeGPT zero-padded to full width (same function);
  use [`save_model`][tnjax.interop.save_model] to keep the compact form.

  Each dense tensor is computed, moved to the host, written and dropped before the next, so saving takes
  about one tensor of memory beside the model (a compressed 8B model is never held dense). A model larger
  than ``max_shard_size`` is written as shards with an index, as ``transformers`` writes it (see
  `tnjax._io.write_checkpoint`); a smaller one as one ``model.safetensors``. Files of an earlier save into
  ``path`` are replaced, never mixed with this one's.

  Args:
    model: any model of a family with a Hugging Face mapping.
    path: the directory (created if needed).
    max_shard_size: the largest shard, in bytes or as "5GB", "500MB", "2GiB" (default "5GB", as
      ``transformers``).
    dtype: "float32" (the default), "bfloat16" or "float16" (half the bytes: 16 GB rather than 32 for an 8B
      model), or None for the dtype the model's parameters are stored in (float32 when they mix dtypes).
      config.json records it (``torch_dtype``), so ``transformers`` loads the model in it.

  Raises:
    ValueError: for a configuration the Hugging Face class cannot express (named), a bad ``max_shard_size``
      or ``dtype``.
  """
  fn = "save_hf"
  if dtype is not None and dtype not in SAVE_DTYPES:
    raise ValueError(f"{fn}: dtype={dtype!r} but one of {SAVE_DTYPES} or None (the parameters' own) is expected")
  if dtype is None:
    stored = {str(jnp.dtype(leaf.dtype)) for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
              if jnp.issubdtype(leaf.dtype, jnp.floating)}
    only = stored.pop() if len(stored) == 1 else None
    dtype = only if only in SAVE_DTYPES else "float32"
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  mapping = mapping_of(model)
  config = {**mapping.hf_config(model.config), "torch_dtype": dtype}
  write_checkpoint(path, mapping.hf_tensors(model), max_shard_size=max_shard_size, metadata={"format": "pt"},
                   dtype=jnp.dtype(dtype), fn=fn)
  atomic_write_text(path / "config.json", json.dumps(config, indent=2))
  return path
