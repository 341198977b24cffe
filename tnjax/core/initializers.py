"""Random TT / TT-matrix initializers whose dense equivalents have a requested std."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from tnjax.core import _checks, _random
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


BALANCES = ("equal", "fan_in")


def _random_cores(fn: str, key, dims, rank, std, dtype, fan_ins=None) -> TensorTrain:
  """Cores with Var(dense entry) = std^2: equal core stds, or (``fan_ins`` given, one per core) each core's
  variance proportional to ``1 / fan_ins[k]``."""
  std = float(std)
  if not math.isfinite(std) or std < 0:
    raise ValueError(f"{fn}: std={std!r} but a finite number >= 0 is expected")
  ranks = (1,) + _ranks(fn, rank, dims) + (1,)
  # A dense entry is a sum of prod(interior ranks) products of d independent
  # zero-mean core entries, so Var = prod(r) * prod_k s_k^2. Equal s_k give
  # the dense entries exactly std (tensorly-torch omits the prod(r) factor).
  # With s_k^2 = c / f_k: c^d = std^2 * prod(f) / prod(r).
  d = len(dims)
  if fan_ins is None:
    core_vars = [(std * std / math.prod(ranks)) ** (1.0 / d)] * d
  else:
    f = [fan(ranks[k]) for k, fan in enumerate(fan_ins)]
    c = (std * std * math.prod(f) / math.prod(ranks)) ** (1.0 / d)
    core_vars = [c / fk for fk in f]
  keys = jax.random.split(key, d)
  return TensorTrain(tuple(
      math.sqrt(v) * _random.normal(k, (ranks[i], n, ranks[i + 1]), dtype)
      for i, (k, n, v) in enumerate(zip(keys, dims, core_vars))))


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

  Examples:
    >>> import jax, tnjax
    >>> tnjax.random_tt(jax.random.key(0), (4, 5, 6), rank=3).ranks
    (1, 3, 3, 1)
  """
  fn = "random_tt"
  dims = _checks.check_dims(fn, "dims", dims)
  return _random_cores(fn, key, dims, rank, std, dtype)


def random_ttm(key, in_dims, out_dims, rank, *, std: float = 1.0, dtype=jnp.float32,
               balance: str = "equal") -> TTMatrix:
  """A random TTMatrix whose dense matrix has entries of mean 0 and standard deviation ``std``.

  For a layer initialized like ``nnx.Linear`` (lecun normal), pass
  ``std=1 / sqrt(prod(in_dims))``; GPT-2 uses ``std=0.02``.

  Args:
    key: a ``jax.random`` key.
    in_dims, out_dims: row and column factors, one per core.
    rank: as in `random_tt`, with bond limits of the merged modes n_in[k] * n_out[k].
    std: standard deviation of the dense matrix's entries.
    dtype: core dtype.
    balance: "equal" (every core the same std) or "fan_in" (core k's
      variance proportional to ``1 / (r[k] * n_in[k])``, its own fan-in: the
      structure-aware muP init; the dense std is ``std`` either way).

  Raises:
    ValueError: as `random_tt`, and when the dims differ in length.

  Examples:
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
  if balance not in BALANCES:
    raise ValueError(f"{fn}: balance={balance!r} but one of {BALANCES} is expected")
  merged = tuple(i * o for i, o in zip(in_dims, out_dims))
  fan_ins = None if balance == "equal" else [lambda r, n=n: r * n for n in in_dims]
  return split_modes(_random_cores(fn, key, merged, rank, std, dtype, fan_ins), in_dims, out_dims)
