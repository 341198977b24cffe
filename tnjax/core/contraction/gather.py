"""Rows of a TT-matrix without forming it: `gather_rows`, the TT embedding's lookup."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tnjax.core.contraction.dense import _merge_run
from tnjax.core.tensor_train import TTMatrix


def _gather_split(shapes: tuple[tuple[int, ...], ...], tokens: int) -> int:
  """The split s minimizing elements held: prefix table + suffix table + per-token gathered rows."""
  def held(s):
    pre_in, pre_out = math.prod(x[1] for x in shapes[:s]), math.prod(x[2] for x in shapes[:s])
    suf_in, suf_out = math.prod(x[1] for x in shapes[s:]), math.prod(x[2] for x in shapes[s:])
    r = shapes[s][0]
    return pre_in * pre_out * r + r * suf_in * suf_out + tokens * r * (pre_out + suf_out)

  return min(range(1, len(shapes)), key=held)


def gather_rows(ttm: TTMatrix, ids: jax.Array) -> jax.Array:
  """Rows ``to_dense(ttm)[ids]`` without forming the matrix.

  The cores are split at a bond s into a prefix and a suffix, each merged
  into a small table (prefix: prod(in_dims[:s]) x prod(out_dims[:s]) x r[s];
  suffix: r[s] x prod(in_dims[s:]) x prod(out_dims[s:])). Each id selects one
  row of each table by its leading and trailing digits (row-major over
  ``in_dims``), and the two rows are contracted over r[s]. The split is the
  one holding the fewest elements for this many ids. For GPT-2's 50257 x 768
  table at rank 32 the tables hold 2.1M elements, not 38.6M.

  Args:
    ttm: cores (r[k], n_in[k], n_out[k], r[k+1]).
    ids: integer array of any shape, values in [0, prod(in_dims)).

  Returns:
    ids.shape + (prod(out_dims),).

  Complexity:
    Building the tables, plus per id 2 * r[s] * prod(out_dims) FLOPs.

  Examples:
    >>> import jax, jax.numpy as jnp, tnjax
    >>> ttm = tnjax.random_ttm(jax.random.key(0), (4, 5), (2, 3), rank=2)
    >>> ids = jnp.array([[0, 19], [7, 7]])
    >>> bool(jnp.allclose(tnjax.gather_rows(ttm, ids), tnjax.to_dense(ttm)[ids], atol=1e-6))
    True
  """
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"gather_rows: ids.dtype={ids.dtype} but an integer dtype is expected")
  if not isinstance(ttm, TTMatrix):
    raise ValueError(f"gather_rows: ttm is a {type(ttm).__name__} but a TTMatrix is expected")
  flat = ids.reshape(-1)
  if ttm.ndim == 1:
    return jnp.take(ttm.cores[0][0, :, :, 0], flat, axis=0).reshape(ids.shape + (ttm.shape[1],))
  shapes = tuple(c.shape for c in ttm.cores)
  s = _gather_split(shapes, flat.shape[0])
  prefix = _merge_run(ttm.cores[:s])[0]  # (I1, O1, r)
  suffix = _merge_run(ttm.cores[s:])[..., 0]  # (r, I2, O2)
  rows = jnp.take(prefix, flat // suffix.shape[1], axis=0)  # (t, O1, r)
  cols = jnp.take(suffix, flat % suffix.shape[1], axis=1)  # (r, t, O2)
  out = jnp.einsum("tpr,rtq->tpq", rows, cols)
  return out.reshape(ids.shape + (ttm.shape[1],))
