"""Block Tensor-Train (BTT) matrices: two cores, two batched matmuls (Qiu, Potapczynski et al., ICML 2024).

A BTT matrix ``W`` of shape (m, n), with ``m = m1 * m2`` (row index
``i = i1 * m2 + i2``) and ``n = n1 * n2`` (column index ``j = j1 * n2 + j2``),
has two cores

* ``left``  (m2, m1, r, n1): for each input block ``i2``, a map from ``i1`` to ``(r, j1)``;
* ``right`` (n1, r, m2, n2): for each output block ``j1``, a map from ``(r, i2)`` to ``j2``;

and entries ``W[(i1, i2), (j1, j2)] = sum_a left[i2, i1, a, j1] * right[j1, a, i2, j2]``.
So every (m1 x n2) block ``W[:, i2, j1, :]`` is a rank-r product of its own
factors: unlike a TT-matrix, no parameter is shared between blocks, and
``x @ W`` is two batched matmuls (batched over ``i2``, then over ``j1``),
which accelerators run at full speed. At rank 1 it is a Monarch matrix.

Parameters: ``r * (m * n1 + n * m2)``. Multiply-adds per row of ``x``: the
same number. Ranks above ``min(m1, n2)`` add nothing (each block has that
rank at most), so they are refused.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from tnjax.core import _checks, _random
from tnjax.core.shapes import factorize


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockTT:
  """A matrix in Block Tensor-Train format: cores ``left`` (m2, m1, r, n1) and ``right`` (n1, r, m2, n2).

  Dims and rank are derived from the core shapes (static under ``jit``).
  Build one with `from_cores` (validates), `btt_from_dense` or
  `random_btt`.

  Examples:
    >>> import jax.numpy as jnp
    >>> btt = BlockTT.from_cores(jnp.ones((3, 2, 1, 4)), jnp.ones((4, 1, 3, 5)))
    >>> btt.in_dims, btt.out_dims, btt.rank, btt.shape, btt.num_params
    ((2, 3), (4, 5), 1, (6, 20), 84)
  """

  cores: tuple[jax.Array, jax.Array]

  @classmethod
  def from_cores(cls, left, right) -> BlockTT:
    """Validates core ranks, matching dims and one dtype."""
    fn = "BlockTT.from_cores"
    left, right = jnp.asarray(left), jnp.asarray(right)
    if left.ndim != 4 or right.ndim != 4:
      raise ValueError(f"{fn}: cores have shapes {left.shape}, {right.shape} but (m2, m1, r, n1) and "
                       "(n1, r, m2, n2) are expected")
    m2, _, r, n1 = left.shape
    if right.shape[:3] != (n1, r, m2):
      raise ValueError(f"{fn}: right.shape={right.shape} but (n1, r, m2, n2) = ({n1}, {r}, {m2}, n2) is expected "
                       f"from left.shape={left.shape}")
    if left.dtype != right.dtype:
      raise ValueError(f"{fn}: cores have dtypes {left.dtype}, {right.dtype} but one dtype is expected")
    return cls((left, right))

  @property
  def in_dims(self) -> tuple[int, int]:
    """(m1, m2): row index ``i = i1 * m2 + i2``."""
    return (self.cores[0].shape[1], self.cores[0].shape[0])

  @property
  def out_dims(self) -> tuple[int, int]:
    """(n1, n2): column index ``j = j1 * n2 + j2``."""
    return (self.cores[0].shape[3], self.cores[1].shape[3])

  @property
  def rank(self) -> int:
    return self.cores[0].shape[2]

  @property
  def shape(self) -> tuple[int, int]:
    return (math.prod(self.in_dims), math.prod(self.out_dims))

  @property
  def num_params(self) -> int:
    return sum(math.prod(c.shape) for c in self.cores)

  @property
  def dtype(self):
    return self.cores[0].dtype


def _check_btt(fn: str, btt) -> BlockTT:
  if not isinstance(btt, BlockTT):
    raise ValueError(f"{fn}: btt is a {type(btt).__name__} but a BlockTT is expected")
  return btt


def check_btt_dims(fn: str, in_dims, out_dims, rank) -> tuple[tuple[int, int], tuple[int, int], int]:
  """Two positive in and out dims each and a rank in [1, min(m1, n2)]."""
  in_dims = _checks.check_dims(fn, "in_dims", in_dims)
  out_dims = _checks.check_dims(fn, "out_dims", out_dims)
  if len(in_dims) != 2 or len(out_dims) != 2:
    raise ValueError(f"{fn}: in_dims={in_dims}, out_dims={out_dims} but two factors each are expected "
                     "(BlockTT has two cores)")
  rank = _checks.check_positive_int(fn, "rank", rank)
  full = min(in_dims[0], out_dims[1])
  if rank > full:
    raise ValueError(f"{fn}: rank={rank} but each (m1 x n2) block has rank at most min(m1, n2)={full} "
                     f"(in_dims={in_dims}, out_dims={out_dims}); expected rank <= {full}")
  return in_dims, out_dims, rank


def btt_dims(in_features: int, out_features: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Default (in_dims, out_dims): balanced two-factor splits with the larger input factor first and the smaller
  output factor first, which makes the parameter count ``r * (m * n1 + n * m2)`` the smaller of the orders.

  Examples:
    >>> btt_dims(768, 3072)
    ((32, 24), (48, 64))
  """
  a, b = factorize(in_features, 2)
  c, d = factorize(out_features, 2)
  return (max(a, b), min(a, b)), (min(c, d), max(c, d))


