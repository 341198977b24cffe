"""The cost model of [`tnjax.matvec`][tnjax.matvec]: a roofline estimate of each product (forward, input
gradient, core gradient) on each path, and the `Plan` that ``path="auto"`` runs.

Time is estimated per contraction step as ``max(flops / peak_flops, bytes / bandwidth) + launch``, summed over
steps, where bytes count every operand read and result written, and a relayout (transpose copy) of an operand
that XLA has to make before a contraction is a step of its own (`product_costs`). The fused kernels get their
own rooflines from their FLOPs and bytes ([`fused_work`][tnjax.core.contraction.fused.fused_work]). Defaults
(`H100`) describe an H100 in bf16; `CostModel` names the measurement behind each constant. The paths
themselves are in [`tnjax.core.contraction.paths`][tnjax.core.contraction.paths] and
[`tnjax.core.contraction.dense`][tnjax.core.contraction.dense]; this module only counts their steps.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import jax

from tnjax.core.contraction.fused import fused_supported, fused_work
from tnjax.core.ops import matvec_plan
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

  - forward ``y = x W``: each path's steps (the paths are described in `tnjax.core.contraction`).
  - input_grad ``dx = g W^T``: the forward estimate of the transposed TT-matrix, at ``cost.grad_flops``.
  - core_grad: "dense" rebuilds W, forms ``dW = x^T g`` and projects it onto the cores; "direct" and
    "split" recompute their forward and run its transposed steps (a second forward estimate, at
    ``cost.grad_flops``).
  - "fused" (where the kernels can run, see `choose_plan`'s ``gpu``): each kernel's roofline from
    [`fused_work`][tnjax.core.contraction.fused.fused_work] and the ``fused_*`` constants, plus one
    launch. The input_grad kernel also makes dB; the two backward kernels run together.

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
  [`fused_supported`][tnjax.core.contraction.fused.fused_supported] takes, and ``gpu`` (default: whether
  JAX's default backend is a GPU; pass True to see what a GPU would run, e.g. in a test on a CPU).

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
