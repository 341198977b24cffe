"""Argument checks shared by the core: one place per rule, one message format.

Every error names the function, the argument, what was given and what was
expected, e.g. ``matvec: x.shape[-1]=15 but prod(in_dims)=16 (in_dims=(4, 4))``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def is_concrete(x) -> bool:
  """True when ``x`` holds values (not a tracer under jit/vmap/grad)."""
  return not isinstance(x, jax.core.Tracer)


def check_finite(fn: str, name: str, x) -> None:
  """Raises if a concrete ``x`` has NaN or Inf; tracers pass (no values yet)."""
  if is_concrete(x) and not bool(jnp.isfinite(x).all()):
    raise ValueError(f"{fn}: {name} has non-finite values (NaN or Inf); expected finite input")


def check_real_float(fn: str, name: str, x) -> jax.Array:
  """Returns ``x`` as a real floating array (integers are promoted)."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    raise ValueError(f"{fn}: {name}.dtype={x.dtype} but a real floating dtype is expected")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.result_type(float))
  return x


def check_positive_int(fn: str, name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{fn}: {name}={value!r} but a positive integer is expected")
  return int(value)


def check_last_dim(fn: str, x, expected: int, what: str, detail: str = "") -> None:
  """Raises unless ``x`` has at least one axis and ``x.shape[-1] == expected``."""
  if x.ndim == 0 or x.shape[-1] != expected:
    got = f"x.shape[-1]={x.shape[-1]}" if x.ndim else "x.shape=()"
    raise ValueError(f"{fn}: {got} but {what}={expected}{detail}")


def check_dims(fn: str, name: str, dims) -> tuple[int, ...]:
  """A non-empty tuple of positive ints."""
  if isinstance(dims, numbers.Integral):
    dims = (dims,)
  if not isinstance(dims, Sequence) or len(dims) == 0:
    raise ValueError(f"{fn}: {name}={dims!r} but a non-empty sequence of positive integers is expected")
  for d in dims:
    if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1:
      raise ValueError(f"{fn}: {name}={tuple(dims)!r} but every entry must be a positive integer")
  return tuple(int(d) for d in dims)


def bond_caps(fn: str, name: str, value, num_bonds: int) -> tuple[int | None, ...]:
  """Normalizes an int-or-per-bond-tuple rank argument to one entry per bond.

  ``None`` means no cap. A tuple must have one entry per bond (d - 1 of them).
  """
  if value is None:
    return (None,) * num_bonds
  if isinstance(value, numbers.Integral) and not isinstance(value, bool):
    return (check_positive_int(fn, name, value),) * num_bonds
  if isinstance(value, Sequence) and not isinstance(value, str):
    if len(value) != num_bonds:
      raise ValueError(
          f"{fn}: {name} has {len(value)} entries but the tensor has {num_bonds} bonds "
          f"(one entry per bond, d - 1 = {num_bonds})")
    return tuple(check_positive_int(fn, f"{name}[{k}]", v) for k, v in enumerate(value))
  raise ValueError(f"{fn}: {name}={value!r} but an int or a per-bond tuple of ints is expected")


def check_rtol(fn: str, rtol) -> float | None:
  if rtol is None:
    return None
  if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not math.isfinite(rtol) or rtol < 0:
    raise ValueError(f"{fn}: rtol={rtol!r} but a finite number >= 0 is expected")
  return float(rtol)


def full_ranks(dims: Sequence[int]) -> tuple[int, ...]:
  """The largest useful rank at each of the d - 1 bonds: min(prod left, prod right)."""
  return tuple(min(math.prod(dims[:k]), math.prod(dims[k:])) for k in range(1, len(dims)))
