"""Random TT / TT-matrix initializers whose dense equivalents have a requested std."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from tnjax.core import _checks
from tnjax.core.tensor_train import TensorTrain, TTMatrix, split_modes


def _ranks(fn: str, rank, dims: tuple[int, ...]) -> tuple[int, ...]:
  """Interior ranks: an int caps every bond at its full rank; a tuple is taken exactly."""
  full = _checks.full_ranks(dims)
  caps = _checks.bond_caps(fn, "rank", rank, len(dims) - 1)
  if isinstance(rank, numbers.Integral):
    return tuple(min(c, f) for c, f in zip(caps, full))
  for k, (c, f) in enumerate(zip(caps, full)):
    if c > f:
      raise ValueError(f"{fn}: rank[{k}]={c} but bond {k} has full rank {f} "
                       f"(min(prod(left dims), prod(right dims)) for modes {dims}); expected rank[{k}] <= {f}")
  return caps


def _random_cores(fn: str, key, dims, rank, std, dtype) -> TensorTrain:
  std = float(std)
  if not math.isfinite(std) or std < 0:
    raise ValueError(f"{fn}: std={std!r} but a finite number >= 0 is expected")
  ranks = (1,) + _ranks(fn, rank, dims) + (1,)
  # A dense entry is a sum of prod(interior ranks) products of d independent
  # zero-mean core entries, so Var = prod(r) * prod_k s_k^2. Equal s_k give
  # the dense entries exactly std (tensorly-torch omits the prod(r) factor).
  core_std = (std * std / math.prod(ranks)) ** (0.5 / len(dims))
  keys = jax.random.split(key, len(dims))
  return TensorTrain(tuple(
      core_std * jax.random.normal(k, (ranks[i], n, ranks[i + 1]), dtype)
      for i, (k, n) in enumerate(zip(keys, dims))))


def random_tt(key, dims, rank, *, std: float = 1.0, dtype=jnp.float32) -> TensorTrain:
  """A random TensorTrain whose dense entries have mean 0 and standard deviation ``std``.

  Args:
    key: a ``jax.random`` key.
    dims: mode sizes (n[0], ..., n[d-1]).
    rank: an int (every bond, capped at the bond's full rank) or a tuple of
      d - 1 exact ranks (each at most the bond's full rank).
    std: standard deviation of the dense tensor's entries.
    dtype: core dtype.

  Raises:
    ValueError: on non-positive dims or ranks, a per-bond rank above the
      bond's full rank, a wrong-length rank tuple, or a negative std.

  Example:
    >>> import jax, tnjax
    >>> tnjax.random_tt(jax.random.key(0), (4, 5, 6), rank=3).ranks
    (1, 3, 3, 1)
  """
  fn = "random_tt"
  dims = _checks.check_dims(fn, "dims", dims)
  return _random_cores(fn, key, dims, rank, std, dtype)


def random_ttm(key, in_dims, out_dims, rank, *, std: float = 1.0, dtype=jnp.float32) -> TTMatrix:
  """A random TTMatrix whose dense matrix has entries of mean 0 and standard deviation ``std``.

  For a layer initialized like ``nnx.Linear`` (lecun normal), pass
  ``std=1 / sqrt(prod(in_dims))``; GPT-2 uses ``std=0.02``.

  Args:
    key: a ``jax.random`` key.
    in_dims, out_dims: row and column factors, one per core.
    rank: as in `random_tt`, with bond limits of the merged modes n_in[k] * n_out[k].
    std: standard deviation of the dense matrix's entries.
    dtype: core dtype.

  Raises:
    ValueError: as `random_tt`, and when the dims differ in length.

  Example:
    >>> import jax, jax.numpy as jnp, tnjax
    >>> ttm = tnjax.random_ttm(jax.random.key(0), (8, 8, 12), (12, 16, 16), rank=16, std=0.02)
    >>> round(float(jnp.std(tnjax.to_dense(ttm))), 3)
    0.02
  """
  fn = "random_ttm"
  in_dims = _checks.check_dims(fn, "in_dims", in_dims)
  out_dims = _checks.check_dims(fn, "out_dims", out_dims)
  if len(in_dims) != len(out_dims):
    raise ValueError(f"{fn}: len(in_dims)={len(in_dims)} but len(out_dims)={len(out_dims)}; "
                     "expected one entry per core in both")
  merged = tuple(i * o for i, o in zip(in_dims, out_dims))
  return split_modes(_random_cores(fn, key, merged, rank, std, dtype), in_dims, out_dims)
