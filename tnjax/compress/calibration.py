"""Calibration for output-error compression: the input Gram matrix ``X^T X`` of every projection.

With ``G = X^T X`` of a layer's inputs, the output error of any replacement
``W'`` is ``||X (W - W')||_F^2 = tr((W - W')^T G (W - W'))``, so the data-aware
decompositions of [`tnjax.core.whitening`][tnjax.core.whitening] need only
``G``. One pass through the model, block by block through each block's
``trace`` (the model seam), collects it for every projection of every family.

Precision and memory: each batch's Grams are computed on the device in
float32 at the highest matmul precision and summed on the host in float64,
so rounding does not grow with the number of batches. Projections that read
the same input (Llama's q/k/v, gate/up) share one computation. GPT-2 124M needs
about 1.1 GB of float64 Grams (its 3072-wide MLP inputs dominate).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tnjax.models.decoder import Decoder
from tnjax.models.names import layer_key


def as_batches(fn: str, batches) -> list[jax.Array]:
  """Calibration batches as a list of (batch, time) integer id arrays; ``fn`` names the caller in errors."""
  if batches is None:
    raise ValueError(f"{fn}: batches=None but calibration ids (batch, time) are expected")
  if isinstance(batches, (np.ndarray, jax.Array)) and np.ndim(batches) == 2:
    batches = [batches]
  batches = [jnp.asarray(b) for b in batches]
  if not batches or any(b.ndim != 2 or not jnp.issubdtype(b.dtype, jnp.integer) or b.size == 0 for b in batches):
    raise ValueError(f"{fn}: batches must be one or more non-empty integer id arrays of shape (batch, time)")
  return batches


@nnx.jit
def _batch_grams(model: Decoder, ids) -> list[dict]:
  x = model.embed(ids).astype(jnp.float32)
  out = []
  for block in model.h:
    y, acts = block.trace(x)
    seen: dict[int, jax.Array] = {}
    grams = {}
    for name, inp in acts["inputs"].items():
      if id(inp) not in seen:  # q/k/v (and gate/up) read one array: one Gram
        z = inp.reshape(-1, inp.shape[-1]).astype(jnp.float32)
        seen[id(inp)] = jnp.matmul(z.T, z, precision=jax.lax.Precision.HIGHEST)
      grams[name] = seen[id(inp)]
    out.append(grams)
    x = y.astype(jnp.float32)
  return out


def input_grams(model: Decoder, batches) -> tuple[dict[str, np.ndarray], int]:
  """``X^T X`` of the inputs of every projection, summed over calibration batches.

  Args:
    model: any decoder family (GPT-2, Llama-style), dense or tensorized.
    batches: integer id arrays (batch, time), or one such array.

  Returns:
    ``(grams, tokens)``: ``{"h.{i}.{projection}": (n_in, n_in) float64}`` and the number of tokens summed.

  Raises:
    ValueError: on empty or non-integer batches, or ids the model refuses (out of vocabulary, too long).

  Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> grams, tokens = input_grams(GPT(preset("tiny"), rngs=nnx.Rngs(0)), np.zeros((2, 16), np.int32))
    >>> tokens, grams["h.1.attn.c_attn"].shape, grams["h.1.mlp.c_proj"].shape, grams["h.0.mlp.c_fc"].dtype
    (32, (128, 128), (512, 512), dtype('float64'))
  """
  fn = "input_grams"
  total: list[dict] | None = None
  tokens = 0
  for b in as_batches(fn, batches):
    model._check_ids(b)
    stats = jax.device_get(_batch_grams(model, b))
    tokens += int(b.size)
    if total is None:
      total = [{n: np.asarray(g, np.float64) for n, g in block.items()} for block in stats]
    else:
      for acc, block in zip(total, stats):
        for n, g in block.items():
          acc[n] += g
  return {layer_key(i, name): g for i, block in enumerate(total) for name, g in block.items()}, tokens
