"""tnjax: tensor networks for large language models, in JAX.

The top level re-exports the core (pytrees, decompositions, contractions).
Higher layers (``tnjax.nn``, ``tnjax.models``, ...) are imported explicitly,
so ``import tnjax`` pulls in only jax, numpy and opt_einsum.
"""

from tnjax.core import (
    BlockTT,
    TensorTrain,
    TTMatrix,
    add,
    balance,
    btt_from_dense,
    btt_matvec,
    btt_to_dense,
    factorize,
    gather_rows,
    inner,
    matvec,
    matvec_plan,
    norm,
    orthogonalize,
    random_btt,
    random_tt,
    random_ttm,
    scale,
    to_dense,
    transpose,
    truncate,
    tt_svd,
    ttm_svd,
    whiten,
    whitened_spectrum,
    whitened_svd,
    whitened_ttm_svd,
)

__version__ = "0.1.0"

__all__ = [
    "TensorTrain", "TTMatrix", "BlockTT", "btt_from_dense", "btt_matvec", "btt_to_dense", "random_btt",
    "tt_svd", "ttm_svd", "truncate", "orthogonalize", "whitened_svd", "whitened_ttm_svd", "whitened_spectrum", "whiten",
    "to_dense", "matvec", "matvec_plan", "add", "scale", "balance", "inner", "norm",
    "random_tt", "random_ttm", "factorize", "transpose", "gather_rows",
]
