"""muP (maximal-update parametrization) for dense and structured decoders (GPT-2 and Llama families): per-core
learning-rate multipliers.

With Adam, a hidden matrix's update has entries of size ~lr, so its effect
on the layer's output grows with the fan-in; muP (Yang et al., Tensor
Programs V) scales each hidden matrix's learning rate by
``fan_in(base) / fan_in``, so the learning rate tuned on a narrow base model
stays right when the model is widened. Structured layers are treated as
their cores (Qiu, Potapczynski et al., "Compute Better Spent", ICML 2024):
each TT-matrix or BTT core is a batched matrix with its own fan-in
([`hidden_fan_ins`][tnjax.nn.hidden_fan_ins]), so two cores of one layer may scale
differently with width. Embeddings, norms and biases keep the base learning
rate, as does an untied LM head (its input is scaled by the output multiplier
instead). The model side (init stds, output multiplier) is the config's
``mup_base_width`` (`GPTConfig`, `LlamaConfig`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax
from flax import nnx

from tnjax.models import build
from tnjax.models.config import DecoderConfig
from tnjax.nn import hidden_fan_ins


def mup_multipliers(cfg: DecoderConfig) -> dict[str, float]:
  """Learning-rate multiplier of every hidden matrix of a decoder of config ``cfg`` (which names its
  ``mup_base_width``), by dotted parameter name: ``fan_in`` at the base width over ``fan_in`` at ``cfg``'s.
  Parameters not listed keep multiplier 1.

  Examples:
    >>> from tnjax.models import preset
    >>> cfg = preset("tiny", d_model=256, n_head=8, mup_base_width=128,
    ...              layers={"mlp.c_fc": {"kind": "btt", "rank": 2}})
    >>> m = mup_multipliers(cfg)
    >>> m["h.0.attn.c_attn.kernel"], m["h.0.mlp.c_fc.cores.0"], m["h.0.mlp.c_fc.cores.1"]  # BTT: m1 16 -> 16
    (0.5, 1.0, 0.5)
    >>> m = mup_multipliers(preset("llama-tiny", d_model=256, n_head=8, n_kv_head=4, mup_base_width=128))
    >>> m["h.0.attn.k_proj.kernel"], m["h.0.mlp.down_proj.kernel"]  # d_model and d_ff 128 -> 256
    (0.5, 0.5)
  """
  fn = "mup_multipliers"
  if cfg.mup_base_width is None:
    raise ValueError(f"{fn}: cfg.mup_base_width=None but a base width is expected (muP is relative to it)")
  base_cfg = cfg.at_width(cfg.mup_base_width)
  fans = hidden_fan_ins(nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0))))
  base = hidden_fan_ins(nnx.eval_shape(lambda: build(base_cfg, rngs=nnx.Rngs(0))))
  if set(fans) != set(base):
    raise ValueError(f"{fn}: the base model at width {cfg.mup_base_width} has other hidden matrices "
                     f"({sorted(set(fans) ^ set(base))[:4]}); expected the same layers at both widths")
  return {name: base[name] / fan for name, fan in fans.items()}


class ScaleByMultipliersState(NamedTuple):
  """No state: the multipliers are constants of the transform."""


def scale_by_multipliers(multipliers) -> optax.GradientTransformation:
  """Multiplies each update by a constant of the same tree structure (a per-parameter learning rate when it
  follows the optimizer, decoupled weight decay included).

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_multipliers({"a": 0.5, "b": 1.0})
    >>> tx.update({"a": jnp.ones(2), "b": jnp.ones(2)}, tx.init(None))[0]["a"]
    Array([0.5, 0.5], dtype=float32)
  """

  def init_fn(params):
    del params
    return ScaleByMultipliersState()

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u, m: u * m, updates, multipliers), state

  return optax.GradientTransformation(init_fn, update_fn)
