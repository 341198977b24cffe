"""Deprecated module path: the contraction entry point and its paths now live in the package
[`tnjax.core.contraction`][tnjax.core.contraction] (one module per concern: `cost`, `dense`, `paths`, `fused`,
`gather`, `front`). Import from there, or use ``tnjax.matvec``; this module only re-exports, so that
``from tnjax.core.linear import ...`` keeps working for every name it held (`transpose` is now
`tnjax.core.ops.transpose`; ``tests/test_imports.py`` lists the names).
"""

from tnjax.core.btt import BlockTT, btt_matvec  # noqa: F401
from tnjax.core.contraction import *  # noqa: F403  the package's public names (its __all__)
from tnjax.core.contraction.fused import DTYPES as FUSED_DTYPES  # noqa: F401
from tnjax.core.contraction.fused import (  # noqa: F401
    fused_backward,
    fused_forward,
    fused_supported,
    fused_unavailable,
    fused_work,
)
from tnjax.core.ops import check_matvec_args, matvec_einsum, matvec_plan, to_dense, transpose  # noqa: F401
from tnjax.core.tensor_train import TTMatrix  # noqa: F401
