"""The contraction entry point, `matvec` (``tnjax.matvec``), its paths, and the cost model choosing them.

A TT-matrix layer computes ``x @ W`` for ``W = to_dense(ttm)``. Paths:

* ``"dense"``: rebuild ``W`` from the cores (a chain of d - 1 small
  contractions), then one matmul. Autodiff of this path forms the full weight
  gradient ``x^T g`` once and projects it onto the cores, the backward of the
  TTM GPT-2 paper. Fast when tokens >> parameters.
* ``"direct"``: absorb the cores into ``x`` one at a time, never forming
  ``W``. The order (which core first, growing a connected run of absorbed
  cores) is chosen by the cost model. Its backward (`matvec_direct`'s
  ``custom_vjp``) keeps only ``x`` and the cores as residuals and recomputes
  the intermediates, so activation memory stays near a dense layer's.
* ``"split"``: merge the cores on each side of one bond into two factors,
  ``A`` (in_1, out_1, r) and ``B`` (r, in_2, out_2), then two matmuls with
  ``x`` (`matvec_split`). Two large contractions instead of d small
  ones: the fastest path at decode-time token counts, and at many tokens for
  two-core layouts whose intermediate (tokens x out_1 x r x in_2) is small.
* ``"fused"``: the Pallas kernels of [`tnjax.core.fused`][tnjax.core.fused]
  (two-core layouts such as [`fused_dims`][tnjax.core.fused.fused_dims],
  ranks <= 16, on a GPU), forward and backward; ``"fused_fwd"`` the forward
  kernel with the backward of ``"dense"``.
* ``"einsum"``: opt_einsum's fewest-FLOPs order (`tnjax.core.ops.matvec_einsum`);
  plain autodiff, forward mode too.

**Per direction.** A layer runs three products: the forward ``y = x W``, the
input gradient ``dx = g W^T`` and the core gradient. A `Plan` names a path for
each; ``path=`` takes one (or a 3-tuple). A plan on one XLA path is that path
(its own autodiff); any other runs in one ``custom_vjp`` (`_planned`) that keeps
only ``x`` and the cores and runs each gradient on its path. The two backward
kernels make both gradients, so a plan has them for both or neither.
``"fused"`` is ``Plan("fused", "fused", "fused")``, ``"fused_fwd"``
``Plan("fused", "dense", "dense")``.

**The cost model** estimates time as a roofline per contraction step,
``max(flops / peak_flops, bytes / bandwidth) + launch``, summed over steps,
where bytes count every operand read and result written, and a relayout
(transpose copy) of an operand that XLA has to make before a contraction is
a step of its own (`product_costs`: each product on each path). The fused
kernels get their own rooflines from their FLOPs and bytes
([`fused_work`][tnjax.core.fused.fused_work]). Defaults (`H100`) describe an
H100 in bf16; `CostModel` names the measurement behind each constant.
``"auto"`` (`choose_plan`) takes the cheapest forward, then the cheapest
gradients: the backward kernels where they beat the best XLA paths of both
gradients, and an XLA forward's own autodiff where it beats the per-product
picks (rebuild-W keeps W; `plan_seconds`). The kernels are candidates only
where they can run (a GPU backend, a layout [`fused_supported`][tnjax.core.fused.fused_supported]
takes), so off a GPU ``"auto"`` never picks them and never warns. Asked for by
name where they cannot run, a fused path warns with the reason
([`fused_unavailable`][tnjax.core.fused.fused_unavailable]) and runs ``"auto"``.

`linear` is `matvec` under its former name.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import opt_einsum

from tnjax.core.btt import BlockTT, btt_matvec
from tnjax.core.fused import DTYPES as FUSED_DTYPES
from tnjax.core.fused import fused_backward, fused_forward, fused_supported, fused_unavailable, fused_work
from tnjax.core.ops import check_matvec_args, dense_backward, matvec_einsum, matvec_plan, to_dense
from tnjax.core.tensor_train import TTMatrix


class CostModel(NamedTuple):
  """Roofline constants: the XLA paths' (peak FLOP/s forward and in the two gradient products, memory
  bytes/s, seconds per kernel launch, bytes per element) and the fused Pallas kernels' (FLOP/s and bytes/s
  of the forward kernel and of the two backward kernels).

  The defaults describe an H100 in bf16 (JAX 0.11.2), each fitted to one measurement at 16,384 tokens,
  768 x 3072, time per call inside one jit (``benchmarks/bench_ttm_linear.py``):

  - ``peak_flops`` 5.5e14: XLA's dense forward matmul (``benchmarks/results/ttm_linear_h100.jsonl``).
  - ``grad_flops`` 7.3e14: its two backward matmuls (dense fwd+bwd 358 us minus fwd 148 us, 2 x 77 GFLOP in
    210 us; ``ttm_linear_fusedfwd_h100.jsonl``, rank 4 rows).
  - ``bandwidth`` 2e12, ``launch`` 4 us: the small contractions and relayouts (decode and 16k-token runs).
  - ``fused_bandwidth`` 1.25e12: the forward kernel at rank 4, memory-bound (reads x, writes y: 126 MB)
    in ~105 us, the median of 95 us (``ttm_linear_h100.jsonl``), 120 us and 104 us
    (``ttm_linear_fusedfwd_h100.jsonl``, paths "fused" and "fused_fwd").
  - ``fused_flops`` 1.95e14: the forward kernel at rank 16, compute-bound (32 GFLOP in 169 us,
    ``ttm_linear_h100.jsonl``).
  - ``fused_grad_bandwidth`` 1.6e12: the backward kernels at rank 4 (327 MB in 210 us = "fused" fwd+bwd
    330 us minus its forward 120 us, ``ttm_linear_fusedfwd_h100.jsonl``).
  - ``fused_grad_flops`` 1.2e14: the backward kernels at rank 8 (35 GFLOP in 309 us = 425 us minus 116 us,
    same file).

  Another device (or dtype) needs its own constants: `benchmarks/bench_auto_path.py` prints how far
  ``"auto"`` lands from the best path with these.

  Examples:
    >>> slow = CostModel(peak_flops=1e14, bandwidth=1e12, launch=5e-6)  # a smaller GPU
    >>> import jax, tnjax
    >>> choose_path(tnjax.random_ttm(jax.random.key(0), (8, 8, 12), (12, 16, 16), rank=16), 1, slow)
    'split'
  """

  peak_flops: float = 5.5e14
  bandwidth: float = 2.0e12
  launch: float = 4.0e-6
  itemsize: int = 2
  grad_flops: float = 7.3e14
  fused_flops: float = 1.95e14
  fused_bandwidth: float = 1.25e12
  fused_grad_flops: float = 1.2e14
  fused_grad_bandwidth: float = 1.6e12


H100 = CostModel()

PATHS = ("auto", "dense", "direct", "split", "fused", "fused_fwd")  # a layer's paths (TTMLinear, LayerSpec)
MATVEC_PATHS = PATHS + ("einsum",)  # `matvec` also takes opt_einsum's order, an algebra path
PRODUCT_PATHS = ("dense", "direct", "split", "fused")  # what one product of a `Plan` may run on
PRODUCTS = ("forward", "input_grad", "core_grad")
SPLIT_ORDERS = ("prefix", "suffix")


class Plan(NamedTuple):
  """The path of each product of a TT-matrix layer: ``y = x W`` (forward), ``dx = g W^T`` (input_grad)
  and the cores' gradient from ``x`` and ``g`` (core_grad), each one of `PRODUCT_PATHS`.

  "fused" for a gradient means the two backward kernels, which make both gradients together: input_grad
  and core_grad are "fused" together or not at all. A plan whose three entries name one XLA path is that
  path (its own autodiff); any other runs in one custom VJP (reverse mode only, like "direct").

  Examples:
    >>> Plan("fused", "dense", "dense")  # the forward kernel, the rebuild-W backward: path "fused_fwd"
    Plan(forward='fused', input_grad='dense', core_grad='dense')
  """

  forward: str
  input_grad: str
  core_grad: str


def transpose(ttm: TTMatrix) -> TTMatrix:
  """The TT-matrix of ``W.T``: swaps each core's input and output modes.

  Examples:
    >>> import jax, jax.numpy as jnp, tnjax
    >>> ttm = tnjax.random_ttm(jax.random.key(0), (2, 3), (4, 5), rank=2)
    >>> bool(jnp.allclose(tnjax.to_dense(tnjax.transpose(ttm)), tnjax.to_dense(ttm).T))
    True
  """
  return TTMatrix(tuple(c.transpose(0, 2, 1, 3) for c in ttm.cores))


def _step_seconds(flops: float, elements: float, cost: CostModel) -> float:
  return max(flops / cost.peak_flops, elements * cost.itemsize / cost.bandwidth) + cost.launch


def _connected_orders(d: int):
  """Orders of absorbing d cores where each new core is next to the absorbed run."""
  for first in range(d):
    # a run grows left or right; choose which side at each of the d - 1 steps
    for sides in itertools.product((0, 1), repeat=d - 1):
      lo = hi = first
      order, ok = [first], True
      for side in sides:
        if side == 0:
          lo -= 1
          ok &= lo >= 0
          order.append(lo)
        else:
          hi += 1
          ok &= hi < d
          order.append(hi)
      if ok:
        yield tuple(order)


def _direct_steps(shapes: tuple[tuple[int, ...], ...], batch: int, order: tuple[int, ...]):
  """(flops, elements read and written) of each absorption step, in order.

  Before a step the state holds the batch, the in-modes not yet absorbed, the
  out-modes absorbed so far and the two open bonds at the ends of the absorbed
  run. Absorbing core k sums over its in-mode and the bond it shares with the
  run, and adds its out-mode and its outer bond(s).
  """
  d = len(shapes)
  done: list[int] = []
  steps = []
  for k in order:
    r, i, o, r_next = shapes[k]
    rest_in = math.prod(shapes[j][1] for j in range(d) if j not in done)
    outs = math.prod(shapes[j][2] for j in done)
    bonds = shapes[min(done)][0] * shapes[max(done)][3] if done else 1
    state = batch * rest_in * outs * bonds
    if not done:
      added = r * r_next
    else:
      added = r if k < min(done) else r_next
    done.append(k)
    new = batch * (rest_in // i) * outs * o * shapes[min(done)][0] * shapes[max(done)][3]
    steps.append((2 * state * o * added, state + r * i * o * r_next + new))
    steps.append((0, 2 * new))  # the einsum's result relaid out for the next contraction
  return steps


@functools.lru_cache(maxsize=512)
def _best_direct(shapes: tuple[tuple[int, ...], ...], batch: int, cost: CostModel):
  best = None
  for order in _connected_orders(len(shapes)):
    seconds = sum(_step_seconds(f, e, cost) for f, e in _direct_steps(shapes, batch, order))
    if best is None or seconds < best[0]:
      best = (seconds, order)
  return best


def _merge_steps(shapes: tuple[tuple[int, ...], ...]) -> list[tuple[float, float]]:
  """(flops, elements) of contracting a run of cores into one (as `_merge_run`)."""
  steps, left = [], math.prod(shapes[0])
  for r, i, o, r_next in shapes[1:]:
    new = left // r * i * o * r_next
    steps.append((2 * (left // r) * r * i * o * r_next, left + r * i * o * r_next + new))
    left = new
  return steps


def _rebuild_steps(shapes: tuple[tuple[int, ...], ...]) -> list[tuple[float, float]]:
  """Rebuilding W: the merges, then one relayout (the merged cores come out with in and out modes
  interleaved)."""
  return _merge_steps(shapes) + [(0, 2 * math.prod(s[1] * s[2] for s in shapes))]


def _dense_seconds(shapes: tuple[tuple[int, ...], ...], batch: int, cost: CostModel) -> float:
  m = math.prod(s[1] for s in shapes)
  n = math.prod(s[2] for s in shapes)
  steps = _rebuild_steps(shapes) + [(2 * batch * m * n, batch * m + m * n + batch * n)]
  return sum(_step_seconds(f, e, cost) for f, e in steps)


def _split_steps(shapes: tuple[tuple[int, ...], ...], batch: int, s: int, order: str):
  """(flops, elements) of each step of `matvec_split` at bond ``s``: merging both factors, then two
  contractions and the relayouts XLA makes around them (measured on an H100: the prefix order transposes x
  and the intermediate; the suffix order the intermediate and the result)."""
  i1, o1 = math.prod(x[1] for x in shapes[:s]), math.prod(x[2] for x in shapes[:s])
  i2, o2 = math.prod(x[1] for x in shapes[s:]), math.prod(x[2] for x in shapes[s:])
  r, n = shapes[s][0], batch
  steps = _merge_steps(shapes[:s]) + _merge_steps(shapes[s:])
  if order == "prefix":
    mid = n * o1 * r * i2
    return steps + [(0, 2 * n * i1 * i2), (2 * mid * i1, n * i1 * i2 + i1 * o1 * r + mid), (0, 2 * mid),
                    (2 * mid * o2, mid + r * i2 * o2 + n * o1 * o2)]
  mid = n * i1 * r * o2
  return steps + [(2 * mid * i2, n * i1 * i2 + r * i2 * o2 + mid), (0, 2 * mid),
                  (2 * mid * o1, mid + i1 * o1 * r + n * o1 * o2), (0, 2 * n * o1 * o2)]


@functools.lru_cache(maxsize=512)
def _best_split(shapes: tuple[tuple[int, ...], ...], batch: int, cost: CostModel):
  """(seconds, bond, order) of the cheapest split, or None for a single core."""
  best = None
  for s in range(1, len(shapes)):
    for order in SPLIT_ORDERS:
      seconds = sum(_step_seconds(f, e, cost) for f, e in _split_steps(shapes, batch, s, order))
      if best is None or seconds < best[0]:
        best = (seconds, s, order)
  return best


_XLA_PATHS = ("dense", "direct", "split")


def _transposed(shapes: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
  return tuple((r, o, i, r_next) for r, i, o, r_next in shapes)


def _xla_seconds(path: str, shapes: tuple[tuple[int, ...], ...], batch: int, cost: CostModel) -> float:
  """Estimated seconds of ``x @ W`` by an XLA path."""
  if path == "dense":
    return _dense_seconds(shapes, batch, cost)
  if path == "direct":
    return _best_direct(shapes, batch, cost)[0]
  split = _best_split(shapes, batch, cost)
  return math.inf if split is None else split[0]


def _dense_core_grad_seconds(shapes: tuple[tuple[int, ...], ...], batch: int, cost: CostModel) -> float:
  """Rebuild W, ``dW = x^T g`` (one matmul over the tokens), then project dW back through the merges."""
  m = math.prod(s[1] for s in shapes)
  n = math.prod(s[2] for s in shapes)
  steps = _rebuild_steps(shapes) + [(2 * batch * m * n, batch * m + batch * n + m * n)] + _rebuild_steps(shapes) \
      + _merge_steps(shapes)  # the projection: the rebuild's steps transposed, two products per merge
  return sum(_step_seconds(f, e, cost) for f, e in steps)


def _fused_here(ttm: TTMatrix, gpu: bool | None) -> bool:
  """Whether the fused kernels are candidates: a layout they take, on a GPU (``gpu=None``: the default
  backend is one; True/False say so, e.g. to see a GPU's choice from a CPU)."""
  if gpu is None:
    gpu = jax.default_backend() == "gpu"
  return bool(gpu) and fused_supported(ttm)


def product_costs(ttm: TTMatrix, batch: int, cost: CostModel = H100, *,
                  gpu: bool | None = None) -> dict[str, dict[str, float]]:
  """Estimated seconds of each product of a layer (`PRODUCTS`) on each path, for ``batch`` rows.

  - forward ``y = x W``: each path's steps (see the module docstring).
  - input_grad ``dx = g W^T``: the forward estimate of the transposed TT-matrix, at ``cost.grad_flops``.
  - core_grad: "dense" rebuilds W, forms ``dW = x^T g`` and projects it onto the cores; "direct" and
    "split" recompute their forward and run its transposed steps (a second forward estimate, at
    ``cost.grad_flops``).
  - "fused" (where the kernels can run, see `choose_plan`'s ``gpu``): each kernel's roofline from
    [`fused_work`][tnjax.core.fused.fused_work] and the ``fused_*`` constants, plus one launch. The
    input_grad kernel also makes dB; the two backward kernels run together.

  Examples:
    >>> import jax, tnjax
    >>> ttm = tnjax.random_ttm(jax.random.key(0), (16, 48), (192, 16), rank=4)
    >>> costs = product_costs(ttm, 16384, gpu=True)
    >>> sorted(costs["forward"]), round(costs["forward"]["fused"] / costs["forward"]["dense"], 2)
    (['dense', 'direct', 'fused', 'split'], 0.66)
  """
  shapes = tuple(c.shape for c in ttm.cores)
  grad = cost._replace(peak_flops=cost.grad_flops)
  forward = {p: _xla_seconds(p, shapes, batch, cost) for p in _XLA_PATHS}
  input_grad = {p: _xla_seconds(p, _transposed(shapes), batch, grad) for p in _XLA_PATHS}
  core_grad = {"dense": _dense_core_grad_seconds(shapes, batch, grad),
               **{p: forward[p] + _xla_seconds(p, shapes, batch, grad) for p in ("direct", "split")}}
  costs = {"forward": forward, "input_grad": input_grad, "core_grad": core_grad}
  if _fused_here(ttm, gpu):
    work = fused_work(ttm, batch, cost.itemsize)
    rates = {"forward": (cost.fused_flops, cost.fused_bandwidth)}
    rates["input_grad"] = rates["core_grad"] = (cost.fused_grad_flops, cost.fused_grad_bandwidth)
    for product, (flops, moved) in work.items():
      peak, bandwidth = rates[product]
      costs[product]["fused"] = max(flops / peak, moved / bandwidth) + cost.launch
  return costs


def choose_plan(ttm: TTMatrix, batch: int, cost: CostModel = H100, *, gpu: bool | None = None) -> Plan:
  """The `Plan` of ``"auto"`` for ``batch`` rows: each product on its cheapest path (`product_costs`).

  The forward is the cheapest forward (inference runs nothing else). The backward kernels make both
  gradients, so they are chosen when they beat the cheapest XLA paths of the two gradients together; and
  an XLA forward's own autodiff (`plan_seconds`: rebuild-W keeps W) is kept when it beats the gradients'
  cheapest paths. "fused" is a candidate only where the kernels run: a layout
  [`fused_supported`][tnjax.core.fused.fused_supported] takes, and ``gpu`` (default: whether JAX's default
  backend is a GPU; pass True to see what a GPU would run, e.g. in a test on a CPU).

  Examples:
    >>> import jax, tnjax
    >>> fused_layout = lambda rank: tnjax.random_ttm(jax.random.key(0), (16, 48), (192, 16), rank=rank)
    >>> choose_plan(fused_layout(4), 16384, gpu=True)  # measured best: the kernels both ways
    Plan(forward='fused', input_grad='fused', core_grad='fused')
    >>> choose_plan(fused_layout(8), 16384, gpu=True)  # the forward kernel, the rebuild-W backward
    Plan(forward='fused', input_grad='dense', core_grad='dense')
    >>> choose_plan(fused_layout(8), 16384, gpu=False)
    Plan(forward='dense', input_grad='dense', core_grad='dense')
  """
  costs = product_costs(ttm, batch, cost, gpu=gpu)
  cheapest = lambda product: min((p for p in costs[product] if p != "fused"), key=costs[product].get)
  forward = min(costs["forward"], key=costs["forward"].get)
  input_grad, core_grad = cheapest("input_grad"), cheapest("core_grad")
  kernels = costs["input_grad"].get("fused", math.inf) + costs["core_grad"].get("fused", math.inf)
  if kernels < costs["input_grad"][input_grad] + costs["core_grad"][core_grad]:
    input_grad = core_grad = "fused"
  plan = Plan(forward, input_grad, core_grad)
  if forward != "fused" and plan != Plan(forward, forward, forward):
    # the forward path's own autodiff keeps what its forward built ("dense" keeps W): it may beat the
    # gradients' cheapest paths taken one by one. The forward is never traded for a cheaper backward:
    # inference runs only the forward.
    plan = min(plan, Plan(forward, forward, forward), key=lambda p: plan_seconds(ttm, batch, p, cost, costs=costs))
  return plan


def plan_seconds(ttm: TTMatrix, batch: int, plan: Plan, cost: CostModel = H100, *, costs=None) -> float:
  """Estimated forward+backward seconds of ``plan`` (the sum of its products in `product_costs`; the
  rebuild-W path's own autodiff rebuilds W once, not once per product).

  Examples:
    >>> import jax, tnjax
    >>> ttm = tnjax.random_ttm(jax.random.key(0), (16, 48), (192, 16), rank=4)
    >>> fused, dense = Plan("fused", "fused", "fused"), Plan("dense", "dense", "dense")
    >>> round(plan_seconds(ttm, 16384, fused) / plan_seconds(ttm, 16384, dense), 2)  # measured 0.86
    0.79
  """
  costs = product_costs(ttm, batch, cost, gpu="fused" in plan) if costs is None else costs
  seconds = sum(costs[product][path] for product, path in zip(PRODUCTS, plan))
  if plan == Plan("dense", "dense", "dense"):
    shapes = tuple(c.shape for c in ttm.cores)
    grad = cost._replace(peak_flops=cost.grad_flops)
    seconds -= 2 * sum(_step_seconds(f, e, grad) for f, e in _rebuild_steps(shapes))
  return seconds


def path_costs(ttm: TTMatrix, batch: int, cost: CostModel = H100, *, gpu: bool | None = None) -> dict[str, float]:
  """Estimated forward seconds of each path for ``batch`` rows (`product_costs`'s "forward").

  Examples:
    >>> import jax, tnjax
    >>> ttm = tnjax.random_ttm(jax.random.key(0), (8, 8, 12), (12, 16, 16), rank=16)
    >>> sorted(path_costs(ttm, batch=16384))
    ['dense', 'direct', 'split']
  """
  return product_costs(ttm, batch, cost, gpu=gpu)["forward"]


def path_flops(ttm: TTMatrix, batch: int, path: str = "auto", cost: CostModel = H100) -> int:
  """Forward FLOPs (2 per multiply-add) of ``matvec(ttm, x, path=path)`` on ``batch`` rows.

  "dense" counts rebuilding W once plus the matmul; "direct" and "split" their
  contraction steps in the order the cost model picks; "auto" the forward path it
  picks; "fused" and "fused_fwd" count as "split" (the kernel makes the same
  two products, keeping the intermediate on chip); "einsum" opt_einsum's count.

  Examples:
    >>> import jax, tnjax
    >>> ttm = tnjax.random_ttm(jax.random.key(0), (8, 8, 12), (12, 16, 16), rank=16)
    >>> path_flops(ttm, 16384, "dense") - 2 * 16384 * 768 * 3072  # rebuilding W
    81788928
  """
  if path not in MATVEC_PATHS:
    raise ValueError(f"path_flops: path={path!r} but one of {MATVEC_PATHS} is expected")
  shapes = tuple(c.shape for c in ttm.cores)
  if path == "einsum":
    return int(matvec_plan(ttm, batch).opt_cost)
  if path == "auto":
    path = choose_path(ttm, batch, cost)
  if path in ("fused", "fused_fwd"):
    path = "split"
  if path == "split" and len(shapes) == 1:
    path = "dense"  # one core is W itself
  if path == "dense":
    m, n = math.prod(s[1] for s in shapes), math.prod(s[2] for s in shapes)
    steps = _merge_steps(shapes) + [(2 * batch * m * n, 0)]
  elif path == "direct":
    steps = _direct_steps(shapes, batch, _best_direct(shapes, batch, cost)[1])
  else:
    _, bond, order = _best_split(shapes, batch, cost)
    steps = _split_steps(shapes, batch, bond, order)
  return int(sum(f for f, _ in steps))


def choose_path(ttm: TTMatrix, batch: int, cost: CostModel = H100, *, gpu: bool | None = None) -> str:
  """The forward path of `choose_plan`: ``"dense"``, ``"direct"``, ``"split"`` or, on a GPU, ``"fused"``.

  Examples:
    >>> import jax, tnjax
    >>> ttm = tnjax.random_ttm(jax.random.key(0), (8, 8, 12), (12, 16, 16), rank=32)
    >>> choose_path(ttm, batch=1), choose_path(ttm, batch=16384)
    ('split', 'dense')
  """
  return choose_plan(ttm, batch, cost, gpu=gpu).forward


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


def _as_rows(fn: str, ttm: TTMatrix, x: jax.Array) -> jax.Array:
  check_matvec_args(fn, ttm, x)
  return x.reshape(-1, ttm.shape[0])


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


def matvec_dense(ttm: TTMatrix, x: jax.Array, *, precision=None) -> jax.Array:
  """``x @ to_dense(ttm)`` by rebuilding W, then one matmul (autodiff projects dW onto the cores)."""
  rows = _as_rows("matvec_dense", ttm, x)
  out = jnp.matmul(rows, to_dense(ttm), precision=precision)
  return out.reshape(x.shape[:-1] + (ttm.shape[1],))


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


def _merge_run(cores) -> jax.Array:
  """Contracts a run of TTM cores into one core (r_left, prod(in), prod(out), r_right)."""
  out = cores[0]
  for core in cores[1:]:
    a, i, o, _ = out.shape
    _, j, p, c = core.shape
    out = jnp.einsum("aiob,bjpc->aijopc", out, core).reshape(a, i * j, o * p, c)
  return out


def _gather_split(shapes: tuple[tuple[int, ...], ...], tokens: int) -> int:
  """The split s minimizing elements held: prefix table + suffix table + per-token gathered rows."""
  def held(s):
    pre_in, pre_out = math.prod(x[1] for x in shapes[:s]), math.prod(x[2] for x in shapes[:s])
    suf_in, suf_out = math.prod(x[1] for x in shapes[s:]), math.prod(x[2] for x in shapes[s:])
    r = shapes[s][0]
    return pre_in * pre_out * r + r * suf_in * suf_out + tokens * r * (pre_out + suf_out)

  return min(range(1, len(shapes)), key=held)


def gather_rows(ttm: TTMatrix, ids: jax.Array) -> jax.Array:
  """Rows ``to_dense(ttm)[ids]`` without forming the matrix.

  The cores are split at a bond s into a prefix and a suffix, each merged
  into a small table (prefix: prod(in_dims[:s]) x prod(out_dims[:s]) x r[s];
  suffix: r[s] x prod(in_dims[s:]) x prod(out_dims[s:])). Each id selects one
  row of each table by its leading and trailing digits (row-major over
  ``in_dims``), and the two rows are contracted over r[s]. The split is the
  one holding the fewest elements for this many ids. For GPT-2's 50257 x 768
  table at rank 32 the tables hold 2.1M elements, not 38.6M.

  Args:
    ttm: cores (r[k], n_in[k], n_out[k], r[k+1]).
    ids: integer array of any shape, values in [0, prod(in_dims)).

  Returns:
    ids.shape + (prod(out_dims),).

  Complexity:
    Building the tables, plus per id 2 * r[s] * prod(out_dims) FLOPs.

  Examples:
    >>> import jax, jax.numpy as jnp, tnjax
    >>> ttm = tnjax.random_ttm(jax.random.key(0), (4, 5), (2, 3), rank=2)
    >>> ids = jnp.array([[0, 19], [7, 7]])
    >>> bool(jnp.allclose(tnjax.gather_rows(ttm, ids), tnjax.to_dense(ttm)[ids], atol=1e-6))
    True
  """
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"gather_rows: ids.dtype={ids.dtype} but an integer dtype is expected")
  if not isinstance(ttm, TTMatrix):
    raise ValueError(f"gather_rows: ttm is a {type(ttm).__name__} but a TTMatrix is expected")
  flat = ids.reshape(-1)
  if ttm.ndim == 1:
    return jnp.take(ttm.cores[0][0, :, :, 0], flat, axis=0).reshape(ids.shape + (ttm.shape[1],))
  shapes = tuple(c.shape for c in ttm.cores)
  s = _gather_split(shapes, flat.shape[0])
  prefix = _merge_run(ttm.cores[:s])[0]  # (I1, O1, r)
  suffix = _merge_run(ttm.cores[s:])[..., 0]  # (r, I2, O2)
  rows = jnp.take(prefix, flat // suffix.shape[1], axis=0)  # (t, O1, r)
  cols = jnp.take(suffix, flat % suffix.shape[1], axis=1)  # (r, t, O2)
  out = jnp.einsum("tpr,rtq->tpq", rows, cols)
  return out.reshape(ids.shape + (ttm.shape[1],))
