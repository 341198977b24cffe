"""Dense -> TT decompositions (TT-SVD, TTM-SVD), orthogonalization and rounding.

Rank selection
--------------
``max_rank`` caps ranks and is static: it fixes core shapes, so everything
traces under ``jax.jit``. A cap larger than the largest useful rank at a bond
(``min(prod(left dims), prod(right dims))``) is clamped to it.

``rtol`` asks for ``||x - to_dense(tt)||_F <= rtol * ||x||_F`` (`truncation_rank`). The budget is
split evenly over the d - 1 truncations (each may drop singular values of
total energy ``(rtol * ||x||)^2 / (d - 1)``), which gives the bound by
Oseledets (2011), Theorem 2.2. Where the ranks it needs are chosen depends on
whether the values are known:

* **eagerly** (concrete arrays), the singular values are read on the host and
  each core is sliced to the rank needed, so the result has the smallest
  ranks that meet the bound under this budget split;
* **under jit / vmap / grad** (tracers), shapes cannot depend on values: each
  bond keeps a fixed buffer of ``min(max_rank, full rank)`` columns and the
  columns past the rank needed are zeroed by a mask. The represented tensor
  is the same as in the eager case; its cores are zero-padded.
  ``truncate`` on the eager result (concrete values) strips the padding.

With both ``max_rank`` and ``rtol``, the cap wins: the rank is the smaller of
the two, and the bound holds only when the cap does not bind.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tnjax.core import _checks
from tnjax.core.tensor_train import TT, TensorTrain, TTMatrix, as_tt, check_tt, like, split_modes


def _thin_svd(a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Thin SVD that reduces a very tall or wide matrix with a QR first.

  TT-SVD unfoldings are often far from square (216 x 178752 for the first
  step on GPT-2's embedding); LAPACK's SVD on such a matrix took 7.0 s on
  CPU where QR then SVD of the small triangle took 1.7 s, with the same
  backward stability.
  """
  m, n = a.shape
  if n > 2 * m:
    q, r = jnp.linalg.qr(a.T)
    u, s, vt = jnp.linalg.svd(r.T, full_matrices=False)
    return u, s, vt @ q.T
  if m > 2 * n:
    q, r = jnp.linalg.qr(a)
    u, s, vt = jnp.linalg.svd(r, full_matrices=False)
    return q @ u, s, vt
  return jnp.linalg.svd(a, full_matrices=False)


def _svd_factors(a: jax.Array):
  """Squared singular values (descending) and ``r -> (u[:, :r], s[:r] vt[:r])`` from a thin SVD."""
  u, s, vt = _thin_svd(a)
  return s * s, lambda r: (u[:, :r], s[:r, None] * vt[:r])


_HIGHEST = jax.lax.Precision.HIGHEST


def _gram_factors(a: jax.Array):
  """The same from the eigendecomposition of the smaller Gram matrix (``a a^T`` or ``a^T a``).

  One matmul and a small ``eigh`` instead of an SVD of a very wide or tall
  unfolding: much faster on GPUs, with the leading singular vectors as
  accurate as an SVD's; singular values below about ``sqrt(eps) * s_max``
  are not resolved, which matters only for near-exact reconstructions.
  """
  m, n = a.shape
  if m <= n:
    lam, v = jnp.linalg.eigh(jnp.matmul(a, a.T, precision=_HIGHEST))
    u = v[:, ::-1]
    # sv = u^T a: the rows s_i v_i^T, no division by small singular values.
    return jnp.maximum(lam[::-1], 0), lambda r: (u[:, :r], jnp.matmul(u[:, :r].T, a, precision=_HIGHEST))
  lam, v = jnp.linalg.eigh(jnp.matmul(a.T, a, precision=_HIGHEST))
  v = v[:, ::-1]

  def factors(r):
    # a v_r = q rr is orthonormalized by QR: u = q, and a v_r v_r^T = q (rr v_r^T).
    q, rr = jnp.linalg.qr(jnp.matmul(a, v[:, :r], precision=_HIGHEST))
    return q, jnp.matmul(rr, v[:, :r].T, precision=_HIGHEST)

  return jnp.maximum(lam[::-1], 0), factors


METHODS = ("svd", "gram")


