"""The Hugging Face mapping of Llama-style models (``LlamaForCausalLM``, ``Qwen2ForCausalLM``).

The interface every mapping module provides is described in `tnjax.interop.hf`.
Hugging Face stores ``nn.Linear`` weights as (out, in): every projection is
transposed on the way in and out. Rotary settings come from
``rope_parameters`` (transformers >= 5) or ``rope_theta`` / ``rope_scaling``
(older files).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tnjax.models.decoder import dense_kernel
from tnjax.models.llama import Llama, LlamaConfig, check_rope_scaling, rope_type

MODEL_TYPES = ("llama", "qwen2")
# Options whose other values change the function; each is refused by name unless it has the value given.
_REFUSED = {"hidden_act": "silu", "mlp_bias": False, "use_sliding_window": False, "partial_rotary_factor": 1.0}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer of old checkpoints, recomputed from the config


def _rope(hf: dict, fn: str) -> tuple[float, dict | None]:
  """(rope_theta, rope_scaling) from either config layout; refuses per-layer-type rotary settings."""
  params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if not isinstance(params, dict) or (params and not {"rope_type", "type", "rope_theta"} & set(params)):
    raise ValueError(f"{fn}: config option rope_parameters={params!r} (per layer type) is not supported; one "
                     "rotary setting for every layer is expected")
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  if "partial_rotary_factor" in params and params["partial_rotary_factor"] != 1.0:
    raise ValueError(f"{fn}: config option partial_rotary_factor={params['partial_rotary_factor']!r} is not "
                     "supported (only 1.0)")
  kind = rope_type(params)
  if kind == "default":
    return theta, None
  scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type", "partial_rotary_factor")}
  scaling["rope_type"] = kind
  if kind == "llama3":
    scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
  check_rope_scaling(fn, scaling)
  return theta, scaling


def config_from_hf(hf: dict, fn: str = "load_hf") -> LlamaConfig:
  """A `LlamaConfig` from a Hugging Face Llama or Qwen2 ``config.json`` dict; refuses what it cannot honour, by
  name: other activations, MLP biases, sliding-window attention, partial or per-layer rotary embeddings, rope
  scaling types other than linear and llama3, and a ``head_dim`` other than ``hidden_size / heads``.

  Examples:
    >>> from tnjax.models import preset
    >>> hf = hf_config(preset("smollm-135m"))
    >>> hf["num_key_value_heads"], hf["tie_word_embeddings"], config_from_hf(hf) == preset("smollm-135m")
    (3, True, True)
  """
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"{fn}: config model_type={model_type!r} but one of {list(MODEL_TYPES)} is expected")
  for name, supported in _REFUSED.items():
    if hf.get(name) is not None and hf[name] != supported:
      raise ValueError(f"{fn}: config option {name}={hf[name]!r} is not supported (only {supported!r})")
  layer_types = hf.get("layer_types") or []
  if any(t != "full_attention" for t in layer_types):
    raise ValueError(f"{fn}: config option layer_types={sorted(set(layer_types))} is not supported (only "
                     "'full_attention')")
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  if not isinstance(d, int) or not isinstance(heads, int) or heads < 1 or d % heads:
    raise ValueError(f"{fn}: config hidden_size={d!r} but it must be divisible by num_attention_heads={heads!r}")
  head_dim = hf.get("head_dim")
  if head_dim is not None and head_dim != d // heads:
    raise ValueError(f"{fn}: config option head_dim={head_dim!r} is not supported (only hidden_size / "
                     f"num_attention_heads = {d // heads})")
  theta, scaling = _rope(hf, fn)
  qwen = model_type == "qwen2"
  bias = bool(hf.get("attention_bias", False))
  return LlamaConfig(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
                     n_layer=hf["num_hidden_layers"], n_head=heads, n_kv_head=hf.get("num_key_value_heads"),
                     d_model=d, d_ff=hf["intermediate_size"], tie_embeddings=bool(hf.get("tie_word_embeddings")),
                     rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
                     attention_bias=qwen or bias, output_bias=not qwen and bias,
                     init_std=hf.get("initializer_range", 0.02))


def hf_config(cfg: LlamaConfig) -> dict:
  """The Hugging Face ``config.json`` dict: ``qwen2`` when the model has q/k/v biases and no output bias, else
  ``llama``.

  Raises:
    ValueError: for an output bias without q/k/v biases (neither class has it).
  """
  if cfg.output_bias and not cfg.attention_bias:
    raise ValueError("save_hf: output_bias=True with attention_bias=False but Hugging Face Llama and Qwen2 have "
                     "no such layout; expected both or neither (Llama) or q/k/v biases only (Qwen2)")
  qwen = cfg.attention_bias and not cfg.output_bias
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling:
    rope = {**cfg.rope_scaling, "rope_type": rope_type(cfg.rope_scaling), "rope_theta": cfg.rope_theta}
  out = {
      "model_type": "qwen2" if qwen else "llama",
      "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"], "vocab_size": cfg.vocab_size,
      "max_position_embeddings": cfg.block_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ff_dim,
      "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
      "rope_parameters": rope, "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
      "initializer_range": cfg.init_std, "attention_dropout": cfg.dropout,
  }
  if qwen:
    out.update(use_sliding_window=False, layer_types=["full_attention"] * cfg.n_layer)
  else:
    out.update(attention_bias=cfg.attention_bias, mlp_bias=False)
  if cfg.rope_scaling:
    out["rope_scaling"] = rope
  return out


_PROJECTIONS = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
                "attn.v_proj": "self_attn.v_proj", "attn.o_proj": "self_attn.o_proj",
                "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj", "mlp.down_proj": "mlp.down_proj"}
_NORMS = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm"}


def checkpoint_tensors(tensors: dict, cfg: LlamaConfig) -> dict:
  """The checkpoint's tensors without rotary buffers and a tied head's copy."""
  out = {k: v for k, v in tensors.items() if not k.endswith(_IGNORED_SUFFIXES)}
  if cfg.tie_embeddings:
    out.pop("lm_head.weight", None)
  return out


def targets(model: Llama) -> dict[str, tuple[nnx.Variable, str]]:
  """Checkpoint names of a dense model's parameters, where they live and how they are laid out."""
  out = {"model.embed_tokens.weight": (model.wte.embedding, "rows"), "model.norm.weight": (model.ln_f.scale, "")}
  for i, block in enumerate(model.h):
    p = f"model.layers.{i}."
    out.update({p + hf + ".weight": (getattr(block, ours).scale, "") for ours, hf in _NORMS.items()})
    for ours, hf in _PROJECTIONS.items():
      layer = model.layer(f"h.{i}.{ours}")
      out[p + hf + ".weight"] = (layer.kernel, "T")
      if layer.bias is not None:
        out[p + hf + ".bias"] = (layer.bias, "")
  if model.lm_head is not None:
    out["lm_head.weight"] = (model.lm_head.kernel, "T")
  return out


