"""The paths of [`tnjax.matvec`][tnjax.matvec] that never form W, and the per-direction plan that mixes paths.

* ``"direct"`` (`matvec_direct`): absorb the cores into ``x`` one at a time. The order (which core first,
  growing a connected run of absorbed cores) is chosen by the cost model. Its backward (a ``custom_vjp``)
  keeps only ``x`` and the cores as residuals and recomputes the intermediates, so activation memory stays
  near a dense layer's.
* ``"split"`` (`matvec_split`): merge the cores on each side of one bond into two factors, ``A``
  (in_1, out_1, r) and ``B`` (r, in_2, out_2), then two matmuls with ``x``.
* A `Plan` that names more than one path (`_planned`): one ``custom_vjp`` that keeps only ``x`` and the cores
  and runs each product (forward, input gradient, core gradient) on its own path, the fused kernels of
  [`tnjax.core.contraction.fused`][tnjax.core.contraction.fused] included.

The rebuild-W path is [`tnjax.core.contraction.dense`][tnjax.core.contraction.dense]; the choice among paths
is [`tnjax.core.contraction.cost`][tnjax.core.contraction.cost]'s.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import opt_einsum

from tnjax.core.contraction.cost import (
    H100,
    SPLIT_ORDERS,
    CostModel,
    Plan,
    _best_direct,
    _best_split,
    _connected_orders,
    _split_steps,
    _step_seconds,
)
from tnjax.core.contraction.dense import _as_rows, _merge_run, dense_backward, matvec_dense
from tnjax.core.contraction.fused import fused_backward, fused_forward
from tnjax.core.ops import to_dense
from tnjax.core.tensor_train import TTMatrix


def _labels(d: int):
  sym = opt_einsum.get_symbol
  return sym(0), [sym(1 + k) for k in range(d)], [sym(1 + d + k) for k in range(d)], \
      [sym(1 + 2 * d + k) for k in range(d + 1)]


def _direct_impl(cores: tuple[jax.Array, ...], x: jax.Array, order: tuple[int, ...], precision) -> jax.Array:
  d = len(cores)
  b, ins, outs, bonds = _labels(d)

  def canonical(done):
    lab = [b] + [ins[j] for j in range(d) if j not in done] + [outs[j] for j in sorted(done)]
    return lab + ([bonds[min(done)], bonds[max(done) + 1]] if done else [])

  state = x.reshape((x.shape[0],) + tuple(c.shape[1] for c in cores))
  done: list[int] = []
  for k in order:
    before = canonical(done)
    done.append(k)
    core = [bonds[k], ins[k], outs[k], bonds[k + 1]]
    state = jnp.einsum(f"{''.join(before)},{''.join(core)}->{''.join(canonical(done))}", state, cores[k],
                       precision=precision)
  return state.reshape(x.shape[0], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _direct(cores, x, order, precision):
  return _direct_impl(cores, x, order, precision)


def _direct_fwd(cores, x, order, precision):
  return _direct_impl(cores, x, order, precision), (cores, x)


def _direct_bwd(order, precision, residuals, g):
  # Only x and the cores were kept: the intermediates are recomputed here,
  # live only during this backward step, and are freed before the next layer's.
  cores, x = residuals
  _, vjp = jax.vjp(lambda c, x: _direct_impl(c, x, order, precision), cores, x)
  return vjp(g)


_direct.defvjp(_direct_fwd, _direct_bwd)


def matvec_direct(ttm: TTMatrix, x: jax.Array, *, order: tuple[int, ...] | None = None, precision=None,
                  cost: CostModel = H100) -> jax.Array:
  """``x @ to_dense(ttm)`` by absorbing cores into x one at a time; W is never formed.

  Args:
    ttm: cores (r[k], n_in[k], n_out[k], r[k+1]).
    x: (..., prod(in_dims)).
    order: which cores to absorb first (a connected order, e.g. (0, 1, 2) or
      (1, 2, 0)); by default the cheapest under ``cost`` for this batch.
    precision: passed to each einsum.
    cost: the cost model used to pick ``order``.

  Returns:
    (..., prod(out_dims)). Its VJP keeps only ``x`` and the cores.
  """
  fn = "matvec_direct"
  rows = _as_rows(fn, ttm, x)
  shapes = tuple(c.shape for c in ttm.cores)
  if order is None:
    order = _best_direct(shapes, rows.shape[0], cost)[1]
  elif tuple(sorted(order)) != tuple(range(ttm.ndim)) or tuple(order) not in set(_connected_orders(ttm.ndim)):
    raise ValueError(f"{fn}: order={order!r} but a connected order of cores 0..{ttm.ndim - 1} is expected "
                     "(each core next to those already absorbed)")
  return _direct(tuple(ttm.cores), rows, tuple(order), precision).reshape(x.shape[:-1] + (ttm.shape[1],))


def _split_impl(cores, x: jax.Array, s: int, order: str, precision) -> jax.Array:
  a = _merge_run(cores[:s])[0]  # (in_1, out_1, r)
  b = _merge_run(cores[s:])[..., 0]  # (r, in_2, out_2)
  xs = x.reshape(x.shape[0], a.shape[0], b.shape[1])
  if order == "prefix":
    u = jnp.einsum("nab,apr->nprb", xs, a, precision=precision)
    y = jnp.einsum("nprb,rbq->npq", u, b, precision=precision)
  else:
    z = jnp.einsum("nab,rbq->narq", xs, b, precision=precision)
    y = jnp.einsum("narq,apr->npq", z, a, precision=precision)
  return y.reshape(x.shape[0], -1)


def matvec_split(ttm: TTMatrix, x: jax.Array, *, split: int | None = None, order: str | None = None,
                 precision=None, cost: CostModel = H100) -> jax.Array:
  """``x @ to_dense(ttm)`` through two factors merged at one bond; W is never formed.

  The cores left of bond ``split`` merge into ``A`` (in_1, out_1, r), those
  right of it into ``B`` (r, in_2, out_2), with in_1 = prod(in_dims[:split])
  and so on. With x as (tokens, in_1, in_2), ``order="prefix"`` contracts in_1
  with A first (intermediate tokens x out_1 x r x in_2), ``"suffix"``
  contracts in_2 with B first (tokens x in_1 x r x out_2); the other factor
  follows. Gradients are plain autodiff (the intermediate is kept).

  Args:
    ttm: cores (r[k], n_in[k], n_out[k], r[k+1]); a single core is one matmul.
    x: (..., prod(in_dims)).
    split: the bond, 1..d-1; by default (with ``order``) the cheapest under ``cost``.
    order: "prefix" or "suffix"; by default the cheaper at ``split``.
    precision: passed to each einsum.
    cost: the cost model that picks the defaults.

  Returns:
    (..., prod(out_dims)).

  Raises:
    ValueError: on a bond out of range, an unknown order or a shape mismatch.

  Complexity:
    Merging: as rebuilding W for the two halves (in_1 out_1 r + r in_2 out_2
    entries). Per token: 2 r in_1 in_2 out_1 + 2 r out_1 in_2 out_2 FLOPs
    (prefix), 2 r in_1 in_2 out_2 + 2 r in_1 out_1 out_2 (suffix).

  Examples:
    >>> import jax, jax.numpy as jnp, tnjax
    >>> ttm = tnjax.random_ttm(jax.random.key(0), (2, 3, 4), (4, 3, 2), rank=3)
    >>> x = jax.random.normal(jax.random.key(1), (5, 24))
    >>> y = matvec_split(ttm, x, split=1, order="suffix")
    >>> bool(jnp.allclose(y, x @ tnjax.to_dense(ttm), atol=1e-5))
    True
  """
  fn = "matvec_split"
  rows = _as_rows(fn, ttm, x)
  d = ttm.ndim
  if split is not None and (isinstance(split, bool) or not isinstance(split, int) or not 1 <= split < d):
    raise ValueError(f"{fn}: split={split!r} but a bond 1..{d - 1} is expected"
                     + (" (a single-core TT-matrix has none)" if d == 1 else ""))
  if order is not None and order not in SPLIT_ORDERS:
    raise ValueError(f"{fn}: order={order!r} but one of {SPLIT_ORDERS} is expected")
  if d == 1:
    return matvec_dense(ttm, x, precision=precision)
  shapes = tuple(c.shape for c in ttm.cores)
  if split is None or order is None:
    candidates = [(sum(_step_seconds(f, e, cost) for f, e in _split_steps(shapes, rows.shape[0], s, o)), s, o)
                  for s in ([split] if split is not None else range(1, d))
                  for o in ([order] if order is not None else SPLIT_ORDERS)]
    _, split, order = min(candidates)
  out = _split_impl(tuple(ttm.cores), rows, split, order, precision)
  return out.reshape(x.shape[:-1] + (ttm.shape[1],))


def _product(path: str, cores: tuple[jax.Array, ...], rows: jax.Array, precision, cost: CostModel,
             interpret: bool) -> jax.Array:
  """``rows @ W(cores)`` by one path, without a VJP of its own (for `_planned`, which differentiates by hand)."""
  shapes = tuple(c.shape for c in cores)
  if path == "fused":
    return fused_forward(cores, rows, interpret=interpret)
  if path == "dense":
    return jnp.matmul(rows, to_dense(TTMatrix(cores)), precision=precision)
  if path == "direct" or len(cores) == 1:  # one core has no bond to split at; absorbing it is one matmul
    return _direct_impl(cores, rows, _best_direct(shapes, rows.shape[0], cost)[1], precision)
  _, bond, order = _best_split(shapes, rows.shape[0], cost)
  return _split_impl(cores, rows, bond, order, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _planned(cores, rows, plan: Plan, precision, cost: CostModel, interpret: bool):
  return _product(plan.forward, cores, rows, precision, cost, interpret)


def _planned_fwd(cores, rows, plan, precision, cost, interpret):
  return _planned(cores, rows, plan, precision, cost, interpret), (cores, rows)


def _planned_bwd(plan, precision, cost, interpret, residuals, g):
  # Like `_direct`, only x and the cores are kept; each gradient product runs on the plan's path for it.
  cores, rows = residuals
  if plan.input_grad == "fused":  # the two backward kernels make both gradients
    return fused_backward(cores, rows, g, interpret=interpret)
  dense = dense_backward(cores, rows, g, input_grad=plan.input_grad == "dense",
                         core_grad=plan.core_grad == "dense", precision=precision)
  dcores, dx = dense
  if plan.input_grad != "dense":
    grad = cost._replace(peak_flops=cost.grad_flops)
    flipped = tuple(c.transpose(0, 2, 1, 3) for c in cores)
    dx = _product(plan.input_grad, flipped, g, precision, grad, interpret).astype(rows.dtype)
  if plan.core_grad != "dense":
    _, project = jax.vjp(lambda cs: _product(plan.core_grad, cs, rows, precision, cost, interpret), cores)
    (dcores,) = project(g)
  return tuple(dcores), dx


_planned.defvjp(_planned_fwd, _planned_bwd)
