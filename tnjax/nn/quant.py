"""Weight-only int8: symmetric per-channel quantization and a dense int8 layer.

A weight ``w`` is stored as int8 ``q`` and float32 ``scale`` with
``w ~= q * scale``; one scale per channel of the trailing half of the axes
(per output column of an (in, out) kernel, per (n_out, r') slice of a TT core
(r, n_in, n_out, r')). Rounding to nearest bounds the error per entry by
``scale / 2 = max|w| / 254`` over its channel.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from tnjax.core import _checks

QMAX = 127
QUANTS = (None, "int8")  # the storage kinds a layer's ``quant`` (and ``LayerSpec.quant``) accepts


def quantize(w) -> tuple[jax.Array, jax.Array]:
  """Int8 values and float32 per-channel scales of ``w`` (channels: the last ``ndim - ndim // 2`` axes).

  Returns:
    ``(q, scale)``: q int8 of w's shape, scale float32 with size-1 leading
    axes (broadcasts against q); an all-zero channel gets scale 1.

  Examples:
    >>> q, s = quantize(jnp.array([[1.0, -4.0], [0.5, 2.0]]))
    >>> q.tolist(), s.shape
    ([[127, -127], [64, 64]], (1, 2))
  """
  w = jnp.asarray(w, jnp.float32)
  axes = tuple(range(w.ndim // 2))
  amax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
  scale = jnp.where(amax > 0, amax / QMAX, 1.0)
  q = jnp.clip(jnp.round(w / scale), -QMAX, QMAX).astype(jnp.int8)
  return q, scale


def dequantize(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
  """``q * scale`` in ``dtype``.

  Examples:
    >>> w = jnp.array([[0.5, -1.0], [0.25, 2.0]])
    >>> q, s = quantize(w)
    >>> bool(jnp.all(jnp.abs(dequantize(q, s) - w) <= s / 2))
    True
  """
  return (q.astype(jnp.float32) * scale).astype(dtype)


class Int8Linear(nnx.Module):
  """A dense layer with an int8 (in, out) kernel and float32 per-output-column scales.

  The scales are applied after the matmul, ``y = (x @ q) * scale + b``, which
  equals ``x @ (q * scale) + b`` exactly, so the kernel is never dequantized
  in memory: the matmul reads one byte per weight.

  Args:
    in_features, out_features: layer sizes.
    use_bias: add a float bias.
    dtype: computation dtype (None: the input's; int8 values are exact in bfloat16).
    kernel: a float (in, out) kernel to quantize; zeros when None (a skeleton to load into).
    bias: its bias.

  Examples:
    >>> layer = Int8Linear(4, 3, kernel=jnp.ones((4, 3)))
    >>> layer(jnp.ones((2, 4))).tolist()
    [[4.0, 4.0, 4.0], [4.0, 4.0, 4.0]]
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, dtype=None, kernel=None,
               bias=None, precision=None):
    fn = "Int8Linear"
    self.in_features = _checks.check_positive_int(fn, "in_features", in_features)
    self.out_features = _checks.check_positive_int(fn, "out_features", out_features)
    self.dtype, self.precision = dtype, precision
    kernel = jnp.zeros((in_features, out_features)) if kernel is None else jnp.asarray(kernel)
    if kernel.shape != (in_features, out_features):
      raise ValueError(f"{fn}: kernel.shape={kernel.shape} but (in_features, out_features)="
                       f"{(in_features, out_features)} is expected")
    q, scale = quantize(kernel)
    self.q, self.scale = nnx.Param(q), nnx.Param(scale)
    bias = jnp.zeros((out_features,)) if bias is None else jnp.asarray(bias, jnp.float32)
    self.bias = nnx.Param(bias) if use_bias else None

  @property
  def kernel(self) -> jax.Array:
    """The dequantized (in, out) float32 kernel."""
    return dequantize(self.q[...], self.scale[...])

  @property
  def num_params(self) -> int:
    return math.prod(self.q.shape) + self.out_features * (2 if self.bias is not None else 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    _checks.check_last_dim("Int8Linear", x, self.in_features, "in_features")
    dtype = x.dtype if self.dtype is None else self.dtype
    y = jnp.matmul(x.astype(dtype), self.q[...].astype(dtype), precision=self.precision)
    lead = (1,) * (y.ndim - 1)
    y = y * self.scale[...].astype(dtype).reshape(lead + (-1,))
    return y if self.bias is None else y + self.bias[...].astype(dtype).reshape(lead + (-1,))
