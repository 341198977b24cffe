"""Fused kernels for two-core TT-matrix layers, forward and backward (Pallas, Triton lowering on GPUs).

A two-core TT-matrix is a sum of r Kronecker products,
``W = sum_r A_r (x) B_r`` with ``A_r = core0[0, :, :, r]`` (a x p) and
``B_r = core1[r, :, :, 0]`` (b x q), so for one token, with its input viewed
as an (a, b) matrix ``X``, the output viewed as (p, q) is
``Y = sum_r A_r^T X B_r``. `matvec_fused` computes that for a block of
tokens in one kernel: ``V = X B_r`` for all the block's (token, a) rows and
all ranks at once, a regrouping in registers to (token, q) rows, and one
product with the A's, accumulated in float32. Only x is read and y written;
the intermediates never reach device memory, which is what lets a TT-matrix
layer beat a dense matmul when its FLOPs are lower (the XLA paths write an
intermediate as large as the output or larger). Measured on an H100 at 16k
tokens: 0.71x (rank 4) and 0.85x (rank 8) of a dense matmul's time forward
(``benchmarks/README.md``).

The Triton lowering needs every loaded block to have a power-of-two size and
matrix-unit products at least 16 wide, so the layout is restricted (see
`fused_supported`; `fused_dims` gives a layout that fits): each
mode is cut into power-of-two slabs that the kernel loops over statically
(768 = 16 x 48 and 3072 = 192 x 16 work), and ranks go up to 16 (padded to a
power of two with zeros). Per slab pair: ``V = X [B_1 .. B_r]``, then, with
V's rows regrouped by (token, q) and columns by (rank, a), one product with
the A's stacked over (rank, a).

The backward pass is two more kernels: one computes dX and sums dB over its
share of the tokens, the other sums dA (recomputing V); the per-program
partial sums are added in XLA. Below ``FEW_TOKENS`` tokens (decoding) the
forward spreads 16-wide output slabs over programs instead of tokens.

The kernels are paths of the one contraction entry point,
[`tnjax.matvec`][tnjax.matvec]: ``path="auto"`` picks the forward kernel, the
backward kernels or both where the cost model of
[`tnjax.core.contraction.cost`][tnjax.core.contraction.cost] (calibrated on these measurements) says
they are faster, and only where they can run (a GPU, a layout
`fused_supported` takes). Asked for by name where they cannot run,
``path="fused"`` warns with the reason (`fused_unavailable`) and falls back to
``"auto"``. ``interpret=True`` runs the kernels' programs on any backend (slow;
for tests).

A ``pallas_call`` has no partitioning rule: under ``jit`` with inputs sharded over devices, XLA would gather
every token onto every device and run the whole kernel there. So the kernels run under ``jax.shard_map`` over
the ambient mesh (the one set by ``jax.set_mesh`` or ``jax.sharding.use_abstract_mesh``, which
`tnjax.train.Trainer` sets around its steps): the token rows are split over every axis of that mesh whose size
still divides their count (`row_axes`), the cores are replicated (gathered first where they are sharded), each
device runs the kernel on its own rows, and the backward's core gradients are summed over the axes
(``psum``). Without a mesh, or with rows no axis divides, the kernels run as one call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from tnjax.core.contraction.dense import dense_backward
from tnjax.core.ops import check_matvec_args
from tnjax.core.tensor_train import TTMatrix

MAX_RANK = 16
FEW_TOKENS = 256  # below this many tokens the forward kernel splits output slabs over programs
# Default tuning on an H100 (the previous sessions' sweeps): warps per program, and the backward kernels'
# tokens per step, warps and programs (264 = two per multiprocessor)
NUM_WARPS, BACKWARD_BLOCK, BACKWARD_WARPS, BACKWARD_PROGRAMS = 4, 4, 4, 264


def _pow2_slab(n: int) -> int:
  """The largest power of two dividing n."""
  return n & -n


def _next_pow2(n: int) -> int:
  return 1 << (n - 1).bit_length()


def _layout(ttm: TTMatrix):
  """((a, b, p, q), slabs, padded rank) of a two-core TT-matrix, or None and the reason the kernel can't take it.

  Slabs are the power-of-two tiles the kernel loops over: a and q tiles (widened by the rank inside the
  products) at most 16, b and p tiles (matrix-unit widths themselves) at most 64.
  """
  if not isinstance(ttm, TTMatrix) or ttm.ndim != 2:
    return None, "the fused kernel takes a two-core TTMatrix"
  (a, b), (p, q) = ttm.in_dims, ttm.out_dims
  r = _next_pow2(ttm.cores[0].shape[-1])
  if r > MAX_RANK:
    return None, (f"rank {ttm.cores[0].shape[-1]} but at most {MAX_RANK} is supported (larger ranks spill "
                  "registers: 67x slower than dense at rank 32 on an H100)")
  caps = (16, 64, 64, 16)
  slabs = tuple(min(_pow2_slab(n), cap) for n, cap in zip((a, b, p, q), caps))
  names = ("in_dims[0]", "in_dims[1]", "out_dims[0]", "out_dims[1]")
  needs = (16 // min(r, 16), 16, 16, 16 // min(r, 16))
  for name, n, slab, need in zip(names, (a, b, p, q), slabs, needs):
    if slab < need:
      return None, f"{name}={n} but a multiple of {need} is needed (its power-of-two part is {_pow2_slab(n)})"
  return ((a, b, p, q), slabs, r), None


def fused_supported(ttm: TTMatrix) -> bool:
  """Whether `matvec_fused` takes this TT-matrix's layout (not whether a GPU is present).

  Examples:
    >>> import jax, tnjax
    >>> fused_supported(tnjax.random_ttm(jax.random.key(0), (16, 48), (192, 16), rank=8))
    True
    >>> fused_supported(tnjax.random_ttm(jax.random.key(0), (8, 8, 12), (12, 16, 16), rank=8))
    False
  """
  return _layout(ttm)[0] is not None


DTYPES = ("float32", "bfloat16")  # what the kernels compute in


def fused_unavailable(ttm: TTMatrix, *, interpret: bool = False, dtype=None) -> str | None:
  """Why `matvec_fused` cannot run this TT-matrix here (no GPU backend, a layout it does not take, or an
  input ``dtype`` outside `DTYPES`), or None when it can. With ``interpret=True`` (the Pallas interpreter)
  any backend will do.

  Examples:
    >>> import jax, tnjax
    >>> fused_unavailable(tnjax.random_ttm(jax.random.key(0), (8, 8, 12), (12, 16, 16), rank=8))
    'the fused kernel takes a two-core TTMatrix'
  """
  why = _layout(ttm)[1]
  if why is None and dtype is not None and jnp.dtype(dtype).name not in DTYPES:
    why = f"x.dtype={jnp.dtype(dtype).name} but the kernels take one of {DTYPES}"
  if why is None and not interpret and jax.default_backend() != "gpu":
    why = f"the default backend is {jax.default_backend()!r}, and the kernels are compiled for GPUs (Triton)"
  return why


def fused_dims(in_features: int, out_features: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Two-core dims for a layer the fused kernel takes: in (16, in / 16), out (out / 16, 16).

  Sixteen-wide outer modes keep the kernel's per-token work at
  2 r 16 16 (in / 16 + out / 16) FLOPs and its tiles tensor-core sized.

  Raises:
    ValueError: when a size is not 16 times a multiple of 16.

  Examples:
    >>> fused_dims(768, 3072)
    ((16, 48), (192, 16))
  """
  for name, n in (("in_features", in_features), ("out_features", out_features)):
    if isinstance(n, bool) or not isinstance(n, int) or n % 256:
      raise ValueError(f"fused_dims: {name}={n!r} but a multiple of 256 is needed (16 x a multiple of 16)")
  return (16, in_features // 16), (out_features // 16, 16)


def _block_tokens(layout) -> int:
  (a, b, p, q), (sa, sb, sp, sq), r = layout
  fit = min(16384 // (sa * r * sq), 32768 // (sq * p))  # float32 values live in one program
  block = max(1, min(16, 1 << (max(1, fit).bit_length() - 1)))
  return max(block, 16 // min(sa, sq, 16))  # products need >= 16 rows


def _dot(a, b):
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _dot_tn(a, b):
  """a^T b, contracting the rows of both."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nt(a, b):
  """a b^T, contracting the columns of both."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _b_tile(b_ref, c, g, layout):
  """B[:, c slab, g slab] of the (r, b, q) core as (sb, r * sq), columns (rank, q)."""
  _, (sa, sb, sp, sq), r = layout
  return b_ref[:, pl.ds(c * sb, sb), pl.ds(g * sq, sq)].transpose(1, 0, 2).reshape(sb, r * sq)


def _a_tile(a_ref, s, e, layout):
  """A[s slab, e slab, :] of the (a, p, r) core as (r * sa, sp), rows (rank, a)."""
  _, (sa, sb, sp, sq), r = layout
  return a_ref[pl.ds(s * sa, sa), pl.ds(e * sp, sp), :].transpose(2, 0, 1).reshape(r * sa, sp)


def _swap(v, block, rows, r, cols):
  """(block * rows, r * cols), rows (token, i), columns (rank, j) -> (block * cols, r * rows), rows (token, j),
  columns (rank, i). Its own inverse with rows and cols exchanged."""
  return v.reshape(block, rows, r, cols).transpose(0, 3, 2, 1).reshape(block * cols, r * rows)


def _kernel(x_ref, a_ref, b_ref, y_ref, *, block: int, layout, one_slab: bool):
  (a, b, p, q), (sa, sb, sp, sq), r = layout
  # one_slab: this program computes only output slab program_id(1) (few tokens: more programs, V recomputed)
  slabs = [pl.program_id(1)] if one_slab else list(range(p // sp))
  for g in range(q // sq):  # output column slab
    accs = [jnp.zeros((block * sq, sp), jnp.float32) for _ in slabs]
    for s in range(a // sa):  # input row slab
      v = jnp.zeros((block * sa, r * sq), jnp.float32)
      for c in range(b // sb):  # input column slab: V = X B_all, all ranks at once
        xs = x_ref[:, pl.ds(s * sa, sa), pl.ds(c * sb, sb)].reshape(block * sa, sb)
        v = v + _dot(xs, _b_tile(b_ref, c, g, layout))
      # (token, a, rank, q) -> rows (token, q), columns (rank, a): one product with A over rank and a
      vt = _swap(v.astype(x_ref.dtype), block, sa, r, sq)
      accs = [acc + _dot(vt, _a_tile(a_ref, s, e, layout)) for e, acc in zip(slabs, accs)]
    for e, acc in zip(slabs, accs):
      y_ref[:, pl.ds(e * sp, sp), pl.ds(g * sq, sq)] = (
          acc.reshape(block, sq, sp).transpose(0, 2, 1).astype(y_ref.dtype))


def _dy_tile(dy_ref, start, e, g, block, layout):
  """dY[tokens, e slab, g slab] as (block * sq, sp), rows (token, q)."""
  _, (sa, sb, sp, sq), r = layout
  return dy_ref[pl.ds(start, block), pl.ds(e * sp, sp), pl.ds(g * sq, sq)].transpose(0, 2, 1).reshape(block * sq, sp)


def _x_tile(x_ref, start, s, c, block, layout):
  _, (sa, sb, sp, sq), r = layout
  return x_ref[pl.ds(start, block), pl.ds(s * sa, sa), pl.ds(c * sb, sb)].reshape(block * sa, sb)


def _bwd_x_kernel(x_ref, dy_ref, a_ref, b_ref, dx_ref, db_ref, *, block: int, per: int, layout):
  """dX and this program's share of dB, over ``per`` token blocks."""
  (a, b, p, q), (sa, sb, sp, sq), r = layout
  na, nb, np_, nq = a // sa, b // sb, p // sp, q // sq
  first = pl.program_id(0) * per

  def body(j, dbs):
    start = (first + j) * block
    dxs = [[jnp.zeros((block * sa, sb), jnp.float32) for _ in range(nb)] for _ in range(na)]
    dbs = [list(row) for row in dbs]
    for g in range(nq):
      dys = [_dy_tile(dy_ref, start, e, g, block, layout) for e in range(np_)]
      for s in range(na):
        dvt = sum(_dot_nt(dys[e], _a_tile(a_ref, s, e, layout)) for e in range(np_))  # (block sq, r sa)
        dv = _swap(dvt.astype(x_ref.dtype), block, sq, r, sa)  # rows (token, a), columns (rank, q)
        for c in range(nb):
          dbs[c][g] = dbs[c][g] + _dot_tn(_x_tile(x_ref, start, s, c, block, layout), dv)
          dxs[s][c] = dxs[s][c] + _dot_nt(dv, _b_tile(b_ref, c, g, layout))
    for s in range(na):
      for c in range(nb):
        dx_ref[pl.ds(start, block), pl.ds(s * sa, sa), pl.ds(c * sb, sb)] = (
            dxs[s][c].reshape(block, sa, sb).astype(dx_ref.dtype))
    return tuple(tuple(row) for row in dbs)

  zeros = tuple(tuple(jnp.zeros((sb, r * sq), jnp.float32) for _ in range(nq)) for _ in range(nb))
  dbs = jax.lax.fori_loop(0, per, body, zeros)
  for c in range(nb):
    for g in range(nq):
      db_ref[0, c, g] = dbs[c][g]


def _bwd_a_kernel(x_ref, dy_ref, b_ref, da_ref, *, block: int, per: int, layout):
  """This program's share of dA for output slab ``program_id(1)``, over ``per`` token blocks."""
  (a, b, p, q), (sa, sb, sp, sq), r = layout
  na, nb, nq = a // sa, b // sb, q // sq
  first = pl.program_id(0) * per
  e = pl.program_id(1)

  def body(j, das):
    start = (first + j) * block
    das = list(das)
    for g in range(nq):
      dy = _dy_tile(dy_ref, start, e, g, block, layout)
      for s in range(na):
        v = sum(_dot(_x_tile(x_ref, start, s, c, block, layout), _b_tile(b_ref, c, g, layout)) for c in range(nb))
        vt = _swap(v.astype(x_ref.dtype), block, sa, r, sq)  # rows (token, q), columns (rank, a)
        das[s] = das[s] + _dot_tn(vt, dy)
    return tuple(das)

  das = jax.lax.fori_loop(0, per, body, tuple(jnp.zeros((r * sa, sp), jnp.float32) for _ in range(na)))
  for s in range(na):
    da_ref[0, s, 0] = das[s]


def _fused_forward(cores, rows: jax.Array, block: int | None, num_warps: int, interpret: bool) -> jax.Array:
  layout, _ = _layout(TTMatrix(tuple(cores)))
  (a, b, p, q), (sa, sb, sp, sq), r = layout
  n = rows.shape[0]
  few = n < FEW_TOKENS
  if few:  # decoding: spread output slabs of 16 over programs instead of tokens
    layout = ((a, b, p, q), (sa, sb, 16, sq), r)
  if block is None:
    block = _block_tokens(layout)
    if n % block and few:  # no padding, one token per program if need be
      block = max(n & -n, 16 // min(sa, sq, 16))
  padded = -(-n // block) * block
  x = rows if padded == n else jnp.pad(rows, ((0, padded - n), (0, 0)))
  dtype = rows.dtype
  a_core, b_core = _padded_cores(cores, r, dtype)
  kwargs = {}
  if not interpret:
    from jax.experimental.pallas import triton as plgpu
    kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
  y = pl.pallas_call(
      functools.partial(_kernel, block=block, layout=layout, one_slab=few),
      out_shape=jax.ShapeDtypeStruct((padded, p, q), dtype),
      grid=(padded // block, p // 16) if few else (padded // block,),
      in_specs=[pl.BlockSpec((block, a, b), lambda i, *_: (i, 0, 0)),
                pl.BlockSpec((a, p, r), lambda *_: (0, 0, 0)),
                pl.BlockSpec((r, b, q), lambda *_: (0, 0, 0))],
      out_specs=pl.BlockSpec((block, p, q), lambda i, *_: (i, 0, 0)),
      interpret=interpret,
      **kwargs,
  )(x.reshape(padded, a, b), a_core, b_core)
  y = y.reshape(padded, p * q)
  return y if padded == n else y[:n]


def row_axes(rows: int) -> tuple[str, ...]:
  """The axes of the ambient mesh that the kernels split ``rows`` token rows over: in mesh order, each axis that is
  not already manual (inside a ``shard_map``) and whose size, times those taken before it, divides ``rows``; ()
  without a mesh.

  Examples:
    >>> row_axes(64)  # no mesh set: one call
    ()
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  axes, size = [], 1
  for name, kind in zip(mesh.axis_names, mesh.axis_types):
    k = mesh.shape[name]
    if kind != AxisType.Manual and k > 1 and rows % (size * k) == 0:
      axes.append(name)
      size *= k
  return tuple(axes)


def _sharded_forward(cores, rows: jax.Array, block: int | None, num_warps: int, interpret: bool) -> jax.Array:
  """`_fused_forward` on each device's share of the rows (`row_axes`), the cores replicated."""
  axes = row_axes(rows.shape[0])
  if not axes:
    return _fused_forward(cores, rows, block, num_warps, interpret)
  # check_vma=False: a pallas_call's outputs carry no varying-axes type
  return jax.shard_map(lambda cs, r: _fused_forward(cs, r, block, num_warps, interpret), in_specs=(P(), P(axes)),
                       out_specs=P(axes), axis_names=frozenset(axes), check_vma=False)(tuple(cores), rows)


def _sharded_backward(cores, rows, g, block: int, num_warps: int, programs: int, interpret: bool):
  """`_fused_backward` on each device's share of the rows and cotangents; the core gradients summed over devices."""
  axes = row_axes(rows.shape[0])
  if not axes:
    return _fused_backward(cores, rows, g, block, num_warps, programs, interpret)

  def local(cs, r, gg):
    dcores, dx = _fused_backward(cs, r, gg, block, num_warps, programs, interpret)
    return jax.lax.psum(dcores, axes), dx

  return jax.shard_map(local, in_specs=(P(), P(axes), P(axes)), out_specs=(P(), P(axes)),
                       axis_names=frozenset(axes), check_vma=False)(tuple(cores), rows, g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _fused(cores, rows, block, num_warps, backward, interpret):
  return _sharded_forward(cores, rows, block, num_warps, interpret)


def _fused_fwd(cores, rows, block, num_warps, backward, interpret):
  return _sharded_forward(cores, rows, block, num_warps, interpret), (cores, rows)


def _padded_cores(cores, r: int, dtype):
  a_core, b_core = cores[0][0].astype(dtype), cores[1][..., 0].astype(dtype)  # (a, p, r0), (r0, b, q)
  if r > a_core.shape[-1]:  # zero ranks add nothing
    a_core = jnp.pad(a_core, ((0, 0), (0, 0), (0, r - a_core.shape[-1])))
    b_core = jnp.pad(b_core, ((0, r - b_core.shape[0]), (0, 0), (0, 0)))
  return a_core, b_core


def _fused_backward(cores, rows, g, block: int, num_warps: int, programs: int, interpret: bool):
  """(d cores, dx) by two kernels: dX with dB, and dA; per-program partial sums reduced here."""
  layout, _ = _layout(TTMatrix(tuple(cores)))
  (a, b, p, q), (sa, sb, sp, sq), r = layout
  na, nb, np_, nq = a // sa, b // sb, p // sp, q // sq
  n, dtype = rows.shape[0], rows.dtype
  blocks = -(-n // block)
  programs = min(blocks, programs)
  # prefer a program count that divides the blocks: padding x and dy copies them (~80 us at 16k tokens)
  fits = max(k for k in range(1, programs + 1) if blocks % k == 0)
  programs = fits if 2 * fits >= programs else programs
  per = -(-blocks // programs)
  padded = programs * per * block
  pad = lambda v: v if padded == n else jnp.pad(v, ((0, padded - n), (0, 0)))
  x = pad(rows).reshape(padded, a, b)
  dy = pad(g.astype(dtype)).reshape(padded, p, q)
  a_core, b_core = _padded_cores(cores, r, dtype)
  kwargs = {}
  if not interpret:
    from jax.experimental.pallas import triton as plgpu
    kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
  whole = lambda shape: pl.BlockSpec(shape, lambda *i: (0,) * len(shape))
  dx, db = pl.pallas_call(
      functools.partial(_bwd_x_kernel, block=block, per=per, layout=layout),
      out_shape=(jax.ShapeDtypeStruct((padded, a, b), dtype),
                 jax.ShapeDtypeStruct((programs, nb, nq, sb, r * sq), jnp.float32)),
      grid=(programs,),
      in_specs=[whole(x.shape), whole(dy.shape), whole(a_core.shape), whole(b_core.shape)],
      out_specs=(whole((padded, a, b)), pl.BlockSpec((1, nb, nq, sb, r * sq), lambda i: (i, 0, 0, 0, 0))),
      interpret=interpret, **kwargs,
  )(x, dy, a_core, b_core)
  da = pl.pallas_call(
      functools.partial(_bwd_a_kernel, block=block, per=per, layout=layout),
      out_shape=jax.ShapeDtypeStruct((programs, na, np_, r * sa, sp), jnp.float32),
      grid=(programs, np_),
      in_specs=[whole(x.shape), whole(dy.shape), whole(b_core.shape)],
      out_specs=pl.BlockSpec((1, na, 1, r * sa, sp), lambda i, e: (i, 0, e, 0, 0)),
      interpret=interpret, **kwargs,
  )(x, dy, b_core)
  r0 = cores[0].shape[-1]
  da = da.sum(0).reshape(na, np_, r, sa, sp).transpose(0, 3, 1, 4, 2).reshape(a, p, r)[..., :r0]
  db = db.sum(0).reshape(nb, nq, sb, r, sq).transpose(3, 0, 2, 1, 4).reshape(r, b, q)[:r0]
  dcores = (da[None].astype(cores[0].dtype), db[..., None].astype(cores[1].dtype))
  dx = dx.reshape(padded, a * b)
  return dcores, dx if padded == n else dx[:n]


def _fused_bwd(block, num_warps, backward, interpret, residuals, g):
  cores, rows = residuals
  return _sharded_backward(cores, rows, g, *backward, interpret)


_fused.defvjp(_fused_fwd, _fused_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _fused_dense_bwd(cores, rows, block, num_warps, interpret):
  return _sharded_forward(cores, rows, block, num_warps, interpret)


def _fused_dense_bwd_fwd(cores, rows, block, num_warps, interpret):
  return _sharded_forward(cores, rows, block, num_warps, interpret), (cores, rows)


def _fused_dense_bwd_bwd(block, num_warps, interpret, residuals, g):
  """The backward of rebuilding W: two full matmuls (dx = g W^T, dW = x^T g) and dW projected onto the cores."""
  return dense_backward(*residuals, g)


_fused_dense_bwd.defvjp(_fused_dense_bwd_fwd, _fused_dense_bwd_bwd)


def fused_forward(cores: tuple[jax.Array, ...], rows: jax.Array, *, interpret: bool = False) -> jax.Array:
  """``rows @ W`` by the forward kernel with its default tuning, for (tokens, a * b) rows; no VJP of its own.

  For callers that pair the kernel with another backward (`tnjax.core.contraction.paths`' per-direction plans).
  """
  return _sharded_forward(tuple(c.astype(rows.dtype) for c in cores), rows, None, NUM_WARPS, interpret)


def fused_backward(cores: tuple[jax.Array, ...], rows: jax.Array, g: jax.Array, *, interpret: bool = False):
  """(d cores, d rows) of ``rows @ W`` for cotangent ``g`` by the two backward kernels (default tuning)."""
  return _sharded_backward(tuple(cores), rows, g, BACKWARD_BLOCK, BACKWARD_WARPS, BACKWARD_PROGRAMS, interpret)


BACKWARDS = ("kernels", "dense")

def matvec_fused(ttm: TTMatrix, x: jax.Array, *, block_tokens: int | None = None, num_warps: int = NUM_WARPS,
                 backward_block: int = BACKWARD_BLOCK, backward_warps: int = BACKWARD_WARPS,
                 backward_programs: int = BACKWARD_PROGRAMS,
                 interpret: bool = False, backward: str = "kernels") -> jax.Array:
  """``x @ to_dense(ttm)`` for a two-core TT-matrix in one fused kernel; see the module docstring.

  Args:
    ttm: two cores, (1, a, p, r) and (r, b, q, 1), in a layout `fused_supported` accepts.
    x: (..., a * b), float32 or bfloat16.
    block_tokens: tokens per program (a power of two); by default the largest
      of 1..16 whose float32 tiles fit (8 for GPT-2 shapes at rank <= 8), and
      for fewer than 64 tokens one that needs no padding.
    num_warps: Triton warps per program.
    backward_block, backward_warps: tokens per step and warps of the two backward kernels.
    backward_programs: programs of the backward kernels (each sums its share of the core gradients;
      264 is two per multiprocessor of an H100).
    interpret: run the kernel's program through the Pallas interpreter (any backend; for tests).
    backward: "kernels" (the two backward kernels) or "dense" (rebuild W and take two full matmuls, the
      backward of the "dense" path): the forward and the backward each on the path that is faster for it.

  Returns:
    (..., p * q) in x's dtype. Its VJP runs the two backward kernels, or the dense backward.

  Raises:
    ValueError: on an unsupported layout, a bad ``block_tokens`` or a shape mismatch.

  Examples:
    >>> import jax, jax.numpy as jnp, tnjax
    >>> ttm = tnjax.random_ttm(jax.random.key(0), (16, 32), (32, 16), rank=2)
    >>> x = jax.random.normal(jax.random.key(1), (3, 512))
    >>> y = matvec_fused(ttm, x, interpret=True)
    >>> bool(jnp.allclose(y, x @ tnjax.to_dense(ttm), atol=1e-4))
    True
  """
  fn = "matvec_fused"
  layout, why = _layout(ttm)
  if layout is None:
    raise ValueError(f"{fn}: {why}")
  check_matvec_args(fn, ttm, x)
  if block_tokens is not None:
    (_, _, _, _), (sa, _, _, sq), _ = layout
    least = 16 // min(sa, sq, 16)
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < least \
        or block_tokens & (block_tokens - 1):
      raise ValueError(f"{fn}: block_tokens={block_tokens!r} but a power of two >= {least} is expected")
  if backward not in BACKWARDS:
    raise ValueError(f"{fn}: backward={backward!r} but one of {BACKWARDS} is expected")
  rows = x.reshape(-1, ttm.shape[0])
  cores = tuple(c.astype(x.dtype) for c in ttm.cores)
  if backward == "dense":
    out = _fused_dense_bwd(cores, rows, block_tokens, num_warps, interpret)
  else:
    out = _fused(cores, rows, block_tokens, num_warps, (backward_block, backward_warps, backward_programs),
                 interpret)
  return out.reshape(x.shape[:-1] + (ttm.shape[1],))


def fused_work(ttm: TTMatrix, tokens: int, itemsize: int = 2):
  """(FLOPs, bytes moved) of each kernel on ``tokens`` rows, or None for a layout the kernels don't take.

  Keys: "forward" (the forward kernel: reads x, writes y), "input_grad" (the kernel making dX and dB: reads
  x and dy, writes dx) and "core_grad" (the kernel making dA: recomputes V, reads x once per output slab and
  dy once). FLOPs count the padded rank. For the cost model of
  [`tnjax.core.contraction.cost`][tnjax.core.contraction.cost].

  Examples:
    >>> import jax, tnjax
    >>> work = fused_work(tnjax.random_ttm(jax.random.key(0), (16, 48), (192, 16), rank=4), 16384)
    >>> work["forward"]  # 2 tokens r a q (b + p) FLOPs; tokens (768 + 3072) bf16 elements
    (8053063680, 125829120)
  """
  layout, _ = _layout(ttm)
  if layout is None:
    return None
  (a, b, p, q), (_, _, sp, _), r = layout
  m, n, per = a * b, p * q, 2 * tokens * r * a * q
  return {"forward": (per * (b + p), itemsize * tokens * (m + n)),
          "input_grad": (per * (p + 2 * b), itemsize * tokens * (2 * m + n)),
          "core_grad": (per * (b + p), itemsize * tokens * (m * (p // sp) + n))}
