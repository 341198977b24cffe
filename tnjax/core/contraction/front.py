"""The front door, [`tnjax.matvec`][tnjax.matvec]: what ``path=`` means (a name, a `Plan` or ``"auto"``), the
fallback where a fused product cannot run, and the dispatch to the paths."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp

from tnjax.core.btt import BlockTT, btt_matvec
from tnjax.core.contraction.cost import H100, MATVEC_PATHS, PRODUCT_PATHS, PRODUCTS, CostModel, Plan, choose_plan
from tnjax.core.contraction.dense import _as_rows, matvec_dense
from tnjax.core.contraction.fused import DTYPES as FUSED_DTYPES
from tnjax.core.contraction.fused import fused_unavailable
from tnjax.core.contraction.paths import _planned, matvec_direct, matvec_split
from tnjax.core.ops import matvec_einsum
from tnjax.core.tensor_train import TTMatrix

_NAMED = {"fused": Plan("fused", "fused", "fused"), "fused_fwd": Plan("fused", "dense", "dense")}


def _resolve(fn: str, ttm: TTMatrix, x: jax.Array, path, cost: CostModel, interpret: bool):
  """The `Plan` (or "einsum") that ``path`` means for this TT-matrix and input; warns when a fused product
  cannot run here and "auto" takes over."""
  batch = math.prod(x.shape[:-1])
  # "auto" considers the kernels on a GPU for inputs they compute in (float64 stays on the XLA paths)
  auto = lambda: choose_plan(ttm, batch, cost, gpu=None if x.dtype.name in FUSED_DTYPES else False)  # noqa: E731
  if isinstance(path, tuple) and not isinstance(path, Plan):
    if len(path) != 3:
      raise ValueError(f"{fn}: path={path!r} but a name in {MATVEC_PATHS} or a Plan of 3 paths {PRODUCTS} is "
                       "expected")
    path = Plan(*path)
  if isinstance(path, Plan):
    bad = [f"{k}={v!r}" for k, v in path._asdict().items() if v not in PRODUCT_PATHS]
    if bad:
      raise ValueError(f"{fn}: path has {', '.join(bad)} but each product takes one of {PRODUCT_PATHS}")
    if (path.input_grad == "fused") != (path.core_grad == "fused"):
      raise ValueError(f"{fn}: path={tuple(path)!r} but input_grad and core_grad are 'fused' together or not "
                       "at all (the backward kernels make both gradients)")
    plan, given = path, tuple(path)
  elif path in MATVEC_PATHS:
    if path in ("auto", "einsum"):
      return auto() if path == "auto" else path
    plan, given = _NAMED.get(path, Plan(path, path, path)), path
  else:
    raise ValueError(f"{fn}: path={path!r} but one of {MATVEC_PATHS} is expected (or a Plan)")
  if "fused" in plan:
    why = fused_unavailable(ttm, interpret=interpret, dtype=x.dtype)
    if why is not None:
      # said once per call site and reason (Python's default warning filter), at trace time
      warnings.warn(f"{fn}: path={given!r} falls back to 'auto': {why}", stacklevel=4)
      return auto()
  return plan


def _matvec(fn: str, ttm, x, path, precision, cost: CostModel, interpret: bool) -> jax.Array:
  if isinstance(ttm, BlockTT):
    if path != "auto":
      raise ValueError(f"{fn}: path={path!r} but a BlockTT has one path (two batched matmuls): 'auto' is expected")
    return btt_matvec(ttm, x, precision=precision)
  x = jnp.asarray(x)
  rows = _as_rows(fn, ttm, x)
  plan = _resolve(fn, ttm, x, path, cost, interpret)
  if plan == "einsum":
    return matvec_einsum(ttm, x, precision=precision)
  if plan == Plan("dense", "dense", "dense"):
    return matvec_dense(ttm, x, precision=precision)  # plain autodiff (forward mode too), W shared by both ways
  if plan == Plan("split", "split", "split"):
    return matvec_split(ttm, x, precision=precision, cost=cost)
  if plan == Plan("direct", "direct", "direct"):
    return matvec_direct(ttm, x, precision=precision, cost=cost)
  out = _planned(tuple(ttm.cores), rows, plan, precision, cost, interpret)
  return out.reshape(x.shape[:-1] + (ttm.shape[1],))


def matvec(ttm: TTMatrix | BlockTT, x: jax.Array, *, path="auto", precision=None, cost: CostModel = H100,
           interpret: bool = False) -> jax.Array:
  """``x @ to_dense(ttm)`` without forming W: the one contraction entry point of tnjax.

  A TTMatrix runs by the path given, or by the cost model's `Plan` for this many rows (``"auto"``, chosen
  at trace time from the static shapes: each of the forward, input-gradient and core-gradient products on
  its cheapest path, see `choose_plan`). A `tnjax.core.btt.BlockTT` runs as two batched matmuls
  (`tnjax.core.btt.btt_matvec`).

  Args:
    ttm: a TTMatrix with cores (r[k], n_in[k], n_out[k], r[k+1]), or a BlockTT.
    x: (..., prod(in_dims)).
    path: static. "auto" (default), "dense" (rebuild W, one matmul), "direct" (core by core), "split"
      (two merged factors), "fused" (the Pallas kernels both ways), "fused_fwd" (the forward kernel, the
      rebuild-W backward), "einsum" (opt_einsum's fewest-FLOPs order, plain autodiff, forward mode
      too; `tnjax.matvec`'s only path before), or a `Plan` (or 3-tuple) naming each product's path. A
      fused product that cannot run here (no GPU, or a layout the kernels don't take) warns with the
      reason and falls back to "auto"; "auto" picks "fused" only where it runs, and never warns.
    precision: passed to the XLA contractions.
    cost: the cost model's constants (`CostModel`; default `H100`).
    interpret: run fused products through the Pallas interpreter (any backend; slow, for tests).

  Returns:
    (..., prod(out_dims)).

  Raises:
    ValueError: on an unknown path or Plan, a shape mismatch, or a path other than "auto" for a BlockTT.

  Examples:
    >>> import jax, jax.numpy as jnp, tnjax
    >>> w = tnjax.random_ttm(jax.random.key(0), (4, 4), (2, 3), rank=2)
    >>> tnjax.matvec(w, jnp.ones((5, 16))).shape
    (5, 6)
    >>> y = tnjax.matvec(w, jnp.ones((5, 16)), path=("split", "dense", "direct"))  # one path per product
    >>> bool(jnp.allclose(y, jnp.ones((5, 16)) @ tnjax.to_dense(w), atol=1e-5))
    True
  """
  return _matvec("matvec", ttm, x, path, precision, cost, interpret)


def linear(ttm: TTMatrix, x: jax.Array, *, path="auto", precision=None, cost: CostModel = H100) -> jax.Array:
  """`matvec` under its former name (errors and warnings say "linear"); kept for existing callers.

  Examples:
    >>> import jax, jax.numpy as jnp, tnjax
    >>> ttm = tnjax.random_ttm(jax.random.key(0), (4, 4), (4, 8), rank=3)
    >>> x = jnp.ones((2, 16))
    >>> bool(jnp.allclose(linear(ttm, x, path="direct"), x @ tnjax.to_dense(ttm), atol=1e-5))
    True
  """
  return _matvec("linear", ttm, x, path, precision, cost, False)
