"""Deprecated module path: the fused Pallas kernels now live in
[`tnjax.core.contraction.fused`][tnjax.core.contraction.fused], beside the paths and the cost model that use
them. Import from there; this module only re-exports, so that ``from tnjax.core.fused import ...`` (and
``tnjax.core.fused.fused_dims``) keeps working for every name it held.
"""

from tnjax.core.contraction.fused import *  # noqa: F403  every public name of the kernels' module, as before
