"""Contractions and algebra on TensorTrain / TTMatrix pytrees.

All functions are pure, shape-static and safe under jit, vmap and grad. The
contraction front door, [`tnjax.matvec`][tnjax.matvec], lives in
[`tnjax.core.contraction`][tnjax.core.contraction] with its paths and the cost model that picks one.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import opt_einsum

from tnjax.core import _checks
from tnjax.core.btt import BlockTT, btt_to_dense
from tnjax.core.tensor_train import TT, TensorTrain, TTMatrix, as_tt, check_tt, like


def to_dense(tt: TT) -> jax.Array:
  """Contracts all cores into the dense tensor or matrix.

  Returns:
    For a TensorTrain, an array of shape ``dims``; for a TTMatrix, a matrix
    of shape ``(prod(in_dims), prod(out_dims))``; for a
    `tnjax.core.btt.BlockTT`, its (m, n) matrix.

  Complexity:
    O(prod(n) * r^2) time, O(prod(n) * r) memory at the last step.

  Examples:
    >>> import jax.numpy as jnp, tnjax
    >>> x = jnp.arange(8.0).reshape(2, 2, 2)
    >>> bool(jnp.allclose(tnjax.to_dense(tnjax.tt_svd(x)), x, atol=1e-5))
    True
  """
  if isinstance(tt, BlockTT):
    return btt_to_dense(tt)
  check_tt("to_dense", "tt", tt)
  flat = as_tt(tt)
  out = flat.cores[0].reshape(-1, flat.cores[0].shape[-1])  # (n0, r1)
  for core in flat.cores[1:]:
    out = jnp.tensordot(out, core, axes=1).reshape(-1, core.shape[-1])
  if isinstance(tt, TensorTrain):
    return out.reshape(tt.dims)
  d = tt.ndim
  out = out.reshape([m for pair in zip(tt.in_dims, tt.out_dims) for m in pair])
  out = out.transpose(list(range(0, 2 * d, 2)) + list(range(1, 2 * d, 2)))
  return out.reshape(tt.shape)


@functools.lru_cache(maxsize=256)
def _matvec_expression(core_shapes: tuple[tuple[int, ...], ...], batch: int):
  """Subscripts and the cheapest contraction path for x (batch, *in_dims) with the cores."""
  d = len(core_shapes)
  sym = opt_einsum.get_symbol
  b = sym(0)
  ins = [sym(1 + k) for k in range(d)]
  outs = [sym(1 + d + k) for k in range(d)]
  bonds = [sym(1 + 2 * d + k) for k in range(d + 1)]
  terms, shapes = [b + "".join(ins)], [(batch,) + tuple(s[1] for s in core_shapes)]
  for k, s in enumerate(core_shapes):
    left = bonds[k] if k > 0 else ""
    right = bonds[k + 1] if k < d - 1 else ""
    terms.append(left + ins[k] + outs[k] + right)
    shapes.append(s[1:3] if d == 1 else (s[1:] if k == 0 else (s[:3] if k == d - 1 else s)))
  subscripts = ",".join(terms) + "->" + b + "".join(outs)
  path, info = opt_einsum.contract_path(subscripts, *shapes, shapes=True, optimize="dp")
  return subscripts, path, info


def _squeeze_boundary(cores: tuple[jax.Array, ...]) -> list[jax.Array]:
  if len(cores) == 1:
    return [cores[0][0, :, :, 0]]
  return [cores[0][0]] + list(cores[1:-1]) + [cores[-1][..., 0]]


def check_matvec_args(fn: str, ttm, x: jax.Array) -> None:
  """Checks that ``ttm`` is a TTMatrix and ``x`` has shape (..., prod(in_dims))."""
  if not isinstance(ttm, TTMatrix):
    raise ValueError(f"{fn}: ttm is a {type(ttm).__name__} but a TTMatrix is expected")
  _checks.check_last_dim(fn, x, ttm.shape[0], "prod(in_dims)", f" (in_dims={ttm.in_dims})")


def matvec_plan(ttm: TTMatrix, batch: int) -> opt_einsum.contract.PathInfo:
  """The contraction plan of path ``"einsum"`` (`matvec_einsum`) for ``batch`` rows: path, FLOPs, largest
  intermediate.

  Useful to see the fewest-FLOPs order, e.g. ``print(matvec_plan(w, 16384))``; the paths that
  [`tnjax.matvec`][tnjax.matvec] picks by default come from the cost model of
  [`tnjax.core.contraction.cost`][tnjax.core.contraction.cost] instead.

  Examples:
    >>> import jax, tnjax
    >>> ttm = tnjax.random_ttm(jax.random.key(0), (8, 8, 12), (12, 16, 16), rank=8)
    >>> tnjax.matvec_plan(ttm, batch=1).opt_cost < tnjax.matvec_plan(ttm, batch=1024).opt_cost
    True
  """
  return _matvec_expression(tuple(c.shape for c in ttm.cores), batch)[2]


def matvec_einsum(ttm: TTMatrix, x: jax.Array, *, precision=None) -> jax.Array:
  """``x @ to_dense(ttm)`` in opt_einsum's fewest-FLOPs contraction order (path ``"einsum"`` of
  [`tnjax.matvec`][tnjax.matvec]); plain autodiff, forward and reverse mode.

  The order over ``x`` and the cores is chosen at trace time by opt_einsum's
  dynamic-programming optimizer from the static shapes, so one token and 16k
  tokens may take different orders; see `matvec_plan`. FLOPs are not time on
  a GPU (small contractions are memory-bound), which is why the default path
  is the cost model's.

  Args:
    ttm: cores (r[k], n_in[k], n_out[k], r[k+1]).
    x: (..., prod(in_dims)).
    precision: passed to ``jnp.einsum``.

  Returns:
    (..., prod(out_dims)).

  Complexity:
    For one row, sequential core-by-core order: sum over k of
    ``prod(out_dims[:k+1]) * prod(in_dims[k:]) * r[k] * r[k+1]`` multiply-adds.
  """
  x = jnp.asarray(x)
  check_matvec_args("matvec_einsum", ttm, x)
  batch_shape = x.shape[:-1]
  batch = math.prod(batch_shape)
  subscripts, path, _ = _matvec_expression(tuple(c.shape for c in ttm.cores), batch)
  out = jnp.einsum(subscripts, x.reshape((batch,) + ttm.in_dims), *_squeeze_boundary(ttm.cores),
                   optimize=path, precision=precision)
  return out.reshape(batch_shape + (ttm.shape[1],))


def _modes(t: TT):
  return t.dims if isinstance(t, TensorTrain) else (t.in_dims, t.out_dims)


def _check_same_modes(fn: str, a: TT, b: TT) -> None:
  check_tt(fn, "a", a)
  check_tt(fn, "b", b)
  if type(a) is not type(b):
    raise ValueError(f"{fn}: a is a {type(a).__name__} but b is a {type(b).__name__}; expected the same format")
  if _modes(a) != _modes(b):
    what = "dims" if isinstance(a, TensorTrain) else "(in_dims, out_dims)"
    raise ValueError(f"{fn}: a has {what}={_modes(a)} but b has {what}={_modes(b)}; expected equal mode sizes")


def transpose(ttm: TTMatrix) -> TTMatrix:
  """The TT-matrix of ``W.T``: swaps each core's input and output modes.

  Examples:
    >>> import jax, jax.numpy as jnp, tnjax
    >>> ttm = tnjax.random_ttm(jax.random.key(0), (2, 3), (4, 5), rank=2)
    >>> bool(jnp.allclose(tnjax.to_dense(tnjax.transpose(ttm)), tnjax.to_dense(ttm).T))
    True
  """
  return TTMatrix(tuple(c.transpose(0, 2, 1, 3) for c in ttm.cores))


def add(a: TT, b: TT) -> TT:
  """The sum ``a + b`` in TT format; ranks add (r_a[k] + r_b[k]). Follow with `truncate`.

  Raises:
    ValueError: when the formats or mode sizes differ.

  Examples:
    >>> import jax, jax.numpy as jnp, tnjax
    >>> a = tnjax.random_tt(jax.random.key(0), (3, 4, 5), rank=2)
    >>> s = tnjax.add(a, a)
    >>> s.ranks, bool(jnp.allclose(tnjax.to_dense(s), 2 * tnjax.to_dense(a), atol=1e-5))
    ((1, 4, 4, 1), True)
  """
  _check_same_modes("add", a, b)
  ca, cb = as_tt(a).cores, as_tt(b).cores
  d = len(ca)
  if d == 1:
    return like(a, TensorTrain((ca[0] + cb[0],)))
  cores = [jnp.concatenate([ca[0], cb[0]], axis=2)]
  for x, y in zip(ca[1:-1], cb[1:-1]):
    top = jnp.pad(x, ((0, 0), (0, 0), (0, y.shape[2])))
    bottom = jnp.pad(y, ((0, 0), (0, 0), (x.shape[2], 0)))
    cores.append(jnp.concatenate([top, bottom], axis=0))
  cores.append(jnp.concatenate([ca[-1], cb[-1]], axis=0))
  return like(a, TensorTrain(tuple(cores)))


def scale(tt: TT, alpha) -> TT:
  """``alpha * tt``, applied to the first core (ranks unchanged). ``alpha`` is a scalar.

  Examples:
    >>> import jax, jax.numpy as jnp, tnjax
    >>> a = tnjax.random_tt(jax.random.key(0), (3, 4), rank=2)
    >>> bool(jnp.allclose(tnjax.to_dense(tnjax.scale(a, -2.0)), -2 * tnjax.to_dense(a)))
    True
  """
  check_tt("scale", "tt", tt)
  alpha = jnp.asarray(alpha)
  if alpha.ndim != 0:
    raise ValueError(f"scale: alpha.shape={alpha.shape} but a scalar is expected")
  return type(tt)((tt.cores[0] * alpha,) + tuple(tt.cores[1:]))


def balance(tt: TT) -> TT:
  """The same tensor with every core of equal Frobenius norm (their geometric mean); ranks unchanged.

  A TT's scale can sit in any core. Fits that whiten or orthogonalize leave it
  in a few cores (norms 1e-3 to 1e6 apart), which adaptive optimizers, whose
  steps have the same size for every parameter, then move at very different
  relative rates. A zero tensor is returned as it is.

  Examples:
    >>> import jax, jax.numpy as jnp, tnjax
    >>> a = tnjax.random_tt(jax.random.key(0), (3, 4, 5), rank=2)
    >>> b = tnjax.balance(tnjax.TensorTrain((a.cores[0] * 1e4,) + a.cores[1:2] + (a.cores[2] * 1e-2,)))
    >>> [round(float(jnp.linalg.norm(c)), 3) for c in b.cores] == [round(float(jnp.linalg.norm(b.cores[0])), 3)] * 3
    True
  """
  check_tt("balance", "tt", tt)
  dtype = tt.dtype if jnp.finfo(tt.dtype).bits >= 32 else jnp.float32  # bfloat16 cores: norms in float32
  norms = jnp.stack([jnp.linalg.norm(c.astype(dtype)) for c in tt.cores])
  norms = jnp.where(jnp.all(norms > 0), norms, 1.0)  # a zero core: a zero tensor, every factor 1
  factors = jnp.exp(jnp.mean(jnp.log(norms))) / norms
  return type(tt)(tuple(c * factors[k].astype(c.dtype) for k, c in enumerate(tt.cores)))


def inner(a: TT, b: TT) -> jax.Array:
  """Frobenius inner product ``sum(to_dense(a) * to_dense(b))`` without dense tensors.

  Complexity:
    O(d n r^3) for ranks r on both sides.

  Examples:
    >>> import jax, jax.numpy as jnp, tnjax
    >>> a = tnjax.random_tt(jax.random.key(0), (3, 4, 5), rank=2)
    >>> bool(jnp.allclose(tnjax.inner(a, a), jnp.sum(tnjax.to_dense(a) ** 2), rtol=1e-5))
    True
  """
  _check_same_modes("inner", a, b)
  v = jnp.ones((1, 1), dtype=jnp.result_type(a.dtype, b.dtype))
  for x, y in zip(as_tt(a).cores, as_tt(b).cores):
    v = jnp.einsum("ab,anc,bnd->cd", v, x, y, optimize=True)
  return v[0, 0]


def norm(tt: TT) -> jax.Array:
  """Frobenius norm, ``sqrt(inner(tt, tt))``.

  The squared norm is accumulated in the cores' dtype, so for a difference
  of two nearly equal tensors the result is accurate only to about
  ``sqrt(eps) * ||a||``; compare dense tensors or round first where that matters.

  Examples:
    >>> import jax, jax.numpy as jnp, tnjax
    >>> a = tnjax.random_tt(jax.random.key(0), (3, 4, 5), rank=2)
    >>> bool(jnp.allclose(tnjax.norm(a), jnp.linalg.norm(tnjax.to_dense(a)), rtol=1e-5))
    True
  """
  check_tt("norm", "tt", tt)
  return jnp.sqrt(jnp.maximum(inner(tt, tt), 0))

