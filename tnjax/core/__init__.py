"""tnjax core: TT / TT-matrix pytrees, decompositions, contractions. Imports only jax, numpy, opt_einsum."""

from tnjax.core import ops
from tnjax.core.btt import BlockTT, btt_from_dense, btt_matvec, btt_to_dense, random_btt
from tnjax.core.decompositions import balanced_svd, orthogonalize, truncate, truncation_rank, tt_svd, ttm_svd
from tnjax.core.initializers import random_tt, random_ttm
from tnjax.core.linear import gather_rows, matvec, transpose
from tnjax.core.ops import add, balance, inner, matvec_plan, norm, scale, to_dense
from tnjax.core.shapes import factorize
from tnjax.core.tensor_train import TensorTrain, TTMatrix
from tnjax.core.whitening import whiten, whitened_spectrum, whitened_svd, whitened_ttm_svd

# Deprecated path: ``tnjax.core.ops.matvec`` moved to the one contraction front door, `tnjax.core.linear.matvec`.
# The alias is set here, so that ops (which linear builds on) imports nothing back.
ops.matvec = matvec

__all__ = [
    "TensorTrain", "TTMatrix", "BlockTT", "btt_from_dense", "btt_matvec", "btt_to_dense", "random_btt",
    "tt_svd", "ttm_svd", "truncate", "truncation_rank", "balanced_svd", "orthogonalize",
    "whitened_svd", "whitened_ttm_svd", "whitened_spectrum", "whiten",
    "to_dense", "matvec", "matvec_plan", "add", "scale", "balance", "inner", "norm",
    "random_tt", "random_ttm", "factorize", "transpose", "gather_rows",
]
