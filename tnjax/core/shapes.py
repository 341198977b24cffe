"""Shape helpers: balanced factorizations of feature sizes into TT modes."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from tnjax.core import _checks

# A factorization of m into d factors is "balanced" when its largest factor is
# at most _BALANCE * n ** (1 / d). 1.5 keeps GPT-2 sizes exact (768 -> 8*8*12,
# 3072 -> 12*16*16) and pads awkward sizes by well under 1% (50257 -> 27*38*49 = 50274).
_BALANCE = 1.5


def _prime_factors(m: int) -> list[int]:
  out, p = [], 2
  while p * p <= m:
    while m % p == 0:
      out.append(p)
      m //= p
    p += 1
  if m > 1:
    out.append(m)
  return out


def _best_split(m: int, d: int, bound: int) -> tuple[int, ...] | None:
  """The non-decreasing d-factor split of m with every factor <= bound, most even first."""
  if max(_prime_factors(m), default=1) > bound:
    return None
  divisors = [f for f in range(1, bound + 1) if m % f == 0]
  best = None

  def search(rest: int, left: int, lo: int, acc: tuple[int, ...]):
    nonlocal best
    if left == 1:
      if lo <= rest <= bound:
        cand = acc + (rest,)
        key = (cand[-1], cand[-1] - cand[0])
        if best is None or key < best[0]:
          best = (key, cand)
      return
    for f in divisors:
      if f < lo:
        continue
      if f ** left > rest:
        break
      if rest % f == 0:
        search(rest // f, left - 1, f, acc + (f,))

  search(m, d, 1, ())
  return None if best is None else best[1]


@functools.cache
def factorize(n: int, d: int) -> tuple[int, ...]:
  """Splits a size into d balanced factors whose product is >= n, with the least padding.

  The smallest m >= n is taken that splits into d factors no larger than
  ``1.5 * n ** (1 / d)``; among its splits the most even one is returned, in
  non-decreasing order. Exactly d factors are always returned (a factor may be
  1 only for tiny n); ``prod(result) - n`` is the padding a TT layer adds.

  Args:
    n: the size to factor, >= 1.
    d: the number of factors, >= 1.

  Returns:
    A tuple of d ints with product >= n.

  Raises:
    ValueError: when n or d is not a positive integer.

  Examples:
    >>> import tnjax
    >>> tnjax.factorize(768, 3), tnjax.factorize(3072, 3)
    ((8, 8, 12), (12, 16, 16))
    >>> f = tnjax.factorize(50257, 3); f, f[0] * f[1] * f[2]
    ((27, 38, 49), 50274)
  """
  n = _checks.check_positive_int("factorize", "n", n)
  d = _checks.check_positive_int("factorize", "d", d)
  if d == 1:
    return (n,)
  bound = max(2, math.ceil(_BALANCE * n ** (1.0 / d)))
  m = n
  while True:  # ends by m = bound ** d at the latest
    split = _best_split(m, d, bound)
    if split is not None:
      return split
    m += 1


def pad_last(x: jax.Array, size: int) -> jax.Array:
  """``x`` zero-padded along its last axis to ``size`` entries (returned as is when already that size)."""
  if x.shape[-1] == size:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])
