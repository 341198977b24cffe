"""tnjax core: TT / TT-matrix pytrees, decompositions, contractions. Imports only jax, numpy, opt_einsum."""

from tnjax.core import fused, linear, ops  # noqa: F401  fused, linear: deprecated module paths, still attributes
from tnjax.core.btt import BlockTT, btt_from_dense, btt_matvec, btt_to_dense, random_btt
from tnjax.core.contraction import dense_backward, gather_rows, matvec
from tnjax.core.decompositions import balanced_svd, orthogonalize, truncate, truncation_rank, tt_svd, ttm_svd
from tnjax.core.initializers import random_tt, random_ttm
from tnjax.core.ops import add, balance, inner, matvec_plan, norm, scale, to_dense, transpose
from tnjax.core.shapes import factorize
from tnjax.core.tensor_train import TensorTrain, TTMatrix
from tnjax.core.whitening import whiten, whitened_spectrum, whitened_svd, whitened_ttm_svd

# Deprecated paths: ``tnjax.core.ops.matvec`` moved to the one contraction front door, `tnjax.core.contraction.matvec`,
# and ``tnjax.core.ops.dense_backward`` to `tnjax.core.contraction.dense`. The aliases are set here, so that ops
# (which the contraction package builds on) imports nothing back.
ops.matvec = matvec
ops.dense_backward = dense_backward

__all__ = [
    "TensorTrain", "TTMatrix", "BlockTT", "btt_from_dense", "btt_matvec", "btt_to_dense", "random_btt",
    "tt_svd", "ttm_svd", "truncate", "truncation_rank", "balanced_svd", "orthogonalize",
    "whitened_svd", "whitened_ttm_svd", "whitened_spectrum", "whiten",
    "to_dense", "matvec", "matvec_plan", "add", "scale", "balance", "inner", "norm",
    "random_tt", "random_ttm", "factorize", "transpose", "gather_rows",
]