def _scatter(x, axis: int, groups: int, width: int, keep) -> jax.Array:
  """Places each of ``groups`` equal chunks of ``axis`` at columns ``keep`` of a zero chunk of ``width`` (``x``
  itself when every column is kept)."""
  if len(keep) == width:  # kept columns are sorted and distinct: all of them, in place
    return x
  x = jnp.moveaxis(x, axis, -1)
  chunks = x.reshape(x.shape[:-1] + (groups, -1))
  out = jnp.zeros(chunks.shape[:-1] + (width,), x.dtype).at[..., np.asarray(keep)].set(chunks)
  return jnp.moveaxis(out.reshape(x.shape[:-1] + (groups * width,)), -1, axis)


def _widening(cfg: LlamaConfig, index: int, name: str) -> tuple[int, int, int, np.ndarray]:
  """How projection ``name`` of block ``index`` goes back to full width: (kernel axis, groups, width, columns
  kept in each group).

  Blocks narrowed by MoDeGPT are zero-padded back: the kept rotary pairs go
  back to their frequencies' columns (zero pairs add nothing to q.k), zero
  value columns meet zero rows of o_proj, and zero gate/up neurons give
  silu(0) * 0 = 0 into zero rows of down_proj.
  """
  f, _, v = cfg.block_dims(index)
  hd, half = cfg.head_dim, cfg.head_dim // 2
  if name in ("attn.q_proj", "attn.k_proj"):
    pairs = np.asarray(cfg.rope_pairs(index))
    return 1, cfg.n_head if name == "attn.q_proj" else cfg.kv_heads, hd, np.concatenate([pairs, pairs + half])
  if name in ("attn.v_proj", "attn.o_proj"):
    return (1, cfg.kv_heads, hd, np.arange(v)) if name == "attn.v_proj" else (0, cfg.n_head, hd, np.arange(v))
  return (0 if name == "mlp.down_proj" else 1), 1, cfg.ff_dim, np.arange(f)


def _full_kernel(cfg: LlamaConfig, index: int, layer, name: str) -> jax.Array:
  """A projection's kernel as Hugging Face stores it: dense, at full width, (out, in)."""
  return _scatter(dense_kernel(layer), *_widening(cfg, index, name)).T


def _full_bias(cfg: LlamaConfig, index: int, layer, name: str) -> jax.Array:
  axis, groups, width, keep = _widening(cfg, index, name)
  return _scatter(layer.bias[...], 0, groups, width, keep) if axis == 1 else layer.bias[...]


def hf_tensors(model: Llama) -> dict[str, Callable[[], jax.Array]]:
  """Checkpoint tensors of any Llama-style model, each as a zero-argument function that computes it (dense
  reconstructions, narrowed blocks padded to full width): a writer computes one at a time."""
  cfg = model.config
  value = lambda variable: variable.get_value  # noqa: E731
  tensors = {"model.embed_tokens.weight": lambda: model.embedding_table, "model.norm.weight": value(model.ln_f.scale)}
  for i, block in enumerate(model.h):
    p = f"model.layers.{i}."
    tensors.update({p + hf + ".weight": value(getattr(block, ours).scale) for ours, hf in _NORMS.items()})
    for ours, hf in _PROJECTIONS.items():
      layer = model.layer(f"h.{i}.{ours}")
      tensors[p + hf + ".weight"] = functools.partial(_full_kernel, cfg, i, layer, ours)
      if layer.bias is not None:
        tensors[p + hf + ".bias"] = functools.partial(_full_bias, cfg, i, layer, ours)
  if model.lm_head is not None:
    tensors["lm_head.weight"] = lambda: dense_kernel(model.lm_head).T
  return tensors
