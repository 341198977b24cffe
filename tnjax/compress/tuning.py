"""CompactifAI's profiling and healing: per-layer sensitivity, choosing layers under a budget, brief fine-tuning."""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tnjax.compress import _model
from tnjax.compress._progress import bar, progress_bars
from tnjax.eval import perplexity, window_size
from tnjax.models.decoder import Decoder, dense_kernel


def _check_tokens(fn: str, tokens) -> np.ndarray:
  ids = np.asarray(tokens)
  if ids.ndim != 1 or ids.size < 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{fn}: tokens.shape={ids.shape}, dtype={ids.dtype} but 1-d integer ids (at least 2) "
                     "are expected")
  return ids


def layer_sensitivity(model: Decoder, tokens, compress, *, layers=None, block_size: int | None = None) -> dict:
  """The perplexity increase from compressing each layer alone.

  Args:
    model: the model.
    tokens: 1-d ids to profile on (see [`perplexity`][tnjax.eval.perplexity]);
      take training text, so that validation text stays for the choices made
      from the profile.
    compress: ``compress(model, layers=[name]) -> model``, e.g.
      ``functools.partial(mpo_compress, rank=16)``.
    layers: names to profile (default every attention and MLP projection).
    block_size: evaluation window (default: as `tnjax.eval.perplexity`'s).

  Returns:
    ``{"base": perplexity, "layers": {name: {"perplexity", "increase",
    "params_saved"}}}``; increase is relative, ppl / base - 1.

  Complexity:
    One compression and one perplexity evaluation per layer. Where the
    compressed layer has a dense kernel of the original's shape (SVD, MPO,
    low rank: any projection of the same width), it is evaluated as that
    reconstructed kernel in a copy of the original model, so every layer
    shares one compiled graph (the factorized layer computes the same
    product, up to rounding); otherwise the compressed model is evaluated
    as it is (a compile per layer).

  Examples:
    >>> import functools, numpy as np
    >>> from flax import nnx
    >>> from tnjax.compress import svd_compress
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
    >>> tokens = np.random.default_rng(0).integers(0, 512, 300)
    >>> sens = layer_sensitivity(model, tokens, functools.partial(svd_compress, rank=4), layers=["mlp.c_fc"])
    >>> layers = sens["layers"]
    >>> sorted(layers), layers.get("h.0.mlp.c_fc").get("params_saved")
    (['h.0.mlp.c_fc', 'h.1.mlp.c_fc'], 62976)
  """
  fn = "layer_sensitivity"
  ids = _check_tokens(fn, tokens)
  names = _model.resolve_layers(fn, model.config, layers)
  evaluate = functools.partial(perplexity, token_ids=ids, block_size=block_size)
  base = evaluate(model)["perplexity"]
  probe = nnx.clone(model)  # the original graph; one layer at a time holds a reconstructed kernel
  out = {}
  for name in names:
    small = compress(model, layers=[name])
    target, new = probe.layer(name), small.layer(name)
    kernel = dense_kernel(new)
    if (isinstance(target, nnx.Linear) and kernel.shape == target.kernel.shape
        and (target.bias is None) == (new.bias is None)):
      saved = (target.kernel[...], None if target.bias is None else target.bias[...])
      target.kernel[...] = jnp.asarray(kernel, saved[0].dtype)
      if target.bias is not None:
        target.bias[...] = jnp.asarray(new.bias[...], saved[1].dtype)
      try:
        ppl = evaluate(probe)["perplexity"]
      finally:
        target.kernel[...] = saved[0]
        if target.bias is not None:
          target.bias[...] = saved[1]
    else:
      ppl = evaluate(small)["perplexity"]
    out[name] = {"perplexity": ppl, "increase": ppl / base - 1,
                 "params_saved": model.num_params - small.num_params}
  return {"base": base, "layers": out}