def truncation_rank(s2, rtol: float, *, norm2=None, num_bonds: int = 1):
  """The smallest rank ``r >= 1`` whose discarded energy ``sum(s2[r:])`` is at most ``(rtol**2 / num_bonds) *
  norm2``: the one truncation rule of every fit (TT-SVD, `truncate`, the low-rank, BTT and embedding fits of
  `tnjax.compress`).

  Keeping that rank bounds the relative Frobenius error of one truncation by ``rtol / sqrt(num_bonds)``; TT-SVD
  splits its budget over its ``d - 1`` bonds (module docstring), a single matrix has ``num_bonds=1``.

  Args:
    s2: squared singular values (or any per-rank energies, such as `btt_spectrum`'s squared), descending, (k,).
      A NumPy array is counted on the host in its own dtype (the fits pass float64); a JAX array on its device,
      and under ``jit`` too (the rank is then a traced int, for a mask).
    rtol: relative Frobenius error bound, >= 0.
    norm2: the squared norm ``rtol`` is relative to; None: ``sum(s2)``, the matrix's own. TT-SVD passes the
      whole tensor's, of which a later bond's unfolding holds only part.
    num_bonds: how many truncations share the budget.

  Returns:
    The rank: an int-valued scalar array, at most ``k`` (a tail of zero energy, ``sum(s2[k:])``, always fits).

  Examples:
    >>> import numpy as np
    >>> int(truncation_rank(np.array([9.0, 4.0, 1.0]), rtol=0.3))  # drops 1 of 14: 1 <= 0.09 * 14
    2
  """
  norm2 = s2.sum() if norm2 is None else norm2
  delta2 = (rtol * rtol / num_bonds) * norm2
  # Array methods, not jnp functions: a NumPy float64 spectrum stays float64 on the host (jnp would round it
  # to float32 without x64), a JAX one stays traceable. tail2[i] = ||s[i:]||^2 never increases with i.
  tail2 = s2[::-1].cumsum()[::-1]
  return jnp.maximum((tail2 > delta2).sum(), 1)


def _truncated_svd(a: jax.Array, cap: int | None, method: str = "svd", *, rtol: float | None = None, norm2=None,
                   num_bonds: int = 1) -> tuple[jax.Array, jax.Array]:
  """Factors a (m, n) matrix as u (m, r) @ sv (r, n), truncated by a cap and a tolerance.

  Args:
    a: the matrix.
    cap: static upper bound on r, or None.
    method: "svd" (LAPACK / cuSOLVER SVD) or "gram" (eigh of the smaller Gram matrix).
    rtol, norm2, num_bonds: the tolerance of `truncation_rank` (None: none).

  Returns:
    ``(u, sv)`` with orthonormal (or, under the mask, zero-padded) columns in u.
  """
  s2, factors = (_gram_factors if method == "gram" else _svd_factors)(a)
  r = s2.shape[0] if cap is None else min(cap, s2.shape[0])
  mask = None
  if rtol is not None:
    needed = truncation_rank(s2, rtol, norm2=norm2, num_bonds=num_bonds)
    if _checks.is_concrete(needed):
      r = min(r, int(needed))
    else:
      mask = (jnp.arange(r) < needed).astype(a.dtype)
  u, sv = factors(r)
  if mask is not None:
    u, sv = u * mask[None, :], sv * mask[:, None]
  return u, sv


def _check_method(fn: str, method: str) -> str:
  if method not in METHODS:
    raise ValueError(f"{fn}: method={method!r} but one of {METHODS} is expected")
  return method