def btt_to_dense(btt: BlockTT) -> jax.Array:
  """The (m, n) dense matrix.

  Complexity: ``m * n * r`` multiply-adds.

  Examples:
    >>> import jax
    >>> btt = random_btt(jax.random.key(0), (4, 3), (2, 5), rank=2)
    >>> btt_to_dense(btt).shape
    (12, 10)
  """
  left, right = _check_btt("btt_to_dense", btt).cores
  w = jnp.einsum("biaj,jabk->ibjk", left, right)
  return w.reshape(btt.shape)


def btt_matvec(btt: BlockTT, x: jax.Array, *, precision=None, remat: bool = True) -> jax.Array:
  """``x @ W`` for x of shape (..., m): two batched matmuls, ``W`` never formed.

  Complexity: ``rows * r * (m * n1 + n * m2)`` multiply-adds; the intermediate
  holds ``rows * m2 * r * n1`` numbers, ``r * m2 / n2`` times the output's
  size (8x for a 2048 x 8192 layer at rank 16). With ``remat`` (the default)
  the backward pass recomputes it from ``x`` instead of keeping it from the
  forward pass: one more first matmul (half the forward's multiply-adds) for
  activation memory that is the input and output alone. Without it, a
  Llama-3.2-1B-shaped BTT model at 8 x 2048 tokens asks for 110 GiB on an H200.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> btt = random_btt(jax.random.key(0), (4, 3), (2, 5), rank=2)
    >>> x = jnp.ones((7, 12))
    >>> bool(jnp.allclose(btt_matvec(btt, x), x @ btt_to_dense(btt), atol=1e-5))
    True
  """
  fn = "btt_matvec"
  left, right = _check_btt(fn, btt).cores
  x = jnp.asarray(x)
  (m1, m2), (n1, n2) = btt.in_dims, btt.out_dims
  _checks.check_last_dim(fn, x, m1 * m2, "prod(in_dims)", f" (in_dims={btt.in_dims})")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(left.dtype)
  lead = x.shape[:-1]

  def two_matmuls(xs, left, right):
    z = jnp.einsum("tib,biaj->tbaj", xs, left, precision=precision)
    return jnp.einsum("tbaj,jabk->tjk", z, right, precision=precision)

  if remat:
    two_matmuls = jax.checkpoint(two_matmuls)
  y = two_matmuls(x.reshape((-1, m1, m2)), left.astype(x.dtype), right.astype(x.dtype))
  return y.reshape(lead + (n1 * n2,))


