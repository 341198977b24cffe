"""The Hugging Face mapping of GPT-2 (``GPT2LMHeadModel``): config options, tensor names and layouts.

The interface every mapping module provides is described in `tnjax.interop.hf`;
`load_hf_gpt2` and `save_hf_gpt2` are `load_hf` and `save_hf` for GPT-2 only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tnjax.interop.hf import load_hf, save_hf
from tnjax.models.config import GPTConfig
from tnjax.models.gpt import GPT, dense_kernel

MODEL_TYPES = ("gpt2",)

# GPT-2 options we cannot honour, with the value we support.
_REFUSED = {
    "add_cross_attention": False,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "scale_attn_weights": True,
}
_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both the tanh approximation
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old checkpoints


def config_from_hf(hf: dict, fn: str = "load_hf_gpt2") -> GPTConfig:
  """A `GPTConfig` from a Hugging Face GPT-2 ``config.json`` dict; refuses what it cannot honour, by name."""
  if hf.get("model_type") != "gpt2":
    raise ValueError(f"{fn}: config model_type={hf.get('model_type')!r} but 'gpt2' is expected")
  for name, supported in _REFUSED.items():
    if name in hf and hf[name] != supported:
      raise ValueError(f"{fn}: config option {name}={hf[name]!r} is not supported (only {supported!r})")
  act = hf.get("activation_function", "gelu_new")
  if act not in _ACTIVATIONS:
    raise ValueError(f"{fn}: config option activation_function={act!r} is not supported (only {_ACTIVATIONS})")
  n_embd = hf.get("n_embd", 768)
  return GPTConfig(vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("n_positions", 1024),
                   n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), d_model=n_embd,
                   d_ff=hf.get("n_inner"), dropout=0.0, tie_embeddings=hf.get("tie_word_embeddings", True),
                   layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), init_std=hf.get("initializer_range", 0.02))


def checkpoint_tensors(tensors: dict, cfg: GPTConfig) -> dict:
  """Names without the ``transformer.`` prefix; causal-mask buffers dropped, and a tied head's copy."""
  out = {k.removeprefix("transformer."): v for k, v in tensors.items() if not k.endswith(_IGNORED_SUFFIXES)}
  if cfg.tie_embeddings:
    out.pop("lm_head.weight", None)
  return out


def targets(model: GPT) -> dict[str, tuple[nnx.Variable, str]]:
  """Checkpoint names of a dense model's parameters, where they live and how they are laid out."""
  out = {"wte.weight": (model.wte.embedding, "rows"), "wpe.weight": (model.wpe.embedding, ""),
         "ln_f.weight": (model.ln_f.scale, ""), "ln_f.bias": (model.ln_f.bias, "")}
  for i, block in enumerate(model.h):
    p = f"h.{i}."
    out.update({p + "ln_1.weight": (block.ln_1.scale, ""), p + "ln_1.bias": (block.ln_1.bias, ""),
                p + "ln_2.weight": (block.ln_2.scale, ""), p + "ln_2.bias": (block.ln_2.bias, "")})
    for name in model.config.PROJECTIONS:  # Conv1D weights are (in, out), like tnjax kernels
      layer = model.layer(f"{p}{name}")
      out[p + name + ".weight"] = (layer.kernel, "")
      out[p + name + ".bias"] = (layer.bias, "")
  if model.lm_head is not None:
    out["lm_head.weight"] = (model.lm_head.kernel, "T")
  return out


def load_hf_gpt2(path, *, dtype: str | None = None) -> GPT:
  """Loads a local Hugging Face GPT-2 directory into a dense [`GPT`][tnjax.models.GPT] (`tnjax.interop.load_hf`
  for GPT-2 only).

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` (or a
      sharded safetensors index, or ``pytorch_model.bin`` read weights-only).
    dtype: computation dtype of the model (parameters stay float32).

  Raises:
    ValueError: missing files, unsupported config options (named), missing,
      unexpected or wrongly shaped tensors (named).
  """
  return load_hf(path, dtype=dtype, fn="load_hf_gpt2", model_types=MODEL_TYPES)


def hf_config(cfg: GPTConfig) -> dict:
  """The Hugging Face ``config.json`` dict of a `GPTConfig`.

  Examples:
    >>> from tnjax.models import preset
    >>> hf = hf_config(preset("gpt2"))
    >>> hf["n_embd"], hf["n_layer"], hf["vocab_size"], config_from_hf(hf) == preset("gpt2")
    (768, 12, 50257, True)
  """
  return {
      "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
      "n_positions": cfg.block_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
      "n_inner": cfg.d_ff, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.layer_norm_eps,
      "initializer_range": cfg.init_std, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
      "attn_pdrop": cfg.dropout, "scale_attn_weights": True, "tie_word_embeddings": cfg.tie_embeddings,
      "bos_token_id": cfg.vocab_size - 1, "eos_token_id": cfg.vocab_size - 1,
  }


