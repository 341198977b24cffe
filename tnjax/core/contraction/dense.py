"""The rebuild-W path of [`tnjax.matvec`][tnjax.matvec] (``path="dense"``), and the pieces every path builds on.

``"dense"`` rebuilds ``W`` from the cores (a chain of d - 1 small contractions), then runs one matmul. Autodiff
of this path forms the full weight gradient ``x^T g`` once and projects it onto the cores, the backward of the
TTM GPT-2 paper (`dense_backward` writes it out by hand, for the fused kernels and the per-direction plans).
Fast when tokens >> parameters. This module sits below the kernels and the other paths, which all import it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tnjax.core.ops import check_matvec_args, to_dense
from tnjax.core.tensor_train import TTMatrix


def _as_rows(fn: str, ttm: TTMatrix, x: jax.Array) -> jax.Array:
  check_matvec_args(fn, ttm, x)
  return x.reshape(-1, ttm.shape[0])


def _merge_run(cores) -> jax.Array:
  """Contracts a run of TTM cores into one core (r_left, prod(in), prod(out), r_right)."""
  out = cores[0]
  for core in cores[1:]:
    a, i, o, _ = out.shape
    _, j, p, c = core.shape
    out = jnp.einsum("aiob,bjpc->aijopc", out, core).reshape(a, i * j, o * p, c)
  return out


def matvec_dense(ttm: TTMatrix, x: jax.Array, *, precision=None) -> jax.Array:
  """``x @ to_dense(ttm)`` by rebuilding W, then one matmul (autodiff projects dW onto the cores)."""
  rows = _as_rows("matvec_dense", ttm, x)
  out = jnp.matmul(rows, to_dense(ttm), precision=precision)
  return out.reshape(x.shape[:-1] + (ttm.shape[1],))


def dense_backward(cores: tuple[jax.Array, ...], rows: jax.Array, g: jax.Array, *, input_grad: bool = True,
                   core_grad: bool = True, precision=None):
  """(d cores, d rows) of ``rows @ W(cores)`` for cotangent ``g`` through the rebuilt W: ``dx = g W^T`` and
  ``dW = x^T g`` (two full matmuls), dW projected onto the cores. A product not wanted comes back as None.

  ``dW`` accumulates in float32 at least (float64 rows stay float64).
  """
  w, project = jax.vjp(lambda cs: to_dense(TTMatrix(tuple(cs))), tuple(cores))
  dx = jnp.matmul(g, w.T.astype(g.dtype), precision=precision).astype(rows.dtype) if input_grad else None
  dcores = None
  if core_grad:
    acc = rows.dtype if jnp.finfo(rows.dtype).bits >= 32 else jnp.float32
    dw = jnp.matmul(rows.T, g.astype(rows.dtype), precision=precision, preferred_element_type=acc)
    (dcores,) = project(dw.astype(w.dtype))
  return dcores, dx