def btt_from_dense(w, in_dims, out_dims, rank: int) -> BlockTT:
  """The best rank-``rank`` BlockTT approximation of ``w`` (m, n) in Frobenius norm.

  Blocks ``w[:, i2, j1, :]`` are independent, so a truncated SVD of each
  block (batched) is the exact projection: the squared error is the sum of the
  discarded squared singular values over all blocks, and ``rank = min(m1, n2)``
  reproduces ``w``. Singular values are split evenly between the cores.

  Args:
    w: a (m1 * m2, n1 * n2) matrix; smaller matrices are zero-padded.
    in_dims, out_dims: (m1, m2) and (n1, n2).
    rank: r, at most min(m1, n2).

  Examples:
    >>> import numpy as np
    >>> w = np.random.default_rng(0).normal(size=(12, 10))
    >>> btt = btt_from_dense(w, (4, 3), (2, 5), rank=4)
    >>> bool(np.allclose(btt_to_dense(btt), w, atol=1e-4))
    True
  """
  fn = "btt_from_dense"
  (m1, m2), (n1, n2), rank = check_btt_dims(fn, in_dims, out_dims, rank)
  w = _checks.check_real_float(fn, "w", w)
  if w.ndim != 2 or w.shape[0] > m1 * m2 or w.shape[1] > n1 * n2:
    raise ValueError(f"{fn}: w.shape={w.shape} but a 2-d matrix of at most ({m1 * m2}, {n1 * n2}) is expected "
                     f"(in_dims={(m1, m2)}, out_dims={(n1, n2)})")
  _checks.check_finite(fn, "w", w)
  w = jnp.pad(w, ((0, m1 * m2 - w.shape[0]), (0, n1 * n2 - w.shape[1])))
  blocks = w.reshape(m1, m2, n1, n2).transpose(1, 2, 0, 3)  # (m2, n1, m1, n2)
  u, s, vt = jnp.linalg.svd(blocks, full_matrices=False)
  root = jnp.sqrt(s[..., :rank])
  left = (u[..., :rank] * root[..., None, :]).transpose(0, 2, 3, 1)  # (m2, m1, r, n1)
  right = (vt[..., :rank, :] * root[..., None]).transpose(1, 2, 0, 3)  # (n1, r, m2, n2)
  return BlockTT((left, right))


def btt_core_stds(in_dims, out_dims, rank: int, std: float) -> tuple[float, float]:
  """Per-core init stds: each proportional to ``1 / sqrt(its own fan-in)`` (m1 for ``left``, r * m2 for
  ``right``) and scaled so the dense matrix has entries of standard deviation ``std``.

  A dense entry sums r products, so ``Var(W) = r * s_l^2 * s_r^2``; with
  ``s_l^2 = c / m1`` and ``s_r^2 = c / (r m2)``, ``c = std * sqrt(m1 m2)``.
  """
  (m1, m2), c = in_dims, std * math.sqrt(in_dims[0] * in_dims[1])
  return math.sqrt(c / m1), math.sqrt(c / (rank * m2))


def random_btt(key, in_dims, out_dims, rank: int, *, std: float = 1.0, dtype=jnp.float32) -> BlockTT:
  """A random BlockTT whose dense matrix has entries of mean 0 and standard deviation ``std``.

  Each core's std follows its own fan-in (`btt_core_stds`), the
  structure-aware (muP) init of "Compute Better Spent".

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> btt = random_btt(jax.random.key(0), (32, 24), (48, 64), rank=4, std=0.02)
    >>> round(float(jnp.std(btt_to_dense(btt))), 3), btt.num_params
    (0.02, 442368)
  """
  fn = "random_btt"
  (m1, m2), (n1, n2), rank = check_btt_dims(fn, in_dims, out_dims, rank)
  std = float(std)
  if not math.isfinite(std) or std < 0:
    raise ValueError(f"{fn}: std={std!r} but a finite number >= 0 is expected")
  s_left, s_right = btt_core_stds((m1, m2), (n1, n2), rank, std)
  k1, k2 = jax.random.split(key)
  return BlockTT((s_left * _random.normal(k1, (m2, m1, rank, n1), dtype),
                  s_right * _random.normal(k2, (n1, rank, m2, n2), dtype)))


def btt_flops(btt: BlockTT, rows: int) -> int:
  """FLOPs (2 per multiply-add) of `btt_matvec` on ``rows`` rows: ``2 * rows * r * (m * n1 + n * m2)``.

  Examples:
    >>> import jax
    >>> btt_flops(random_btt(jax.random.key(0), (32, 24), (48, 64), rank=1), 1) / (2 * 768 * 3072)
    0.046875
  """
  (m1, m2), (n1, n2) = btt.in_dims, btt.out_dims
  return 2 * rows * btt.rank * (m1 * m2 * n1 + n1 * n2 * m2)
