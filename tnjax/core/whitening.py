"""Decompositions in the data metric: minimize the error of a layer's outputs, not of its weights.

A layer ``y = x @ W`` (W of shape (in, out)) with calibration inputs ``X``
(rows are tokens) has output error ``||X (W - W')||_F``. With the input Gram
matrix ``G = X^T X = S S^T``, that is ``||S^T (W - W')||_F``: the weight error
of the *whitened* matrix ``S^T W``. So the best rank-r ``W'`` is the truncated
SVD of ``S^T W`` mapped back by ``S^-T`` (Eckart-Young in the data metric;
SVD-LLM, Wang et al. 2024, "truncation-aware whitening"), and its error is
exactly the discarded singular values of ``S^T W``, which also rank layers
for a budget allocation (`whitened_spectrum`).

Square root and jitter rule. ``S^T = diag(sqrt(l)) Q^T`` from the eigen-
decomposition ``G = Q diag(l) Q^T`` (any square root gives the same optimum;
this one needs no pivoting and traces under ``jit``). Calibration Grams are
often singular (fewer tokens than features, dead features), so eigenvalues
below ``floor * max(l)`` are raised to it (``floor = 1e-6`` by default): the
fit is then exact in the directions the data excites and a weight-error fit,
scaled by the floor, in those it does not. A concrete Gram with an eigenvalue
below ``-floor * max(l)`` is not a Gram matrix (not positive semi-definite
beyond rounding) and is refused.

Embeddings: a table looked up by one-hot tokens has ``G = diag(token counts)``.
Every function here takes a 1-d ``gram`` as that diagonal, so a vocabulary-sized
metric is never formed (rows with a zero count get the floor).

TT-matrix (MPO) layers: the input index of a TT-matrix is split over its
cores, so a full ``S`` does not fold into them. `whitened_ttm_svd` uses a
Kronecker-factored metric ``G ~ G_1 (x) ... (x) G_d``, ``G_k`` the partial
trace of ``G`` over the other input modes (the K-FAC approximation): each
``S_k^T`` acts on one core's input mode, so TTM-SVD runs on the whitened
matrix and ``S_k^-T`` folds back into core k. This is exact when ``G`` is a
Kronecker product and costs one TTM-SVD plus d small eigendecompositions;
alternating least squares in the full metric would cost a linear solve of the
size of a core per sweep step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tnjax.core import _checks
from tnjax.core.btt import BlockTT, check_btt_dims
from tnjax.core.decompositions import ttm_svd
from tnjax.core.ops import balance
from tnjax.core.tensor_train import TTMatrix

FLOOR = 1e-6


def _check_gram(fn: str, gram, n: int) -> jax.Array:
  gram = _checks.check_real_float(fn, "gram", gram)
  if gram.shape not in ((n, n), (n,)):
    raise ValueError(f"{fn}: gram.shape={gram.shape} but ({n}, {n}) is expected (the Gram matrix X^T X of the "
                     f"layer's inputs), or ({n},) for a diagonal one (token counts)")
  _checks.check_finite(fn, "gram", gram)
  return gram


def _check_floor(fn: str, floor) -> None:
  if not (isinstance(floor, (int, float)) and 0 < floor < 1):
    raise ValueError(f"{fn}: floor={floor!r} but 0 < floor < 1 is expected")


def whitening(gram, *, floor: float = FLOOR, fn: str = "whitening") -> tuple[jax.Array, jax.Array]:
  """``(S^T, S^-T)`` with ``S S^T = G`` after the jitter rule (module docstring): ``||x S||`` is the data norm.

  Args:
    gram: (n, n) symmetric positive semi-definite, e.g. ``X^T X``, or (n,) non-negative: a diagonal.
    floor: eigenvalues below ``floor * max eigenvalue`` are raised to it.

  Returns:
    ``s_t`` and ``s_t_inv``, both (n, n), with ``s_t_inv @ s_t = I``; for a 1-d (diagonal) ``gram``, their
    diagonals, (n,) each.

  Raises:
    ValueError: when ``gram`` is not square, not finite, all zero, or (concrete) has an eigenvalue below
      ``-floor * max eigenvalue``.

  Examples:
    >>> import jax.numpy as jnp
    >>> s_t, s_t_inv = whitening(jnp.diag(jnp.array([4.0, 1.0])))
    >>> bool(jnp.allclose(s_t.T @ s_t, jnp.diag(jnp.array([4.0, 1.0])))), bool(jnp.allclose(s_t_inv @ s_t, jnp.eye(2)))
    (True, True)
  """
  gram = _checks.check_real_float(fn, "gram", gram)
  if gram.ndim not in (1, 2) or (gram.ndim == 2 and gram.shape[0] != gram.shape[1]):
    raise ValueError(f"{fn}: gram.shape={gram.shape} but a square matrix (or a 1-d diagonal) is expected")
  _check_floor(fn, floor)
  _checks.check_finite(fn, "gram", gram)
  if gram.ndim == 1:
    lam, q = jnp.sort(gram), None
  else:
    lam, q = jnp.linalg.eigh((gram + gram.T) / 2)
  top = lam[-1]
  if _checks.is_concrete(lam):
    if not float(top) > 0:
      raise ValueError(f"{fn}: gram has no positive eigenvalue (largest {float(top):.3g}); a Gram matrix of "
                       "non-zero inputs is expected")
    if float(lam[0]) < -floor * float(top):
      raise ValueError(f"{fn}: gram has eigenvalue {float(lam[0]):.3g} < -floor * {float(top):.3g}; it is not "
                       "positive semi-definite (not X^T X)")
  if q is None:
    root = jnp.sqrt(jnp.maximum(gram, floor * top))
    return root, 1 / root
  root = jnp.sqrt(jnp.maximum(lam, floor * top))
  return root[:, None] * q.T, q / root[None, :]


def whiten(w, gram, *, floor: float = FLOOR, fn: str = "whiten") -> jax.Array:
  """``S^T w`` with ``S S^T = G`` (`whitening`): the matrix whose Frobenius norm is the output norm ``||X w||_F``,
  so its SVD is the SVD of ``w`` in the data metric (`whitened_spectrum`, `whitened_svd`).

  Args:
    w: (in, out), for a layer ``y = x @ w``.
    gram: (in, in) ``X^T X``, or (in,) a diagonal (token counts).
    floor: the jitter rule of `whitening`.
    fn: the caller named in errors.

  Examples:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 2.0], [0.0, 3.0], [4.0, 1.0]])
    >>> w = jnp.array([[1.0, -1.0], [2.0, 0.5]])
    >>> bool(jnp.isclose(jnp.linalg.norm(whiten(w, x.T @ x)), jnp.linalg.norm(x @ w)))
    True
  """
  w = _check_matrix(fn, w)
  s_t, _ = whitening(_check_gram(fn, gram, w.shape[0]), floor=floor, fn=fn)
  return whiten_with(s_t, w, fn=fn)


def whiten_with(s_t, w, *, fn: str = "whiten_with") -> jax.Array:
  """`whiten` from a square root already computed: ``s_t`` from `whitening` (its diagonal for a 1-d Gram), so
  the layers that read one input (Llama's q/k/v, gate/up) share one eigendecomposition of its Gram.

  Examples:
    >>> import jax.numpy as jnp
    >>> s_t, _ = whitening(jnp.diag(jnp.array([4.0, 1.0])))
    >>> whiten_with(s_t, jnp.ones((2, 3))).shape
    (2, 3)
  """
  if s_t.shape[-1] != w.shape[0]:
    raise ValueError(f"{fn}: the square root is of a ({s_t.shape[-1]}, {s_t.shape[-1]}) Gram but w.shape={w.shape}; "
                     f"a Gram of w's {w.shape[0]} inputs is expected")
  return s_t[:, None] * w if s_t.ndim == 1 else s_t @ w


def whitened_spectrum(w, gram=None, *, floor: float = FLOOR) -> jax.Array:
  """Singular values of the whitened ``S^T W``, descending: keeping rank r loses ``sum(s[r:]**2)`` of squared
  output error (``||X (W - W_r)||_F^2``), the truncation loss an allocation compares across layers. With
  ``gram=None``, those of ``W`` (the weight metric).

  Examples:
    >>> import jax.numpy as jnp
    >>> s = whitened_spectrum(jnp.eye(3), jnp.diag(jnp.array([9.0, 4.0, 1.0])))
    >>> [round(float(v), 4) for v in s]
    [3.0, 2.0, 1.0]
  """
  fn = "whitened_spectrum"
  return _gram_svd(_check_matrix(fn, w) if gram is None else whiten(w, gram, floor=floor, fn=fn),
                   compute_uv=False)[0]


def _gram_svd(a, *, compute_uv: bool = True) -> tuple[jax.Array, jax.Array | None]:
  """Singular values (descending, ``k = min(a.shape)`` of them) and, with ``compute_uv``, orthonormal right
  singular vectors (rows, ``(k, a.shape[1])``) of ``a``, from an eigendecomposition of the smaller of ``a^T a``
  and ``a a^T``: on a GPU an ``eigh`` of ``k^2`` runs about 10x faster than an SVD of ``a``.

  Squaring costs accuracy only where it does not matter here: singular values below ``sqrt(eps) * s[0]`` are
  inexact, but a rank-r projection ``a V_r V_r^T`` built from these vectors loses, beyond the optimum, only the
  second order of their error. For a wide ``a`` the vectors are ``a^T U`` orthonormalized by a QR in the order of
  the singular values, so the first r of them span the top-r right singular subspace at every r."""
  m, n = a.shape
  small = a.T @ a if n <= m else a @ a.T
  if not compute_uv:
    return jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(small)[::-1], 0)), None
  lam, vec = jnp.linalg.eigh(small)
  s, vec = jnp.sqrt(jnp.maximum(lam[::-1], 0)), vec[:, ::-1]
  if n <= m:
    return s, vec.T
  q, r = jnp.linalg.qr(a.T @ vec)  # columns a^T u_i = s_i v_i, in descending order
  return s, (q * jnp.where(jnp.diagonal(r) < 0, -1, 1).astype(q.dtype)[None, :]).T


def whitened_basis(w, gram=None, *, floor: float = FLOOR, fn: str = "whitened_basis") -> tuple[jax.Array, jax.Array]:
  """Singular values ``s`` (descending) and orthonormal right singular vectors ``vt`` (rows) of the whitened
  ``S^T w`` (of ``w`` itself when ``gram`` is None): for every rank r, ``(w @ vt[:r].T) @ vt[:r]`` is the best
  rank-r fit of ``w`` in the data metric and loses ``sum(s[r:]**2)`` of squared output error, so one call serves
  every rank a budget allocation may ask for.

  Args:
    w: (in, out), for a layer ``y = x @ w``.
    gram: None (the weight metric), (in, in) ``X^T X``, or (in,) a diagonal (token counts).
    floor: the jitter rule of `whitening`.
    fn: the caller named in errors.

  Returns:
    ``s`` (k,) and ``vt`` (k, out), ``k = min(in, out)``.

  Complexity:
    One ``eigh`` of ``gram`` and one of a ``min(in, out)``-square matrix (plus a QR when out > in), not an SVD of
    (in, out): about 10x faster on a GPU (the accuracy argument is in ``_gram_svd``).

  Examples:
    >>> import jax.numpy as jnp
    >>> s, vt = whitened_basis(jnp.diag(jnp.array([1.0, 3.0])), jnp.eye(2))
    >>> [round(float(v), 4) for v in s], [round(abs(float(v)), 4) for v in vt[0]]
    ([3.0, 1.0], [0.0, 1.0])
  """
  w = _check_matrix(fn, w)
  return _gram_svd(w if gram is None else whiten(w, gram, floor=floor, fn=fn))


def _check_matrix(fn: str, w) -> jax.Array:
  w = _checks.check_real_float(fn, "w", w)
  if w.ndim != 2:
    raise ValueError(f"{fn}: w.shape={w.shape} but a 2-d matrix (in, out) is expected")
  _checks.check_finite(fn, "w", w)
  return w


def whitened_svd(w, gram, rank: int, *, floor: float = FLOOR) -> tuple[jax.Array, jax.Array]:
  """The rank-``rank`` factors ``a @ b`` of ``w`` that minimize the output error ``||X (w - a @ b)||_F``.

  Args:
    w: (in, out), for a layer ``y = x @ w``.
    gram: (in, in), ``X^T X`` of calibration inputs (float64 accumulation recommended), or (in,): a diagonal
      (token counts, for an embedding table).
    rank: static, 1 <= rank <= min(in, out).
    floor: the jitter rule of `whitening`.

  Returns:
    ``a`` (in, rank) and ``b`` (rank, out); ``b`` has orthonormal rows, ``a = w @ b.T``.

  Raises:
    ValueError: on shapes, a rank out of range, or a gram `whitening` refuses.

  Complexity:
    Two eigendecompositions, of ``gram`` (in^3) and of a ``min(in, out)``-square matrix (`whitened_basis`).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (256, 8)) * jnp.arange(1.0, 9.0)  # correlated scales
    >>> w = jax.random.normal(jax.random.key(1), (8, 6))
    >>> a, b = whitened_svd(w, x.T @ x, rank=3)
    >>> u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    >>> plain = (u[:, :3] * s[:3]) @ vt[:3]
    >>> bool(jnp.linalg.norm(x @ (w - a @ b)) < jnp.linalg.norm(x @ (w - plain)))
    True
  """
  fn = "whitened_svd"
  w = _check_matrix(fn, w)
  gram = _check_gram(fn, gram, w.shape[0])
  full = min(w.shape)
  if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
    raise ValueError(f"{fn}: rank={rank!r} but an int in [1, {full}] is expected (w.shape={w.shape})")
  b = whitened_basis(w, gram, floor=floor, fn=fn)[1][:rank]
  # a = S^-T U_r Sigma_r = S^-T (S^T w) V_r = w V_r: the whitened optimum has an unwhitened closed form.
  return w @ b.T, b


def kronecker_grams(gram, in_dims) -> tuple[jax.Array, ...]:
  """The Kronecker factors ``G_k`` (n_in[k], n_in[k]) of ``gram`` by partial traces over the other input modes
  (row-major: mode 0 is the slowest index). For ``gram = A (x) B`` they are ``tr(B) A`` and ``tr(A) B``.
  A 1-d (diagonal) ``gram`` gives 1-d factors.

  Examples:
    >>> import jax.numpy as jnp
    >>> a, b = jnp.array([[2.0, 1.0], [1.0, 2.0]]), jnp.diag(jnp.array([1.0, 3.0, 5.0]))
    >>> g0, g1 = kronecker_grams(jnp.kron(a, b), (2, 3))
    >>> bool(jnp.allclose(g0, 9.0 * a)), bool(jnp.allclose(g1, 4.0 * b))
    (True, True)
  """
  fn = "kronecker_grams"
  in_dims = _checks.check_dims(fn, "in_dims", in_dims)
  n = math.prod(in_dims)
  gram = _check_gram(fn, gram, n)
  d = len(in_dims)
  if gram.ndim == 1:  # a diagonal: its factors are diagonals, sums over the other modes
    t = gram.reshape(in_dims)
    return tuple(t.sum(axis=tuple(j for j in range(d) if j != k)) for k in range(d))
  t = gram.reshape(in_dims + in_dims)
  letters = "abcdefghijklmnopqrstuvwxyz"
  out = []
  for k in range(d):
    rows = [letters[j] for j in range(d)]
    cols = [letters[j] if j != k else letters[d + k] for j in range(d)]  # traced modes share a letter
    out.append(jnp.einsum(f"{''.join(rows)}{''.join(cols)}->{letters[k]}{letters[d + k]}", t))
  return tuple(out)


def whitened_ttm_svd(w, gram, in_dims, out_dims, max_rank=None, rtol=None, *, floor: float = FLOOR) -> TTMatrix:
  """A TT-matrix fit of ``w`` in the Kronecker-factored data metric of ``gram`` (module docstring).

  Args:
    w: (M, N) with M <= prod(in_dims) (zero rows pad it, as in ``ttm_svd``) and N <= prod(out_dims).
    gram: (M, M), ``X^T X`` of the layer's inputs, or (M,): a diagonal (token counts for an embedding).
    in_dims, out_dims, max_rank, rtol: as in [`ttm_svd`][tnjax.ttm_svd]; ``rtol`` bounds the whitened error.
    floor: the jitter rule of `whitening`, per Kronecker factor.

  Returns:
    A `TTMatrix` whose cores carry ``S_k^-T`` on their input modes, scaled
    to equal norms (`balance`: the whitened fit leaves the calibration's
    scale, ~1e6 on a trained GPT, in its last core, which healing with Adam
    could not train).

  Examples:
    >>> import jax, jax.numpy as jnp, tnjax
    >>> mix = jax.random.normal(jax.random.key(0), (16, 16))
    >>> x = jax.random.normal(jax.random.key(1), (512, 16)) @ mix  # correlated inputs
    >>> w = jax.random.normal(jax.random.key(2), (16, 16))
    >>> err = lambda t: float(jnp.linalg.norm(x @ (w - tnjax.to_dense(t))))
    >>> fit = whitened_ttm_svd(w, x.T @ x, (4, 4), (4, 4), max_rank=4)
    >>> err(fit) < err(tnjax.ttm_svd(w, (4, 4), (4, 4), max_rank=4))
    True
  """
  fn = "whitened_ttm_svd"
  w = _check_matrix(fn, w)
  in_dims = _checks.check_dims(fn, "in_dims", in_dims)
  rows = math.prod(in_dims)
  if w.shape[0] > rows:
    raise ValueError(f"{fn}: w.shape[0]={w.shape[0]} but prod(in_dims)={rows} (in_dims={in_dims}); expected "
                     "w.shape[0] <= prod(in_dims)")
  gram = _check_gram(fn, gram, w.shape[0])
  pad = rows - w.shape[0]  # padding rows (a vocabulary rounded up) are never seen: zero metric, then the floor
  w = jnp.pad(w, ((0, pad), (0, 0)))
  gram = jnp.pad(gram, (0, pad) if gram.ndim == 1 else ((0, pad), (0, pad)))
  factors = [whitening(g, floor=floor, fn=fn) for g in kronecker_grams(gram, in_dims)]
  t = w.reshape(in_dims + (w.shape[1],))
  for k, (s_t, _) in enumerate(factors):  # apply S_k^T on input mode k
    s_t = jnp.diag(s_t) if s_t.ndim == 1 else s_t
    t = jnp.moveaxis(jnp.tensordot(s_t, t, axes=([1], [k])), 0, k)
  whitened = ttm_svd(t.reshape(w.shape), in_dims, out_dims, max_rank=max_rank, rtol=rtol)
  cores = tuple(jnp.einsum("ij,ajbc->aibc", jnp.diag(inv) if inv.ndim == 1 else inv, core)
                for core, (_, inv) in zip(whitened.cores, factors))
  return balance(TTMatrix(cores))


def _btt_setup(fn: str, w, gram, in_dims, out_dims, floor: float):
  """``w`` and the metric ``G + floor * max(diag G) I`` (or ``I``), zero-padded to the BTT dims, as
  ``(w4 (m1, m2, n1, n2), g4 (m1, m2, m1, m2) or None)``."""
  w = _check_matrix(fn, w)
  (m1, m2), (n1, n2), _ = check_btt_dims(fn, in_dims, out_dims, 1)
  if w.shape[0] > m1 * m2 or w.shape[1] > n1 * n2:
    raise ValueError(f"{fn}: w.shape={w.shape} but at most ({m1 * m2}, {n1 * n2}) is expected "
                     f"(in_dims={(m1, m2)}, out_dims={(n1, n2)})")
  _check_floor(fn, floor)
  g = None
  if gram is not None:
    g = _check_gram(fn, gram, w.shape[0])
    g = jnp.diag(g) if g.ndim == 1 else (g + g.T) / 2
    g = jnp.pad(g, ((0, m1 * m2 - w.shape[0]),) * 2).astype(w.dtype)
    # Padding rows are never seen and a calibration Gram is often singular: the floor makes the metric definite
    # (a weight-error fit, scaled by the floor, where the data excites nothing), as `whitening`'s rule does.
    g = g + floor * jnp.max(jnp.diagonal(g)) * jnp.eye(m1 * m2, dtype=g.dtype)
    g = g.reshape(m1, m2, m1, m2)
  w = jnp.pad(w, ((0, m1 * m2 - w.shape[0]), (0, n1 * n2 - w.shape[1])))
  return w.reshape(m1, m2, n1, n2), g


def _btt_blocks(w4, g4, full: int):
  """Per block ``B = w4[:, i2, j1, :]``: the top-``full`` eigenpairs of ``B^T G_i2 B`` (``G_i2`` the metric's
  diagonal block of input block i2; ``B^T B`` without a metric), descending: values (m2, n1, full), vectors
  (m2, n1, n2, full)."""
  if g4 is None:
    gb = w4
  else:
    idx = jnp.arange(w4.shape[1])
    diag = g4[:, idx, :, idx]  # (m2, m1, m1): the diagonal blocks G_i2
    gb = jnp.einsum("yki,iyjl->kyjl", diag, w4)
  m = jnp.einsum("kyjl,kyjn->yjln", w4, gb)
  lam, vec = jnp.linalg.eigh((m + jnp.swapaxes(m, -1, -2)) / 2)
  return jnp.maximum(lam[..., ::-1][..., :full], 0), vec[..., ::-1][..., :full]


def btt_basis(w, in_dims, out_dims, gram=None, *, floor: float = FLOOR,
              fn: str = "btt_basis") -> tuple[jax.Array, jax.Array]:
  """The BTT spectrum (`btt_spectrum`) and the block eigenvectors the fits keep, from one batched ``eigh``: per
  block ``B = w4[:, i2, j1, :]`` the eigendecomposition of ``B^T G_i2 B`` (``B^T B`` with ``gram=None``), as
  `whitened_basis` is for a low-rank fit. One call serves an allocation's spectrum and
  [`whitened_btt`][tnjax.core.whitening.whitened_btt] at any rank (its ``vectors``).

  Args:
    w: (M, N) with M <= m1 m2 and N <= n1 n2 (zero-padded).
    in_dims, out_dims: (m1, m2) and (n1, n2).
    gram: None (the weight metric), (M, M) ``X^T X`` or (M,) a diagonal; made definite as in `whitened_btt`.
    floor: the relative diagonal loading of `whitened_btt`.
    fn: the caller named in errors.

  Returns:
    ``s`` (k,), the spectrum, descending, and ``vectors`` (m2, n1, n2, k), each block's eigenvectors in
    descending order of their values; ``k = min(m1, n2)``.

  Complexity:
    ``m2 n1`` eigendecompositions of size ``n2`` (batched), after ``m^2 n / m2``-ish multiply-adds for the block
    matrices.

  Examples:
    >>> import jax.numpy as jnp
    >>> s, vectors = btt_basis(jnp.eye(4), (2, 2), (2, 2))
    >>> [round(float(v), 4) for v in s], vectors.shape
    ([2.0, 0.0], (2, 2, 2, 2))
  """
  w4, g4 = _btt_setup(fn, w, gram, in_dims, out_dims, floor)
  lam, vectors = _btt_blocks(w4, g4, min(w4.shape[0], w4.shape[3]))
  return jnp.sqrt(jnp.sum(lam, axis=(0, 1))), vectors


def btt_spectrum(w, in_dims, out_dims, gram=None, *, floor: float = FLOOR) -> jax.Array:
  """The BTT analogue of singular values: ``s[k] = sqrt(sum over blocks of block k-th energy)``, descending, so
  that a rank-r BTT fit (`whitened_btt` before its refit, or `tnjax.core.btt.btt_from_dense`) loses
  ``sum(s[r:]**2)`` of squared error: of the weights (``gram=None``), or of the outputs in the metric of the
  gram's diagonal blocks (each input block ``i2`` on its own). `btt_basis`'s first half.

  Examples:
    >>> import jax.numpy as jnp
    >>> s = btt_spectrum(jnp.eye(4), (2, 2), (2, 2))  # each of the identity's 4 blocks has rank 1
    >>> [round(float(v), 4) for v in s]
    [2.0, 0.0]
  """
  return btt_basis(w, in_dims, out_dims, gram, floor=floor, fn="btt_spectrum")[0]


def whitened_btt(w, gram, in_dims, out_dims, rank: int, *, refit: bool = True, floor: float = FLOOR,
                 vectors=None) -> BlockTT:
  """A rank-``rank`` Block-TT fit of ``w`` that minimizes the output error ``||X (w - W_btt)||_F`` on inputs
  whose Gram is ``gram``.

  BTT blocks ``W[:, i2, j1, :]`` (`tnjax.core.btt`) share no parameters, but in the data metric the blocks of
  one output block ``j1`` are coupled through the inputs (``G`` has off-diagonal blocks between input blocks
  i2), so the exact optimum has no closed form. Two steps:

  1. Each block's optimum in the metric of its own diagonal block ``G_i2`` (input blocks taken as
     uncorrelated): ``B V V^T`` with ``V`` the top eigenvectors of ``B^T G_i2 B`` (SVD-LLM per block; with
     ``G = I`` the per-block SVD of `tnjax.core.btt.btt_from_dense`).
  2. With the left cores fixed, the right cores are a linear least-squares problem in the *full* metric, solved
     exactly per output block (a ``(m2 r)``-square system each, from ``G`` alone): it can only lower the output
     error of step 1, and it is where the correlations between input blocks enter.

  Args:
    w: (M, N) with M <= m1 m2 and N <= n1 n2 (zero-padded, as `tnjax.core.btt.btt_from_dense`).
    gram: (M, M) ``X^T X`` of the layer's inputs, or (M,): a diagonal; made definite by adding
      ``floor * max(diag G)`` to its diagonal (padding rows and unexcited directions then get a weight fit).
    in_dims, out_dims: (m1, m2) and (n1, n2).
    rank: static, 1 <= rank <= min(m1, n2).
    refit: run step 2 (the default); False gives step 1 alone.
    floor: the relative diagonal loading above.
    vectors: None, or `btt_basis`'s ``vectors`` of this ``w``, ``gram`` and ``floor``, computed already (for
      the spectrum an allocation or an rtol read): step 1 then reuses them instead of a second ``eigh``.

  Returns:
    A `BlockTT` whose two cores have equal norms per (block, rank index).

  Complexity:
    ``m^2 r n1`` multiply-adds for the systems' matrices (``m = m1 m2``), ``n1`` eigendecompositions of size
    ``m2 r`` and ``m2 n1`` of size ``n2``; memory ``m m2 r`` beyond ``w`` and ``G`` (one output block at a time).

  Examples:
    >>> import jax, jax.numpy as jnp, tnjax
    >>> mix = jax.random.normal(jax.random.key(0), (24, 24))
    >>> x = jax.random.normal(jax.random.key(1), (512, 24)) @ mix  # correlated inputs
    >>> w = jax.random.normal(jax.random.key(2), (24, 20))
    >>> err = lambda b: float(jnp.linalg.norm(x @ (w - tnjax.core.btt.btt_to_dense(b))))
    >>> fit = whitened_btt(w, x.T @ x, (4, 6), (4, 5), rank=2)
    >>> err(fit) < err(tnjax.core.btt.btt_from_dense(w, (4, 6), (4, 5), rank=2))
    True
  """
  fn = "whitened_btt"
  if gram is None:
    raise ValueError(f"{fn}: gram=None but the input Gram X^T X is expected (btt_from_dense fits the weights)")
  in_dims, out_dims, rank = check_btt_dims(fn, in_dims, out_dims, rank)
  w4, g4 = _btt_setup(fn, w, gram, in_dims, out_dims, floor)
  m2, n2 = in_dims[1], out_dims[1]
  if vectors is None:
    _, v = _btt_blocks(w4, g4, rank)  # (m2, n1, n2, r)
  else:
    want = (m2, out_dims[0], n2, min(in_dims[0], n2))
    if tuple(vectors.shape) != want:
      raise ValueError(f"{fn}: vectors.shape={tuple(vectors.shape)} but {want} is expected (btt_basis of w and "
                       "gram)")
    v = vectors[..., :rank]
  left = jnp.einsum("iyjl,yjla->yiaj", w4, v)  # (m2, m1, r, n1)
  right = jnp.transpose(v, (1, 3, 0, 2))  # (n1, r, m2, n2)
  if refit:
    gw = jnp.einsum("xyuv,uvjl->xyjl", g4, w4)  # G W, (m1, m2, n1, n2)
    eps = 1e3 * jnp.finfo(w4.dtype).eps

    def solve(args):  # one output block j1: min over R_j1 of ||S^T (W_j1 - A R_j1)||, A = blockdiag(L[i2, :, :, j1])
      lj, gwj = args  # (m2, m1, r), (m1, m2, n2)
      p = jnp.einsum("xyuv,vua->xyva", g4, lj)  # G A, (m1, m2, m2, r)
      h = jnp.einsum("yxb,xyva->ybva", lj, p).reshape(m2 * rank, m2 * rank)  # A^T G A
      rhs = jnp.einsum("yxb,xyl->ybl", lj, gwj).reshape(m2 * rank, n2)  # A^T G W_j1
      lam, q = jnp.linalg.eigh((h + h.T) / 2)
      inv = jnp.where(lam > eps * lam[-1], 1 / jnp.where(lam > 0, lam, 1), 0)
      x = q @ (inv[:, None] * (q.T @ rhs))  # the least-norm solution where A^T G A is singular
      return jnp.transpose(x.reshape(m2, rank, n2), (1, 0, 2))  # (r, m2, n2)

    right = jax.lax.map(solve, (jnp.transpose(left, (3, 0, 1, 2)), jnp.transpose(gw, (2, 0, 1, 3))))
  # Equal norms per (i2, a, j1) pair: the metric's scale (~1e6 for a trained model's Gram) stays out of the cores.
  nl = jnp.linalg.norm(left, axis=1)  # (m2, r, n1)
  nr = jnp.transpose(jnp.linalg.norm(right, axis=3), (2, 1, 0))  # (m2, r, n1)
  ok = (nl > 0) & (nr > 0)
  c = jnp.where(ok, jnp.sqrt(jnp.where(ok, nr, 1) / jnp.where(ok, nl, 1)), 1)
  left = left * c[:, None, :, :]
  right = right / jnp.transpose(c, (2, 1, 0))[..., None]
  return BlockTT((left, right))