def tt_svd(x, max_rank=None, rtol=None, method: str = "svd") -> TensorTrain:
  """Decomposes a dense tensor into TT format with TT-SVD (Oseledets 2011).

  Args:
    x: array of shape (n[0], ..., n[d-1]), real floating (integers promoted).
    max_rank: static cap on the ranks: an int for every bond or a tuple of
      d - 1 ints, one per bond. Caps above the largest useful rank are clamped.
    rtol: relative Frobenius error bound, see the module docstring for where
      ranks are chosen (host when eager, a masked fixed buffer under jit).
    method: "svd" (default), or "gram": each step from the eigendecomposition
      of the unfolding's smaller Gram matrix, several times faster on GPUs for
      the very wide first unfoldings; truncation errors match "svd" to well
      under 1% (tested), but tiny singular values are not resolved, so exact
      (full-rank) reconstructions are accurate only to about sqrt(eps).

  Returns:
    A `TensorTrain` with cores (r[k], n[k], r[k+1]) and
    ``r[k] <= min(max_rank[k-1], prod(n[:k]), prod(n[k:]))``.

  Raises:
    ValueError: on a scalar or complex ``x``, a non-positive rank, a
      per-bond tuple of the wrong length, a negative rtol, or (for concrete
      input) NaN/Inf entries.

  Complexity:
    d - 1 SVDs; the first, of an (n[0], prod(n[1:])) matrix, dominates:
    O(n[0]^2 prod(n)) time for a wide unfolding.

  Examples:
    >>> import jax.numpy as jnp, tnjax
    >>> x = jnp.arange(24.0).reshape(2, 3, 4)
    >>> tt = tnjax.tt_svd(x, max_rank=2)
    >>> tt.ranks
    (1, 2, 2, 1)
    >>> bool(jnp.allclose(tnjax.to_dense(tt), x, atol=1e-4))
    True
  """
  fn = "tt_svd"
  x = _checks.check_real_float(fn, "x", x)
  if x.ndim == 0:
    raise ValueError(f"{fn}: x.shape=() but a tensor with at least one mode is expected")
  dims = x.shape
  caps = _checks.bond_caps(fn, "max_rank", max_rank, len(dims) - 1)
  rtol = _checks.check_rtol(fn, rtol)
  method = _check_method(fn, method)
  _checks.check_finite(fn, "x", x)
  x, exponent = _power_of_two_scaled(x)
  norm2 = jnp.sum(x * x)

  cores = []
  rest = x.reshape(1, -1)
  for k, n in enumerate(dims[:-1]):
    r_prev = rest.shape[0]
    u, rest = _truncated_svd(rest.reshape(r_prev * n, -1), caps[k], method, rtol=rtol, norm2=norm2,
                             num_bonds=len(dims) - 1)
    cores.append(u.reshape(r_prev, n, u.shape[1]))
  cores.append(rest.reshape(rest.shape[0], dims[-1], 1))
  return TensorTrain(_spread_exponent(cores, exponent))


def balanced_svd(a, max_rank=None, rtol=None) -> tuple[jax.Array, jax.Array]:
  """Truncated SVD ``U S V^T`` of a matrix, split with balanced scales: ``u = U sqrt(S)``, ``v = sqrt(S) V^T``.

  The rank is chosen as `tt_svd`'s of the matrix (a cap and/or a relative Frobenius tolerance; exact with
  neither), and so is where: eagerly ``u`` and ``v`` have the rank needed, under ``jit`` the masked buffer.

  Args:
    a: (m, n), real floating (integers promoted).
    max_rank: static cap on r.
    rtol: relative Frobenius error bound ``||a - u v||_F <= rtol ||a||_F``.

  Returns:
    ``u`` (m, r) and ``v`` (r, n), column k of ``u`` and row k of ``v`` both of norm ``sqrt(s_k)``.

  Raises:
    ValueError: ``a`` is not 2-d, and as `tt_svd`.

  Complexity:
    One thin SVD of ``a``: O(m n min(m, n)).

  Examples:
    >>> import jax.numpy as jnp
    >>> u, v = balanced_svd(jnp.diag(jnp.array([4.0, 1.0, 0.0])), max_rank=2)
    >>> u.shape, v.shape, [round(float(x), 4) for x in jnp.linalg.norm(u, axis=0)]
    ((3, 2), (2, 3), [2.0, 1.0])
  """
  fn = "balanced_svd"
  a = jnp.asarray(a)
  if a.ndim != 2:
    raise ValueError(f"{fn}: a.shape={a.shape} but a 2-d matrix (m, n) is expected")
  left, right = tt_svd(a, max_rank=max_rank, rtol=rtol).cores
  sv = right[..., 0]  # (r, n) = S V^T, rows scaled by the singular values
  root = jnp.sqrt(jnp.linalg.norm(sv, axis=1))
  safe = jnp.where(root > 0, root, 1)
  return left[0] * root[None, :], sv / safe[:, None]


_SCALE_BEYOND = 60  # |x| past 2**60 or below 2**-60 is scaled before the SVDs; between, nothing changes


