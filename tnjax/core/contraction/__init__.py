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
* ``"fused"``: the Pallas kernels of [`tnjax.core.contraction.fused`][tnjax.core.contraction.fused]
  (two-core layouts such as [`fused_dims`][tnjax.core.contraction.fused.fused_dims],
  ranks <= 16, on a GPU), forward and backward; ``"fused_fwd"`` the forward
  kernel with the backward of ``"dense"``.
* ``"einsum"``: opt_einsum's fewest-FLOPs order (`tnjax.core.ops.matvec_einsum`);
  plain autodiff, forward mode too.

**Per direction.** A layer runs three products: the forward ``y = x W``, the
input gradient ``dx = g W^T`` and the core gradient. A `Plan` names a path for
each; ``path=`` takes one (or a 3-tuple). A plan on one XLA path is that path
(its own autodiff); any other runs in one ``custom_vjp`` that keeps
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
([`fused_work`][tnjax.core.contraction.fused.fused_work]). Defaults (`H100`) describe an
H100 in bf16; `CostModel` names the measurement behind each constant.
``"auto"`` (`choose_plan`) takes the cheapest forward, then the cheapest
gradients: the backward kernels where they beat the best XLA paths of both
gradients, and an XLA forward's own autodiff where it beats the per-product
picks (rebuild-W keeps W; `plan_seconds`). The kernels are candidates only
where they can run (a GPU backend, a layout
[`fused_supported`][tnjax.core.contraction.fused.fused_supported] takes), so off a GPU ``"auto"`` never
picks them and never warns. Asked for by name where they cannot run, a fused path warns with the reason
([`fused_unavailable`][tnjax.core.contraction.fused.fused_unavailable]) and runs ``"auto"``.

`linear` is `matvec` under its former name.

**Modules**, one per concern, imports running down the list:
[`dense`][tnjax.core.contraction.dense] (the rebuild-W path and what all paths share),
[`fused`][tnjax.core.contraction.fused] (the Pallas kernels),
[`cost`][tnjax.core.contraction.cost] (the cost model and `Plan`),
[`paths`][tnjax.core.contraction.paths] (direct, split and the per-direction plan),
[`gather`][tnjax.core.contraction.gather] (`gather_rows`) and
[`front`][tnjax.core.contraction.front] (`matvec`). This package re-exports their public names.
"""

from tnjax.core.contraction.cost import (
    H100,
    MATVEC_PATHS,
    PATHS,
    PRODUCT_PATHS,
    PRODUCTS,
    SPLIT_ORDERS,
    CostModel,
    Plan,
    choose_path,
    choose_plan,
    path_costs,
    path_flops,
    plan_seconds,
    product_costs,
)
from tnjax.core.contraction.dense import dense_backward, matvec_dense
from tnjax.core.contraction.front import linear, matvec
from tnjax.core.contraction.gather import gather_rows
from tnjax.core.contraction.paths import matvec_direct, matvec_split

__all__ = [
    "matvec", "linear", "matvec_dense", "matvec_direct", "matvec_split", "dense_backward", "gather_rows",
    "CostModel", "H100", "Plan", "PATHS", "MATVEC_PATHS", "PRODUCT_PATHS", "PRODUCTS", "SPLIT_ORDERS",
    "product_costs", "choose_plan", "choose_path", "plan_seconds", "path_costs", "path_flops",
]