def _pad_axis(x, axis: int, groups: int, width: int) -> jax.Array:
  """Zero-pads each of ``groups`` equal chunks of ``axis`` to ``width`` entries (``x`` itself when they are)."""
  if x.shape[axis] == groups * width:
    return x
  shape = x.shape[:axis] + (groups, x.shape[axis] // groups) + x.shape[axis + 1:]
  pad = [(0, 0)] * len(shape)
  pad[axis + 1] = (0, width - shape[axis + 1])
  return jnp.pad(x.reshape(shape), pad).reshape(x.shape[:axis] + (groups * width,) + x.shape[axis + 1:])


def _full_width(cfg: GPTConfig, index: int, name: str, x, axis: int) -> jax.Array:
  """A kernel (``axis`` 0: its input side, 1: its output side) or bias (``axis`` 0, output side) of projection
  ``name`` in block ``index``, at GPT-2's widths.

  Blocks narrowed by MoDeGPT (``cfg.dims``) are zero-padded back: zero query
  and key columns leave q.k unchanged, zero value columns and MLP neurons
  (gelu(0) = 0) meet zero rows of the output projections, so the padded
  model computes the same function.
  """
  h, hd = cfg.n_head, cfg.head_dim
  out_side = axis == x.ndim - 1
  if name == "attn.c_attn" and out_side:
    _, qk, v = cfg.block_dims(index)
    if qk == v == hd:
      return x
    parts = jnp.split(x, [h * qk, 2 * h * qk], axis=axis)
    return jnp.concatenate([_pad_axis(part, axis, h, hd) for part in parts], axis=axis)
  if name == "mlp.c_fc" and out_side:
    return _pad_axis(x, axis, 1, cfg.ff_dim)
  if name == "attn.c_proj" and not out_side:
    return _pad_axis(x, axis, h, hd)
  if name == "mlp.c_proj" and not out_side:
    return _pad_axis(x, axis, 1, cfg.ff_dim)
  return x  # an output projection's output side (its bias), already full width


def _full_kernel(cfg: GPTConfig, index: int, layer, name: str) -> jax.Array:
  w = dense_kernel(layer)
  return _full_width(cfg, index, name, _full_width(cfg, index, name, w, 1), 0)


def hf_tensors(model: GPT) -> dict[str, Callable[[], jax.Array]]:
  """Checkpoint tensors of any GPT, each as a zero-argument function that computes it (dense reconstructions,
  narrowed blocks padded back to full width): a writer computes one at a time."""
  cfg = model.config
  value = lambda variable: variable.get_value  # noqa: E731
  # muP's output multiplier scales only the head's input: fold it into the final norm
  tensors = {"transformer.wte.weight": lambda: model.embedding_table,
             "transformer.wpe.weight": value(model.wpe.embedding),
             "transformer.ln_f.weight": lambda: model.ln_f.scale[...] * cfg.output_multiplier,
             "transformer.ln_f.bias": lambda: model.ln_f.bias[...] * cfg.output_multiplier}
  for i, block in enumerate(model.h):
    p = f"transformer.h.{i}."
    for name, ln in (("ln_1", block.ln_1), ("ln_2", block.ln_2)):
      tensors[p + name + ".weight"], tensors[p + name + ".bias"] = value(ln.scale), value(ln.bias)
    for name in cfg.PROJECTIONS:
      layer = model.layer(f"h.{i}.{name}")
      tensors[p + name + ".weight"] = functools.partial(_full_kernel, cfg, i, layer, name)
      tensors[p + name + ".bias"] = lambda i=i, layer=layer, name=name: _full_width(cfg, i, name, layer.bias[...], 0)
  if model.lm_head is not None:
    tensors["lm_head.weight"] = lambda: dense_kernel(model.lm_head).T
  return tensors


def save_hf_gpt2(model: GPT, path):
  """Writes ``model`` as a Hugging Face GPT-2 directory that ``GPT2LMHeadModel.from_pretrained`` loads.

  Tensorized projections and embeddings are written as their dense
  reconstruction (Hugging Face has no TT layers), int8 weights dequantized,
  and blocks narrowed by MoDeGPT zero-padded to full width (same function);
  use [`save_model`][tnjax.interop.save_model] to keep the compact form.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny", layers={"mlp.c_fc": {"kind": "ttm", "rank": 8}}), rngs=nnx.Rngs(0))
    >>> path = save_hf_gpt2(model, tempfile.mkdtemp())
    >>> dense = load_hf_gpt2(path)  # the TT layer comes back as its dense reconstruction
    >>> bool(jnp.allclose(dense(jnp.ones((1, 4), jnp.int32)), model(jnp.ones((1, 4), jnp.int32)), atol=1e-4))
    True
  """
  return save_hf(model, path)
