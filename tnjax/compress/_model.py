"""Model surgery shared by the compression methods: layer names, replacing layers, parameter accounting."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tnjax.interop.native import model_from_tensors, model_tensors
from tnjax.models.config import DecoderConfig, LayerSpec
from tnjax.models.decoder import Decoder
from tnjax.models.names import layer_key, parse_layer_key


def projection_names(cfg: DecoderConfig) -> list[str]:
  """Every attention and MLP projection of the model, "h.{i}.{projection}", block by block.

  Examples:
    >>> from tnjax.models import preset
    >>> projection_names(preset("tiny", n_layer=1))
    ['h.0.attn.c_attn', 'h.0.attn.c_proj', 'h.0.mlp.c_fc', 'h.0.mlp.c_proj']
  """
  return [layer_key(i, p) for i in range(cfg.n_layer) for p in cfg.PROJECTIONS]


def resolve_layers(fn: str, cfg: DecoderConfig, layers) -> list[str]:
  """Layer names to compress: None is every attention and MLP projection; a name is "h.{i}.{projection}",
  a projection ("mlp.c_fc": every block) or "lm_head" (an untied head).

  Examples:
    >>> from tnjax.models import preset
    >>> resolve_layers("f", preset("tiny"), ["mlp.c_fc", "h.0.attn.c_proj"])
    ['h.0.mlp.c_fc', 'h.1.mlp.c_fc', 'h.0.attn.c_proj']
  """
  if layers is None:
    return projection_names(cfg)
  if isinstance(layers, str):
    layers = [layers]
  out = []
  for name in layers:
    block, projection = parse_layer_key(name)
    if block is None and name in cfg.PROJECTIONS:
      out += [layer_key(i, name) for i in range(cfg.n_layer)]
    elif block is not None and projection in cfg.PROJECTIONS and block < cfg.n_layer:
      out.append(name)
    elif name == "lm_head" and not cfg.tie_embeddings:
      out.append(name)
    else:
      raise ValueError(f"{fn}: unknown layer name {name!r}; expected 'h.<i>.<projection>' with i < "
                       f"{cfg.n_layer}, a projection of {cfg.PROJECTIONS}, or 'lm_head' for an untied head")
  return list(dict.fromkeys(out))


def get_layer(model: Decoder, name: str) -> nnx.Module:
  """The module of a projection name ("h.3.mlp.c_fc", "lm_head") or "embedding"."""
  return model.layer(name)


def _prefix(name: str) -> str:
  return "wte" if name == "embedding" else name


def rebuild(model: Decoder, cfg: DecoderConfig, replaced: dict) -> Decoder:
  """A new model of config ``cfg`` with the parameters of ``model``, except the named layers, taken from
  ``replaced`` (a module, or a dict of its parameters such as ``{"kernel": ..., "bias": ...}``)."""
  tensors = model_tensors(model)
  for name, module in replaced.items():
    prefix = _prefix(name) + "."
    floating = [v.dtype for k, v in tensors.items() if k.startswith(prefix) and jnp.issubdtype(v.dtype, jnp.floating)]
    tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    params = module if isinstance(module, dict) else model_tensors(module)
    # fits run in float32 (dense_kernel); a layer stored in bfloat16 stays bfloat16, or it would double in bytes
    like = floating[0] if floating else None
    tensors.update({prefix + k: v.astype(like) if like is not None and v.dtype != like
                    and jnp.issubdtype(v.dtype, jnp.floating) else v for k, v in params.items()})
  return model_from_tensors(cfg, tensors, fn="compress")


def with_specs(cfg: DecoderConfig, specs: dict[str, LayerSpec]) -> DecoderConfig:
  """``cfg`` with per-layer specs set ("embedding", "lm_head" or "h.{i}.{projection}")."""
  return cfg.replace(layers={**cfg.layers, **specs})


def spec_of(cfg: DecoderConfig, name: str) -> LayerSpec:
  return cfg.spec_of(name)


def weights(layer: nnx.Module) -> int:
  """Parameters of a layer other than its bias (what compression reduces)."""
  bias = getattr(layer, "bias", None)
  return count_params(layer) - (0 if bias is None else math.prod(bias.shape))


def count_params(module: nnx.Module) -> int:
  """Parameters of a module (every ``nnx.Param``, TT cores and int8 scales included); for a model,
  ``num_params`` (the embedding's padding rows are not parameters)."""
  if isinstance(module, Decoder):
    return module.num_params
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nnx.state(module, nnx.Param)))


def count_bytes(module: nnx.Module) -> int:
  """Bytes the parameters take (int8 weights count one byte each).

  Examples:
    >>> from flax import nnx
    >>> count_bytes(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))  # 15 float32 parameters
    60
  """
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(nnx.state(module, nnx.Param)))