def choose_layers(sensitivity: dict, params_to_remove: int) -> list[str]:
  """Layers to compress so that at least ``params_to_remove`` parameters go, least harmful first.

  Layers are taken in order of perplexity increase per parameter saved
  (from `layer_sensitivity`); layers that save nothing are skipped.

  Raises:
    ValueError: when even every layer together does not remove enough.

  Examples:
    >>> sens = {"layers": {"a": {"increase": 0.10, "params_saved": 100},
    ...                    "b": {"increase": 0.01, "params_saved": 100}}}
    >>> choose_layers(sens, 50), choose_layers(sens, 150)
    (['b'], ['b', 'a'])
  """
  layers = {k: v for k, v in sensitivity["layers"].items() if v["params_saved"] > 0}
  order = sorted(layers, key=lambda k: max(layers[k]["increase"], 0.0) / layers[k]["params_saved"])
  chosen, saved = [], 0
  for name in order:
    if saved >= params_to_remove:
      break
    chosen.append(name)
    saved += layers[name]["params_saved"]
  if saved < params_to_remove:
    raise ValueError(f"choose_layers: params_to_remove={params_to_remove} but compressing every profiled layer "
                     f"removes only {saved}")
  return chosen


def check_healable(fn: str, model: Decoder) -> None:
  """Refuses parameters stored below float32: Adam's updates at a healing learning rate are below bfloat16's
  resolution and would round away (the loop keeps no float32 master copy)."""
  low = sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
                if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32})
  if low:
    raise ValueError(f"{fn}: the model's parameters are {low} but float32 is expected to heal: Adam's updates "
                     "would round away (load without --param-dtype to heal)")


def heal(model: Decoder, tokens, steps: int, *, lr: float = 1e-4, batch_size: int = 8, block_size: int | None = None,
         warmup: int | None = None, seed: int = 0, progress: bool | None = None) -> Decoder:
  """Fine-tunes a compressed model briefly with the training loop (AdamW, warmup + cosine), as CompactifAI heals.

  Args:
    model: the model (not int8-quantized: quantize after healing).
    tokens: 1-d training ids; windows are sampled as in [`train`][tnjax.train.train].
    steps: optimizer steps (at least 1).
    lr, batch_size, warmup, seed: as [`TrainConfig`][tnjax.train.TrainConfig]
      (warmup default: 10% of steps, none for one step); computation runs in the model's dtype. Every
      parameter gets ``lr``, also in a muP model (its multipliers are for training from scratch).
    block_size: window length (default: the smallest of the model's, `tnjax.eval.DEFAULT_WINDOW` and the
      text's).
    progress: a step bar on stderr: True, False, or None (default: as `tnjax.compress.progress_bars` says).

  Returns:
    The fine-tuned model (same config).

  Raises:
    ValueError: on a quantized model, steps < 1, too few tokens, or a loss
      that is not finite at the end.

  Examples:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny", block_size=32), rngs=nnx.Rngs(0))
    >>> tokens = np.random.default_rng(0).integers(0, 512, 2000)
    >>> heal(model, tokens, 2, batch_size=2).config == model.config
    True
  """
  from tnjax.core import _checks
  from tnjax.train import TrainConfig
  from tnjax.train.loop import Trainer

  fn = "heal"
  steps = _checks.check_positive_int(fn, "steps", steps)
  ids = _check_tokens(fn, tokens)
  quantized = sorted(k for k, v in model.config.layers.items() if v.quant is not None)
  if quantized:
    raise ValueError(f"{fn}: layers {quantized[:4]} are int8; heal before quantize_int8, not after")
  check_healable(fn, model)
  block = window_size(fn, model.config.block_size, ids.size, block_size, reads_past=2, text="tokens")
  if warmup is None:  # 10%, and none for one step (a warmup as long as the run never reaches lr: one step of lr 0)
    warmup = min(max(1, steps // 10), steps - 1)
  cfg = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, block_size=block, warmup=warmup, weight_decay=0.0,
                    seed=seed, layers={}).validate()
  # one learning rate for every parameter: muP's per-layer multipliers are for training from scratch (and are
  # undefined for a compressed model's per-block widths)
  trainer = Trainer(cfg, model.config.vocab_size, model=model, mup=False)
  loss = None
  with jax.numpy_dtype_promotion("standard"):  # optax mixes its int step count with floats
    with contextlib.nullcontext() if progress is None else progress_bars(progress):
      for step in bar(range(steps), "heal", unit="step"):
        loss, _ = trainer.step(step, ids)
  if not math.isfinite(float(loss)):
    raise ValueError(f"{fn}: the training loss is {float(loss)} after {steps} steps; try a lower lr")
  return trainer.model()