def _power_of_two_scaled(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``x * 2**-e`` and ``e``, with ``e`` the exponent of ``max |x|`` when that is far from 1 (else 0).

  Finite values near the float32 maximum overflow the sums of squares inside the SVDs (and the tolerance's
  norm), which gave non-finite cores; scaling by a power of two is exact, and works under jit. The factor is
  applied in two halves so that neither underflows to a subnormal (which a CPU may flush to zero).
  """
  amax = jnp.max(jnp.abs(x))
  far = (amax > 2.0**_SCALE_BEYOND) | ((amax < 2.0**-_SCALE_BEYOND) & (amax > 0))
  exponent = jnp.where(far, jnp.floor(jnp.log2(jnp.where(amax > 0, amax, 1))), 0).astype(x.dtype)
  half = jnp.floor(exponent / 2)
  return x * jnp.exp2(-half) * jnp.exp2(half - exponent), exponent


def _spread_exponent(cores: list[jax.Array], exponent: jax.Array) -> tuple[jax.Array, ...]:
  """The cores of ``x`` from those of ``x * 2**-exponent``: the factor spread over the cores in integer powers of
  two (no core alone could hold ``max |x|`` times the norm), the last core taking the remainder."""
  d = len(cores)
  share = jnp.floor(exponent / d)
  return tuple(c * jnp.exp2(share if k < d - 1 else exponent - (d - 1) * share) for k, c in enumerate(cores))


def ttm_svd(w, in_dims, out_dims, max_rank=None, rtol=None, method: str = "svd") -> TTMatrix:
  """Decomposes a matrix into TT-matrix (MPO) format by interleaving row and column modes.

  The matrix is zero-padded to ``(prod(in_dims), prod(out_dims))`` when it is
  smaller (e.g. a vocabulary of 50257 rows with ``in_dims`` multiplying to
  50320); ``to_dense`` of the result then has the padded shape, and its
  top-left ``w.shape`` block approximates ``w``.

  Args:
    w: matrix of shape (M, N) with M <= prod(in_dims), N <= prod(out_dims).
    in_dims: row factors (n_in[0], ..., n_in[d-1]); see [`factorize`][tnjax.factorize].
    out_dims: column factors, same length d as ``in_dims``.
    max_rank: static cap on ranks (int or d - 1 ints), as in `tt_svd`.
    rtol: relative Frobenius error bound on the (padded) matrix, as in
      `tt_svd`; padding adds no error, so it bounds ``||w - W||/||w||``.
    method: "svd" or "gram", as in `tt_svd`.

  Returns:
    A `TTMatrix` with cores (r[k], n_in[k], n_out[k], r[k+1]).

  Raises:
    ValueError: when ``w`` is not 2-d, is larger than the dims' products, the
      dims differ in length, or on the argument errors of `tt_svd`.

  Complexity:
    One TT-SVD of a d-mode tensor with modes n_in[k] * n_out[k].

  Examples:
    >>> import jax.numpy as jnp, tnjax
    >>> w = jnp.eye(6)
    >>> ttm = tnjax.ttm_svd(w, in_dims=(2, 3), out_dims=(2, 3), rtol=1e-6)  # I6 = I2 (x) I3
    >>> ttm.ranks, ttm.shape
    ((1, 1, 1), (6, 6))
  """
  fn = "ttm_svd"
  w = _checks.check_real_float(fn, "w", w)
  in_dims = _checks.check_dims(fn, "in_dims", in_dims)
  out_dims = _checks.check_dims(fn, "out_dims", out_dims)
  if w.ndim != 2:
    raise ValueError(f"{fn}: w.shape={w.shape} but a 2-d matrix is expected")
  if len(in_dims) != len(out_dims):
    raise ValueError(
        f"{fn}: len(in_dims)={len(in_dims)} but len(out_dims)={len(out_dims)}; "
        f"both need one entry per core (in_dims={in_dims}, out_dims={out_dims})")
  rows, cols = math.prod(in_dims), math.prod(out_dims)
  if w.shape[0] > rows:
    raise ValueError(f"{fn}: w.shape[0]={w.shape[0]} but prod(in_dims)={rows} (in_dims={in_dims}); "
                     "expected w.shape[0] <= prod(in_dims)")
  if w.shape[1] > cols:
    raise ValueError(f"{fn}: w.shape[1]={w.shape[1]} but prod(out_dims)={cols} (out_dims={out_dims}); "
                     "expected w.shape[1] <= prod(out_dims)")
  d = len(in_dims)
  # Checked here so that errors name ttm_svd, not tt_svd.
  _checks.bond_caps(fn, "max_rank", max_rank, d - 1)
  _checks.check_rtol(fn, rtol)
  _check_method(fn, method)
  _checks.check_finite(fn, "w", w)
  w = jnp.pad(w, ((0, rows - w.shape[0]), (0, cols - w.shape[1])))
  x = w.reshape(in_dims + out_dims)
  x = x.transpose([p for k in range(d) for p in (k, d + k)])
  x = x.reshape([i * o for i, o in zip(in_dims, out_dims)])
  return split_modes(tt_svd(x, max_rank=max_rank, rtol=rtol, method=method), in_dims, out_dims)


def _orthogonalize_left(cores: list[jax.Array], stop: int) -> None:
  """QR sweep making cores[0:stop] left-orthogonal, in place; the norm moves to cores[stop]."""
  for k in range(stop):
    r, n, r_next = cores[k].shape
    q, rr = jnp.linalg.qr(cores[k].reshape(r * n, r_next))
    cores[k] = q.reshape(r, n, q.shape[1])
    cores[k + 1] = jnp.tensordot(rr, cores[k + 1], axes=1)


def _orthogonalize_right(cores: list[jax.Array], stop: int) -> None:
  """QR sweep making cores[stop+1:] right-orthogonal, in place; the norm moves to cores[stop]."""
  for k in range(len(cores) - 1, stop, -1):
    r, n, r_next = cores[k].shape
    q, rr = jnp.linalg.qr(cores[k].reshape(r, n * r_next).T)
    cores[k] = q.T.reshape(q.shape[1], n, r_next)
    cores[k - 1] = jnp.tensordot(cores[k - 1], rr.T, axes=1)


def orthogonalize(tt: TT, direction: str = "left") -> TT:
  """Makes all cores but one orthogonal with a QR sweep; the tensor is unchanged.

  ``direction="left"``: cores 0..d-2 become left-orthogonal (each core,
  reshaped to (r[k] * n[k], r[k+1]), has orthonormal columns) and the norm of
  the tensor is the Frobenius norm of the last core. ``direction="right"``:
  cores 1..d-1 become right-orthogonal (reshaped to (r[k], n[k] * r[k+1]),
  orthonormal rows) and the norm sits in the first core. Ranks may shrink to
  ``min(r[k] * n[k], r[k+1])`` where a bond was larger than useful. For a
  TTMatrix, n[k] is n_in[k] * n_out[k].

  Args:
    tt: a TensorTrain or TTMatrix.
    direction: "left" or "right".

  Complexity:
    d QR factorizations, O(d n r^3).

  Examples:
    >>> import jax, jax.numpy as jnp, tnjax
    >>> a = tnjax.random_tt(jax.random.key(0), (4, 5, 6), rank=3)
    >>> q = tnjax.orthogonalize(a, "left")
    >>> g = q.cores[0].reshape(-1, q.cores[0].shape[-1])
    >>> bool(jnp.allclose(g.T @ g, jnp.eye(g.shape[1]), atol=1e-5))
    True
    >>> bool(jnp.allclose(tnjax.to_dense(q), tnjax.to_dense(a), atol=1e-5))
    True
  """
  fn = "orthogonalize"
  check_tt(fn, "tt", tt)
  cores = list(as_tt(tt).cores)
  if direction == "left":
    _orthogonalize_left(cores, len(cores) - 1)
  elif direction == "right":
    _orthogonalize_right(cores, 0)
  else:
    raise ValueError(f"{fn}: direction={direction!r} but 'left' or 'right' is expected")
  return like(tt, TensorTrain(tuple(cores)))


def truncate(tt: TT, max_rank=None, rtol=None) -> TT:
  """TT rounding: lowers ranks with a right-to-left QR sweep, then a left-to-right SVD sweep.

  The result satisfies ``||tt - out||_F <= rtol * ||tt||_F`` and
  ``ranks <= max_rank`` (see the module docstring for the cap/tolerance rules
  and where ranks are chosen). Rounding a sum ``add(a, a)`` gives back a's ranks.

  Args:
    tt: a TensorTrain or TTMatrix.
    max_rank: static cap on ranks (int or d - 1 ints).
    rtol: relative Frobenius error bound.

  Returns:
    The same format as ``tt``, with lowered ranks.

  Complexity:
    d QRs and d SVDs of (r n, r) matrices: O(d n r^3).

  Examples:
    >>> import jax, tnjax
    >>> a = tnjax.random_tt(jax.random.key(0), (4, 5, 6), rank=3)
    >>> tnjax.truncate(tnjax.add(a, a), rtol=1e-5).ranks  # a + a has a's ranks
    (1, 3, 3, 1)
  """
  fn = "truncate"
  check_tt(fn, "tt", tt)
  caps = _checks.bond_caps(fn, "max_rank", max_rank, tt.ndim - 1)
  rtol = _checks.check_rtol(fn, rtol)
  cores = list(as_tt(tt).cores)
  _orthogonalize_right(cores, 0)
  norm2 = jnp.sum(cores[0] * cores[0])
  for k in range(len(cores) - 1):
    r, n, r_next = cores[k].shape
    u, sv = _truncated_svd(cores[k].reshape(r * n, r_next), caps[k], rtol=rtol, norm2=norm2,
                           num_bonds=len(cores) - 1)
    cores[k] = u.reshape(r, n, u.shape[1])
    cores[k + 1] = jnp.tensordot(sv, cores[k + 1], axes=1)
  return like(tt, TensorTrain(tuple(cores)))
