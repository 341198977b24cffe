"""Flax NNX layers over the core: TT-matrix (MPO) and Block-TT linear, TT, MPS and low-rank embeddings with a tied
head, low-rank linear.

Each module is a thin wrapper: parameters are held as NNX variables and the
math is the core's pure functions ([`tnjax.core.contraction`][tnjax.core.contraction]).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tnjax.core import _checks
from tnjax.core.btt import (
    BlockTT,
    btt_dims,
    btt_flops,
    btt_from_dense,
    btt_matvec,
    btt_to_dense,
    check_btt_dims,
    random_btt,
)
from tnjax.core.contraction import H100, PATHS, CostModel, gather_rows, matvec, path_flops
from tnjax.core.decompositions import balanced_svd, tt_svd, ttm_svd
from tnjax.core.initializers import random_tt, random_ttm
from tnjax.core.ops import to_dense, transpose
from tnjax.core.shapes import factorize, pad_last
from tnjax.core.tensor_train import TTMatrix
from tnjax.nn.quant import QUANTS, dequantize, quantize


class TTParam(nnx.Param):
  """A core of a tensor-train layer. Subclasses ``nnx.Param``, so optimizers see it as a
  parameter while filters (``nnx.All(TTParam)``, optax masks) can single out TT cores."""


def _check_path(fn: str, path: str) -> str:
  if path not in PATHS:
    raise ValueError(f"{fn}: path={path!r} but one of {PATHS} is expected")
  return path


def _layer_dims(fn: str, features: int, dims, num_cores: int, name: str, features_name: str) -> tuple[int, ...]:
  """Dims for a feature size: given (checked to cover it) or factorized."""
  if dims is None:
    return factorize(features, num_cores)
  dims = _checks.check_dims(fn, name, dims)
  if math.prod(dims) < features:
    raise ValueError(f"{fn}: prod({name})={math.prod(dims)} but {features_name}={features}; "
                     f"expected prod({name}) >= {features_name} ({name}={dims})")
  return dims


def _check_quant(fn: str, quant) -> str | None:
  if quant not in QUANTS:
    raise ValueError(f"{fn}: quant={quant!r} but one of {QUANTS} is expected")
  return quant


def _stored(values, quant) -> tuple[list, list | None]:
  """The arrays a layer stores for float ``values``: themselves, or int8 values and per-channel scales."""
  if quant is None:
    return list(values), None
  pairs = [quantize(v) for v in values]
  return [q for q, _ in pairs], [s for _, s in pairs]


def _weights(values, scales) -> list[jax.Array]:
  """Float weights back from what ``_stored`` kept."""
  if scales is None:
    return [v[...] for v in values]
  return [dequantize(v[...], s[...]) for v, s in zip(values, scales)]


def _check_ids(fn: str, ids, num_embeddings: int) -> tuple[jax.Array, jax.Array]:
  """Integer ids and their validity mask; concrete out-of-range ids raise (under jit their rows become NaN)."""
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"{fn}: ids.dtype={ids.dtype} but an integer dtype is expected")
  valid = (ids >= 0) & (ids < num_embeddings)
  if _checks.is_concrete(valid) and not bool(valid.all()):
    bad = ids[~valid]
    raise ValueError(f"{fn}: ids contain {int(bad[0])} but 0 <= id < num_embeddings={num_embeddings} is expected")
  return ids, valid


def _need_init(fn: str, rank, rngs, instead: str) -> None:
  for name, value in (("rank", rank), ("rngs", rngs)):
    if value is None:
      raise ValueError(f"{fn}: {name}=None but a random init needs {name} (or pass {instead} instead)")


def _add_bias(y: jax.Array, bias: jax.Array | None) -> jax.Array:
  return y if bias is None else y + bias.reshape((1,) * (y.ndim - 1) + (-1,))


def _core_params(cores) -> int:
  return sum(math.prod(c.shape) for c in cores)


def _stored_params(layer) -> int:
  """A core-holding layer's stored parameters: cores, int8 scales if any, and bias."""
  scales = 0 if layer.scales is None else _core_params(layer.scales)
  return _core_params(layer.cores) + scales + (layer.out_features if layer.bias is not None else 0)


def _make_cores(fn: str, rows: tuple, cols: tuple, *, rank, num_cores, std, param_dtype, rngs, ttm,
                balance: str = "equal") -> nnx.List:
  """Cores as TTParams: given ones (checked to cover the sizes) or a random init.

  ``rows`` and ``cols`` are (size name, size, dims name, dims or None).
  """
  (rows_name, n_rows, row_dims_name, row_dims), (cols_name, n_cols, col_dims_name, col_dims) = rows, cols
  if ttm is None:
    _need_init(fn, rank, rngs, "ttm=")
    row_dims = _layer_dims(fn, n_rows, row_dims, num_cores, row_dims_name, rows_name)
    col_dims = _layer_dims(fn, n_cols, col_dims, len(row_dims), col_dims_name, cols_name)
    ttm = random_ttm(rngs.params(), row_dims, col_dims, rank, std=std, dtype=param_dtype, balance=balance)
  elif not isinstance(ttm, TTMatrix):
    raise ValueError(f"{fn}: ttm is a {type(ttm).__name__} but a TTMatrix is expected")
  elif ttm.shape[0] < n_rows or ttm.shape[1] < n_cols:
    raise ValueError(f"{fn}: ttm.shape={ttm.shape} but it must cover ({rows_name}, {cols_name})="
                     f"({n_rows}, {n_cols})")
  return nnx.List([TTParam(jnp.asarray(c, param_dtype)) for c in ttm.cores])


class TTMLinear(nnx.Module):
  """A dense layer whose kernel is a TT-matrix: the TTM layer of the TTM GPT-2 paper, the MPO layer of CompactifAI.

  The kernel ``W`` (in_features x out_features) is held as cores
  ``(r[k], n_in[k], n_out[k], r[k+1])`` with ``prod(in_dims) >= in_features``
  and ``prod(out_dims) >= out_features``. Inputs are zero-padded to
  ``prod(in_dims)`` and outputs sliced back to ``out_features``, so padding
  never shows in outputs; `kernel` returns the unpadded dense W.

  Args:
    in_features, out_features: layer sizes.
    rank: TT rank, an int (capped per bond at its useful maximum) or d - 1 ints.
    in_dims, out_dims: core mode sizes; default ``factorize(features, num_cores)``.
    num_cores: d, used when dims are not given.
    use_bias: add a bias (zeros at init).
    path: a path of [`tnjax.matvec`][tnjax.matvec]: "auto" (the cost
      model's per-direction plan for the token count at trace time, fused
      kernels included on a GPU), "dense" (rebuild W, one matmul), "direct"
      (core by core, W never formed), "split" (two merged factors, two
      matmuls), "fused" / "fused_fwd" (the Pallas kernels; they warn and run
      "auto" where they cannot); see
      [`tnjax.core.contraction`][tnjax.core.contraction].
    dtype: computation dtype (e.g. bfloat16); None keeps the input's.
    param_dtype: dtype of cores and bias.
    kernel_std: std of the dense-equivalent W at init; default
      ``1 / sqrt(in_features)``, as ``nnx.Linear``'s lecun-normal init.
    cost: roofline constants for "auto".
    precision: passed to the contractions.
    rngs: ``nnx.Rngs``; needed unless ``ttm`` is given.
    ttm: existing cores to wrap (e.g. from ``ttm_svd``) instead of a random init.
    quant: None, or "int8": cores stored as int8 with per-channel scales
      ([`tnjax.nn.quant`][tnjax.nn.quant]), dequantized when the layer runs.
    balance: how a random init spreads ``kernel_std`` over the cores: "equal"
      stds, or "fan_in" (each core's variance proportional to one over its own
      fan-in ``r[k] * n_in[k]``: the muP init); see [`random_ttm`][tnjax.random_ttm].

  Examples:
    >>> from flax import nnx
    >>> layer = TTMLinear(768, 3072, rank=16, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 768))).shape, layer.in_dims, layer.out_dims
    ((2, 3072), (8, 8, 12), (12, 16, 16))
  """

  def __init__(self, in_features: int, out_features: int, *, rank=None, in_dims=None, out_dims=None,
               num_cores: int = 3, use_bias: bool = True, path: str = "auto", dtype=None,
               param_dtype=jnp.float32, kernel_std: float | None = None, cost: CostModel = H100,
               precision=None, rngs: nnx.Rngs | None = None, ttm: TTMatrix | None = None, quant=None,
               balance: str = "equal"):
    fn = "TTMLinear"
    self.in_features = _checks.check_positive_int(fn, "in_features", in_features)
    self.out_features = _checks.check_positive_int(fn, "out_features", out_features)
    self.path = _check_path(fn, path)
    self.dtype, self.cost, self.precision = dtype, cost, precision
    std = 1.0 / math.sqrt(in_features) if kernel_std is None else kernel_std
    cores = _make_cores(fn, ("in_features", in_features, "in_dims", in_dims),
                        ("out_features", out_features, "out_dims", out_dims),
                        rank=rank, num_cores=num_cores, std=std, param_dtype=param_dtype, rngs=rngs, ttm=ttm,
                        balance=balance)
    self.quant = _check_quant(fn, quant)
    values, scales = _stored([c[...] for c in cores], self.quant)
    self.cores = nnx.List([TTParam(v) for v in values])
    # Scales are TTParams too: their shapes follow the cores' ranks, which a file may set.
    self.scales = None if scales is None else nnx.List([TTParam(v) for v in scales])
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

  @classmethod
  def from_dense(cls, kernel, bias=None, *, rank=None, rtol=None, in_dims=None, out_dims=None,
                 num_cores: int = 3, method: str = "svd", **kwargs) -> TTMLinear:
    """A layer whose kernel is ``ttm_svd(kernel, ..., max_rank=rank, rtol=rtol, method=method)``.

    With neither rank nor rtol the decomposition is exact (full rank).
    ``method="gram"`` is the faster Gram-eigh TT-SVD (see [`tt_svd`][tnjax.tt_svd]).
    ``kwargs`` go to the constructor (path, dtype, param_dtype, ...).
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2:
      raise ValueError(f"TTMLinear.from_dense: kernel.shape={kernel.shape} but a 2-d (in, out) kernel is expected")
    m, n = kernel.shape
    in_dims = _layer_dims("TTMLinear.from_dense", m, in_dims, num_cores, "in_dims", "kernel.shape[0]")
    out_dims = _layer_dims("TTMLinear.from_dense", n, out_dims, len(in_dims), "out_dims", "kernel.shape[1]")
    layer = cls(m, n, ttm=ttm_svd(kernel, in_dims, out_dims, max_rank=rank, rtol=rtol, method=method),
                use_bias=bias is not None, **kwargs)
    if bias is not None:
      layer.bias[...] = jnp.asarray(bias, layer.bias.dtype).reshape(n)
    return layer

  @property
  def ttm(self) -> TTMatrix:
    return TTMatrix(tuple(_weights(self.cores, self.scales)))

  @property
  def in_dims(self) -> tuple[int, ...]:
    return tuple(c.shape[1] for c in self.cores)

  @property
  def out_dims(self) -> tuple[int, ...]:
    return tuple(c.shape[2] for c in self.cores)

  @property
  def ranks(self) -> tuple[int, ...]:
    return tuple(c.shape[0] for c in self.cores) + (1,)

  @property
  def num_params(self) -> int:
    """Parameters stored: cores (and int8 scales) plus bias (works on ``nnx.eval_shape`` results too)."""
    return _stored_params(self)

  @property
  def kernel(self) -> jax.Array:
    """The dense-equivalent (in_features, out_features) kernel, padding removed."""
    return to_dense(self.ttm)[: self.in_features, : self.out_features]

  def flops(self, rows: int) -> int:
    """Forward FLOPs on ``rows`` rows by this layer's path (`tnjax.core.contraction.path_flops`), bias excluded."""
    shapes = TTMatrix(tuple(jax.ShapeDtypeStruct(c.shape, c.dtype) for c in self.cores))
    return path_flops(shapes, rows, self.path, self.cost)

  def __call__(self, x: jax.Array) -> jax.Array:
    _checks.check_last_dim("TTMLinear", x, self.in_features, "in_features")
    ttm, bias = self.ttm, None if self.bias is None else self.bias[...]
    if self.dtype is not None:
      x = x.astype(self.dtype)
      ttm = jax.tree_util.tree_map(lambda c: c.astype(self.dtype), ttm)
      bias = None if bias is None else bias.astype(self.dtype)
    y = matvec(ttm, pad_last(x, ttm.shape[0]), path=self.path, precision=self.precision, cost=self.cost)
    y = y[..., : self.out_features]
    return _add_bias(y, bias)


class TTEmbedding(nnx.Module):
  """A token embedding whose (num_embeddings, features) table is a TT-matrix.

  A lookup gathers, per token, one slice of each core and contracts them: the
  table is never built in the forward pass. `attend` computes
  ``x @ E.T`` for a tied LM head. Vocabularies that do not factor (50257) are
  padded to ``prod(vocab_dims)``; padding rows are never returned.

  Args:
    num_embeddings: vocabulary size.
    features: embedding width.
    rank: TT rank (int or d - 1 ints).
    vocab_dims, feature_dims: core mode sizes (defaults: ``factorize``).
    num_cores: d, used when dims are not given.
    std: std of the dense-equivalent table at init; default
      ``1 / sqrt(features)``, as ``nnx.Embed``. GPT-2 uses 0.02.
    path: contraction path of `attend` ("auto", "dense", "direct", "split").
    dtype, param_dtype, cost, precision, rngs: as `TTMLinear`.
    ttm: existing cores of shape (prod(vocab_dims), prod(feature_dims)).

  Examples:
    >>> from flax import nnx
    >>> emb = TTEmbedding(50257, 768, rank=32, rngs=nnx.Rngs(0))
    >>> emb(jnp.array([[0, 50256]])).shape, emb.vocab_dims
    ((1, 2, 768), (27, 38, 49))
  """

  def __init__(self, num_embeddings: int, features: int, *, rank=None, vocab_dims=None, feature_dims=None,
               num_cores: int = 3, std: float | None = None, path: str = "auto", dtype=None,
               param_dtype=jnp.float32, cost: CostModel = H100, precision=None,
               rngs: nnx.Rngs | None = None, ttm: TTMatrix | None = None):
    fn = "TTEmbedding"
    self.num_embeddings = _checks.check_positive_int(fn, "num_embeddings", num_embeddings)
    self.features = _checks.check_positive_int(fn, "features", features)
    self.path = _check_path(fn, path)
    self.dtype, self.cost, self.precision = dtype, cost, precision
    std = 1.0 / math.sqrt(features) if std is None else std
    self.cores = _make_cores(fn, ("num_embeddings", num_embeddings, "vocab_dims", vocab_dims),
                             ("features", features, "feature_dims", feature_dims),
                             rank=rank, num_cores=num_cores, std=std, param_dtype=param_dtype, rngs=rngs, ttm=ttm)

  @classmethod
  def from_dense(cls, table, *, rank=None, rtol=None, vocab_dims=None, feature_dims=None, num_cores: int = 3,
                 **kwargs) -> TTEmbedding:
    """An embedding whose table is ``ttm_svd(table, ..., max_rank=rank, rtol=rtol)`` (exact by default)."""
    table = jnp.asarray(table)
    if table.ndim != 2:
      raise ValueError(f"TTEmbedding.from_dense: table.shape={table.shape} but a 2-d (vocab, features) table "
                       "is expected")
    v, f = table.shape
    vocab_dims = _layer_dims("TTEmbedding.from_dense", v, vocab_dims, num_cores, "vocab_dims", "table.shape[0]")
    feature_dims = _layer_dims("TTEmbedding.from_dense", f, feature_dims, len(vocab_dims), "feature_dims",
                               "table.shape[1]")
    return cls(v, f, ttm=ttm_svd(table, vocab_dims, feature_dims, max_rank=rank, rtol=rtol), **kwargs)

  @property
  def ttm(self) -> TTMatrix:
    return TTMatrix(tuple(c[...] for c in self.cores))

  @property
  def vocab_dims(self) -> tuple[int, ...]:
    return tuple(c.shape[1] for c in self.cores)

  @property
  def feature_dims(self) -> tuple[int, ...]:
    return tuple(c.shape[2] for c in self.cores)

  @property
  def num_params(self) -> int:
    return _core_params(self.cores)

  @property
  def embedding(self) -> jax.Array:
    """The dense (num_embeddings, features) table, padding removed (for export; builds the table)."""
    return to_dense(self.ttm)[: self.num_embeddings, : self.features]

  def _compute_ttm(self) -> TTMatrix:
    ttm = self.ttm
    if self.dtype is not None:
      ttm = jax.tree_util.tree_map(lambda c: c.astype(self.dtype), ttm)
    return ttm

  def __call__(self, ids: jax.Array) -> jax.Array:
    """Embeds integer ids of any shape into ``ids.shape + (features,)``.

    Concrete ids outside [0, num_embeddings) raise; under jit (no values to
    check) their rows are NaN, as ``nnx.Embed`` gives.
    """
    ids, valid = _check_ids("TTEmbedding", ids, self.num_embeddings)
    rows = gather_rows(self._compute_ttm(), jnp.where(valid, ids, 0))[..., : self.features]
    return jnp.where(valid[..., None], rows, jnp.asarray(jnp.nan, rows.dtype))

  def attend(self, x: jax.Array) -> jax.Array:
    """Logits ``x @ E.T`` of shape (..., num_embeddings) for x of shape (..., features): the tied LM head."""
    _checks.check_last_dim("TTEmbedding.attend", x, self.features, "features")
    ttm_t = transpose(self._compute_ttm())
    if self.dtype is not None:
      x = x.astype(self.dtype)
    y = matvec(ttm_t, pad_last(x, ttm_t.shape[0]), path=self.path, precision=self.precision, cost=self.cost)
    return y[..., : self.num_embeddings]


def _contract_rows(cores) -> jax.Array:
  """Dense rows of per-row tensor trains: cores (..., r[k], n[k], r[k+1]) -> (..., prod(n))."""
  out = cores[0][..., 0, :, :]  # (..., n0, r1)
  for c in cores[1:]:
    out = jnp.einsum("...ar,...rbs->...abs", out, c)
    out = out.reshape(out.shape[:-3] + (-1, out.shape[-1]))
  return out[..., 0]


class MPSEmbedding(nnx.Module):
  """A token embedding in which every row is its own tensor train (an MPS): the TensorGPT layer.

  Row ``i`` (features,) is zero-padded to ``prod(feature_dims)``, reshaped to
  ``feature_dims`` and held as a TT with cores (r[k], n[k], r[k+1]); the layer
  stores them stacked over the vocabulary, core k of shape
  (num_embeddings, r[k], n[k], r[k+1]). A lookup gathers each token's cores
  and contracts them; `attend` (the tied head) rebuilds the table.
  At rank 1 a row costs ``sum(feature_dims)`` numbers instead of ``features``.

  Args:
    num_embeddings, features: table shape.
    rank: TT rank of every row (int or d - 1 ints), for a random init.
    feature_dims: mode sizes (default ``factorize(features, num_cores)``).
    num_cores: d, used when dims are not given.
    std: std of the dense-equivalent table at init (default ``1 / sqrt(features)``).
    dtype, param_dtype: computation and storage dtypes.
    rngs: ``nnx.Rngs`` for a random init.
    cores: existing stacked cores (see `from_dense`).

  Examples:
    >>> import numpy as np
    >>> table = np.random.default_rng(0).normal(size=(10, 12))
    >>> emb = MPSEmbedding.from_dense(table, feature_dims=(2, 2, 3))  # exact (full rank)
    >>> bool(jnp.allclose(emb(jnp.arange(10)), table, atol=1e-5)), emb.ranks
    (True, (1, 2, 3, 1))
  """

  def __init__(self, num_embeddings: int, features: int, *, rank=None, feature_dims=None, num_cores: int = 3,
               std: float | None = None, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None,
               cores=None):
    fn = "MPSEmbedding"
    self.num_embeddings = _checks.check_positive_int(fn, "num_embeddings", num_embeddings)
    self.features = _checks.check_positive_int(fn, "features", features)
    self.dtype = dtype
    if cores is None:
      _need_init(fn, rank, rngs, "cores=")
      dims = _layer_dims(fn, features, feature_dims, num_cores, "feature_dims", "features")
      std = 1.0 / math.sqrt(features) if std is None else std
      keys = jax.random.split(rngs.params(), num_embeddings)
      cores = jax.vmap(lambda k: random_tt(k, dims, rank, std=std, dtype=param_dtype).cores)(keys)
    cores = [jnp.asarray(c, param_dtype) for c in cores]
    shapes = [c.shape for c in cores]
    if (any(len(sh) != 4 or sh[0] != num_embeddings for sh in shapes) or shapes[0][1] != 1 or shapes[-1][3] != 1
        or any(a[3] != b[1] for a, b in zip(shapes, shapes[1:]))
        or math.prod(sh[2] for sh in shapes) < features):
      raise ValueError(f"{fn}: cores have shapes {shapes} but (num_embeddings={num_embeddings}, r[k], n[k], "
                       f"r[k+1]) with r[0] = r[d] = 1, matching bonds and prod(n) >= features={features} are expected")
    self.cores = nnx.List([TTParam(c) for c in cores])

  @classmethod
  def from_dense(cls, table, *, rank=None, rtol=None, feature_dims=None, num_cores: int = 3,
                 **kwargs) -> MPSEmbedding:
    """TT-SVD of every row of ``table`` (num_embeddings, features), vmapped over the vocabulary.

    ``rank`` caps every row's ranks; ``rtol`` bounds each row's relative
    error, ``||row - approx|| <= rtol * ||row||``. All rows share core shapes
    (one array per core): under ``rtol`` each bond keeps the largest rank any
    row needs (read on the host), the other rows' extra columns are zero.
    With neither, the decomposition is exact.
    """
    fn = "MPSEmbedding.from_dense"
    table = jnp.asarray(table)
    if table.ndim != 2:
      raise ValueError(f"{fn}: table.shape={table.shape} but a 2-d (vocab, features) table is expected")
    v, f = table.shape
    dims = _layer_dims(fn, f, feature_dims, num_cores, "feature_dims", "table.shape[1]")
    rows = pad_last(table, math.prod(dims)).reshape((v,) + dims)
    cores = list(jax.vmap(lambda x: tt_svd(x, max_rank=rank, rtol=rtol).cores)(rows))
    if rtol is not None:
      for k in range(len(cores) - 1):  # drop the columns that the mask zeroed in every row
        used = np.asarray(jnp.any(cores[k] != 0, axis=(0, 1, 2)))
        r = int(np.nonzero(used)[0].max()) + 1 if used.any() else 1
        cores[k], cores[k + 1] = cores[k][..., :r], cores[k + 1][:, :r]
    return cls(v, f, cores=cores, **kwargs)

  @property
  def feature_dims(self) -> tuple[int, ...]:
    return tuple(c.shape[2] for c in self.cores)

  @property
  def ranks(self) -> tuple[int, ...]:
    return tuple(c.shape[1] for c in self.cores) + (1,)

  @property
  def num_params(self) -> int:
    return _core_params(self.cores)

  def _cores(self):
    cores = [c[...] for c in self.cores]
    return cores if self.dtype is None else [c.astype(self.dtype) for c in cores]

  @property
  def embedding(self) -> jax.Array:
    """The dense (num_embeddings, features) table (builds it)."""
    return _contract_rows(self._cores())[:, : self.features]

  def __call__(self, ids: jax.Array) -> jax.Array:
    """Embeds integer ids of any shape into ``ids.shape + (features,)`` (out-of-range ids: as TTEmbedding)."""
    ids, valid = _check_ids("MPSEmbedding", ids, self.num_embeddings)
    safe = jnp.where(valid, ids, 0)
    rows = _contract_rows([c[safe] for c in self._cores()])[..., : self.features]
    return jnp.where(valid[..., None], rows, jnp.asarray(jnp.nan, rows.dtype))

  def attend(self, x: jax.Array) -> jax.Array:
    """Logits ``x @ E.T`` (..., num_embeddings) for x (..., features): the tied LM head."""
    _checks.check_last_dim("MPSEmbedding.attend", x, self.features, "features")
    table = self.embedding
    return jnp.matmul(x.astype(table.dtype), table.T)


class BTTLinear(nnx.Module):
  """A dense layer whose kernel is a Block Tensor-Train matrix (`tnjax.core.btt`); Monarch at rank 1.

  ``x @ W`` is two batched matmuls; parameters and multiply-adds per token
  are both ``r * (m * n1 + n * m2)`` for ``m = m1 * m2`` inputs and
  ``n = n1 * n2`` outputs. Sizes that do not factor are padded internally,
  as `TTMLinear`.

  Args:
    in_features, out_features: layer sizes.
    rank: r, at most ``min(m1, n2)``.
    in_dims, out_dims: (m1, m2) and (n1, n2); default `tnjax.core.btt.btt_dims`.
    use_bias, dtype, param_dtype, precision: as ``nnx.Linear``.
    kernel_std: std of the dense-equivalent W at init (default ``1 / sqrt(in_features)``); each core's std
      follows its own fan-in (`tnjax.core.btt.btt_core_stds`).
    rngs: ``nnx.Rngs``; needed unless ``btt`` is given.
    btt: existing cores to wrap (e.g. from `tnjax.btt_from_dense`).
    quant: None, or "int8" (cores stored as int8 with per-channel scales).

  Examples:
    >>> from flax import nnx
    >>> layer = BTTLinear(768, 3072, rank=4, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 768))).shape, layer.in_dims, layer.out_dims, layer.num_params
    ((2, 3072), (32, 24), (48, 64), 445440)
  """

  def __init__(self, in_features: int, out_features: int, *, rank=None, in_dims=None, out_dims=None,
               use_bias: bool = True, dtype=None, param_dtype=jnp.float32, kernel_std: float | None = None,
               precision=None, rngs: nnx.Rngs | None = None, btt: BlockTT | None = None, quant=None):
    fn = "BTTLinear"
    self.in_features = _checks.check_positive_int(fn, "in_features", in_features)
    self.out_features = _checks.check_positive_int(fn, "out_features", out_features)
    self.dtype, self.precision = dtype, precision
    if btt is None:
      _need_init(fn, rank, rngs, "btt=")
      default_in, default_out = btt_dims(in_features, out_features)
      in_dims = _layer_dims(fn, in_features, default_in if in_dims is None else in_dims, 2, "in_dims", "in_features")
      out_dims = _layer_dims(fn, out_features, default_out if out_dims is None else out_dims, 2, "out_dims",
                             "out_features")
      in_dims, out_dims, rank = check_btt_dims(fn, in_dims, out_dims, rank)
      std = 1.0 / math.sqrt(in_features) if kernel_std is None else kernel_std
      btt = random_btt(rngs.params(), in_dims, out_dims, rank, std=std, dtype=param_dtype)
    elif not isinstance(btt, BlockTT):
      raise ValueError(f"{fn}: btt is a {type(btt).__name__} but a BlockTT is expected")
    elif btt.shape[0] < in_features or btt.shape[1] < out_features:
      raise ValueError(f"{fn}: btt.shape={btt.shape} but it must cover (in_features, out_features)="
                       f"({in_features}, {out_features})")
    self.quant = _check_quant(fn, quant)
    values, scales = _stored([jnp.asarray(c, param_dtype) for c in btt.cores], self.quant)
    self.cores = nnx.List([TTParam(v) for v in values])
    self.scales = None if scales is None else nnx.List([TTParam(v) for v in scales])
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

  @classmethod
  def from_dense(cls, kernel, bias=None, *, rank: int, in_dims=None, out_dims=None, **kwargs) -> BTTLinear:
    """A layer whose kernel is the best rank-``rank`` BTT approximation of ``kernel`` (per-block SVD)."""
    fn = "BTTLinear.from_dense"
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2:
      raise ValueError(f"{fn}: kernel.shape={kernel.shape} but a 2-d (in, out) kernel is expected")
    m, n = kernel.shape
    default_in, default_out = btt_dims(m, n)
    in_dims = _layer_dims(fn, m, default_in if in_dims is None else in_dims, 2, "in_dims", "kernel.shape[0]")
    out_dims = _layer_dims(fn, n, default_out if out_dims is None else out_dims, 2, "out_dims", "kernel.shape[1]")
    layer = cls(m, n, btt=btt_from_dense(kernel, in_dims, out_dims, rank), use_bias=bias is not None, **kwargs)
    if bias is not None:
      layer.bias[...] = jnp.asarray(bias, layer.bias.dtype).reshape(n)
    return layer

  @property
  def btt(self) -> BlockTT:
    return BlockTT(tuple(_weights(self.cores, self.scales)))

  def _shapes(self) -> BlockTT:
    """The cores as shapes only (no dequantization; works on ``nnx.eval_shape`` results too)."""
    return BlockTT(tuple(jax.ShapeDtypeStruct(c.shape, c.dtype) for c in self.cores))

  @property
  def in_dims(self) -> tuple[int, int]:
    return self._shapes().in_dims

  @property
  def out_dims(self) -> tuple[int, int]:
    return self._shapes().out_dims

  @property
  def rank(self) -> int:
    return self._shapes().rank

  @property
  def num_params(self) -> int:
    """Parameters stored: cores (and int8 scales) plus bias."""
    return _stored_params(self)

  @property
  def kernel(self) -> jax.Array:
    """The dense-equivalent (in_features, out_features) kernel, padding removed."""
    return btt_to_dense(self.btt)[: self.in_features, : self.out_features]

  def flops(self, rows: int) -> int:
    """Forward FLOPs on ``rows`` rows: two batched matmuls, ``2 rows r (m n1 + n m2)``."""
    return btt_flops(self._shapes(), rows)

  def __call__(self, x: jax.Array) -> jax.Array:
    _checks.check_last_dim("BTTLinear", x, self.in_features, "in_features")
    btt, bias = self.btt, None if self.bias is None else self.bias[...]
    if self.dtype is not None:
      x = x.astype(self.dtype)
      btt = jax.tree_util.tree_map(lambda c: c.astype(self.dtype), btt)
      bias = None if bias is None else bias.astype(self.dtype)
    y = btt_matvec(btt, pad_last(x, btt.shape[0]), precision=self.precision)[..., : self.out_features]
    return _add_bias(y, bias)


def _low_rank_factors(fn: str, rows: tuple[str, int], cols: tuple[str, int], *, rank, std: float | None,
                      std_fan: int, param_dtype, rngs, u, v) -> tuple[jax.Array, jax.Array]:
  """Factors ``u`` (rows, r) and ``v`` (r, cols) as ``param_dtype``, the sizes checked: given ones (shapes
  checked) or a random init whose product has std ``std`` (None: ``1 / sqrt(std_fan)``). ``rows`` and ``cols``
  are (size name, size)."""
  (rows_name, n_rows), (cols_name, n_cols) = rows, cols
  for name, size in (rows, cols):
    _checks.check_positive_int(fn, name, size)
  if (u is None) != (v is None):
    given, missing = ("u", "v") if v is None else ("v", "u")
    raise ValueError(f"{fn}: {given} is given but {missing}=None; expected both factors or neither")
  if u is None:
    _need_init(fn, rank, rngs, "u= and v=")
    rank = _checks.check_positive_int(fn, "rank", rank)
    if rank > min(n_rows, n_cols):
      raise ValueError(f"{fn}: rank={rank} but min({rows_name}, {cols_name})={min(n_rows, n_cols)}; expected "
                       "rank <= that")
    std = 1.0 / math.sqrt(std_fan) if std is None else std
    # Var(u v) = r * s_u^2 * s_v^2 = std^2 with equal factor scales.
    s = (std * std / rank) ** 0.25
    ku, kv = jax.random.split(rngs.params())
    u = s * jax.random.normal(ku, (n_rows, rank), param_dtype)
    v = s * jax.random.normal(kv, (rank, n_cols), param_dtype)
  u, v = jnp.asarray(u, param_dtype), jnp.asarray(v, param_dtype)
  if u.ndim != 2 or v.ndim != 2 or u.shape[0] != n_rows or v.shape[1] != n_cols or u.shape[1] != v.shape[0]:
    raise ValueError(f"{fn}: u.shape={u.shape}, v.shape={v.shape} but ({rows_name}, r) and (r, {cols_name})"
                     f" = ({n_rows}, r), (r, {n_cols}) are expected")
  return u, v


def _low_rank_fit(fn: str, name: str, layout: str, matrix, rank, rtol) -> tuple[jax.Array, jax.Array]:
  """`balanced_svd` of a 2-d ``matrix`` (rank cap and/or relative Frobenius tolerance, as `tt_svd`);
  ``layout`` names its axes in errors."""
  matrix = jnp.asarray(matrix)
  if matrix.ndim != 2:
    raise ValueError(f"{fn}: {name}.shape={matrix.shape} but a 2-d {layout} {name} is expected")
  return balanced_svd(matrix, max_rank=rank, rtol=rtol)


class LowRankLinear(nnx.Module):
  """A dense layer with kernel ``W = u @ v`` of rank r: the truncated-SVD baseline.

  Args:
    in_features, out_features: layer sizes.
    rank: r, at most min(in_features, out_features).
    use_bias, dtype, param_dtype, precision: as ``nnx.Linear``.
    kernel_std: std of the dense-equivalent W at init (default ``1 / sqrt(in_features)``).
    rngs: ``nnx.Rngs``; needed unless ``u`` and ``v`` are given.
    u, v: existing factors of shapes (in_features, r) and (r, out_features).
    quant: None, or "int8" (factors stored as int8 with per-column scales).

  Examples:
    >>> import numpy as np
    >>> w = np.random.default_rng(0).normal(size=(64, 32))
    >>> layer = LowRankLinear.from_dense(w, rank=8)
    >>> layer.rank, layer.num_params, layer(jnp.ones((3, 64))).shape
    (8, 768, (3, 32))
  """

  def __init__(self, in_features: int, out_features: int, *, rank: int | None = None, use_bias: bool = True,
               dtype=None, param_dtype=jnp.float32, kernel_std: float | None = None, precision=None,
               rngs: nnx.Rngs | None = None, u=None, v=None, quant=None):
    fn = "LowRankLinear"
    u, v = _low_rank_factors(fn, ("in_features", in_features), ("out_features", out_features), rank=rank,
                             std=kernel_std, std_fan=in_features, param_dtype=param_dtype, rngs=rngs, u=u, v=v)
    self.in_features, self.out_features = u.shape[0], v.shape[1]
    self.dtype, self.precision = dtype, precision
    self.quant = _check_quant(fn, quant)
    (u, v), scales = _stored([u, v], self.quant)
    self.u, self.v = nnx.Param(u), nnx.Param(v)
    self.scales = None if scales is None else nnx.List([nnx.Param(x) for x in scales])
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

  @classmethod
  def from_dense(cls, kernel, bias=None, *, rank=None, rtol=None, **kwargs) -> LowRankLinear:
    """Truncated SVD of ``kernel`` (rank cap and/or relative Frobenius tolerance, as `tt_svd`),
    split as ``u = U sqrt(S)``, ``v = sqrt(S) V^T``."""
    kernel = jnp.asarray(kernel)
    u, v = _low_rank_fit("LowRankLinear.from_dense", "kernel", "(in, out)", kernel, rank, rtol)
    layer = cls(*kernel.shape, u=u, v=v, use_bias=bias is not None, **kwargs)
    if bias is not None:
      layer.bias[...] = jnp.asarray(bias, layer.bias.dtype).reshape(kernel.shape[1])
    return layer

  @property
  def rank(self) -> int:
    return self.u.shape[1]

  @property
  def num_params(self) -> int:
    scales = 0 if self.scales is None else self.rank + self.out_features
    return (self.rank * (self.in_features + self.out_features) + scales
            + (self.out_features if self.bias is not None else 0))

  @property
  def kernel(self) -> jax.Array:
    u, v = _weights([self.u, self.v], self.scales)
    return u @ v

  def flops(self, rows: int) -> int:
    """Forward FLOPs on ``rows`` rows: ``2 rows r (in + out)``."""
    return 2 * rows * self.rank * (self.in_features + self.out_features)

  def __call__(self, x: jax.Array) -> jax.Array:
    _checks.check_last_dim("LowRankLinear", x, self.in_features, "in_features")
    (u, v), bias = _weights([self.u, self.v], self.scales), None if self.bias is None else self.bias[...]
    if self.dtype is not None:
      x, u, v = x.astype(self.dtype), u.astype(self.dtype), v.astype(self.dtype)
      bias = None if bias is None else bias.astype(self.dtype)
    y = jnp.matmul(jnp.matmul(x, u, precision=self.precision), v, precision=self.precision)
    return _add_bias(y, bias)


class LowRankEmbedding(nnx.Module):
  """A token embedding whose (num_embeddings, features) table is ``E = u @ v`` of rank r.

  ``u`` is (num_embeddings, r) and ``v`` (r, features). A lookup gathers rows
  of ``u`` and multiplies them by ``v``; `attend` (the tied LM head) computes
  ``x @ E.T`` as ``(x @ v.T) @ u.T``. Neither builds the table; `embedding`
  does, for export.

  Complexity: ``r (num_embeddings + features)`` parameters; a lookup costs
  ``2 r features`` FLOPs per token, `attend` ``2 r (features + num_embeddings)``
  (the dense head: ``2 features num_embeddings``).

  Args:
    num_embeddings: vocabulary size.
    features: embedding width.
    rank: r, at most min(num_embeddings, features), for a random init.
    std: std of the dense-equivalent table at init; default
      ``1 / sqrt(features)``, as ``nnx.Embed``. GPT-2 uses 0.02. The two
      factors get equal scales.
    dtype: computation dtype (e.g. bfloat16); None keeps the factors'.
    param_dtype: dtype of the factors.
    precision: passed to the matmuls.
    rngs: ``nnx.Rngs``; needed unless ``u`` and ``v`` are given.
    u, v: existing factors of shapes (num_embeddings, r) and (r, features)
      (both or neither).

  Raises:
    ValueError: a non-positive size or rank, a rank above
      min(num_embeddings, features), a missing ``rank`` or ``rngs`` for a random
      init, only one factor, or factors of the wrong shapes.

  Examples:
    >>> import numpy as np
    >>> table = np.random.default_rng(0).normal(size=(100, 16))
    >>> emb = LowRankEmbedding.from_dense(table, rank=16)  # full rank: exact
    >>> emb.rank, emb.num_params, emb(jnp.array([[0, 99]])).shape, emb.attend(jnp.ones((3, 16))).shape
    (16, 1856, (1, 2, 16), (3, 100))
    >>> bool(jnp.allclose(emb.embedding, table, atol=1e-4))
    True
  """

  def __init__(self, num_embeddings: int, features: int, *, rank: int | None = None, std: float | None = None,
               dtype=None, param_dtype=jnp.float32, precision=None, rngs: nnx.Rngs | None = None, u=None,
               v=None):
    u, v = _low_rank_factors("LowRankEmbedding", ("num_embeddings", num_embeddings), ("features", features),
                             rank=rank, std=std, std_fan=features, param_dtype=param_dtype, rngs=rngs, u=u, v=v)
    self.num_embeddings, self.features = u.shape[0], v.shape[1]
    self.dtype, self.precision = dtype, precision
    self.u, self.v = nnx.Param(u), nnx.Param(v)

  @classmethod
  def from_dense(cls, table, *, rank=None, rtol=None, **kwargs) -> LowRankEmbedding:
    """Truncated SVD of ``table`` (num_embeddings, features): rank cap and/or relative Frobenius tolerance
    ``||E - u v|| <= rtol ||E||``, as `tt_svd` (exact with neither), split as ``u = U sqrt(S)``,
    ``v = sqrt(S) V^T``. ``kwargs`` go to the constructor (dtype, param_dtype, precision).

    Raises:
      ValueError: ``table`` is not 2-d (and as `tt_svd` for ``rank`` and ``rtol``).
    """
    table = jnp.asarray(table)
    u, v = _low_rank_fit("LowRankEmbedding.from_dense", "table", "(vocab, features)", table, rank, rtol)
    return cls(*table.shape, u=u, v=v, **kwargs)

  @property
  def rank(self) -> int:
    return self.u.shape[1]

  @property
  def num_params(self) -> int:
    """Parameters stored: ``r (num_embeddings + features)`` (works on ``nnx.eval_shape`` results too)."""
    return self.rank * (self.num_embeddings + self.features)

  def attend_flops(self, rows: int) -> int:
    """FLOPs of `attend` on ``rows`` rows: ``2 rows r (features + num_embeddings)``."""
    return 2 * rows * self.rank * (self.features + self.num_embeddings)

  def _factors(self) -> tuple[jax.Array, jax.Array]:
    u, v = self.u[...], self.v[...]
    return (u, v) if self.dtype is None else (u.astype(self.dtype), v.astype(self.dtype))

  @property
  def embedding(self) -> jax.Array:
    """The dense (num_embeddings, features) table ``u @ v`` in the factors' dtype (for export; builds it)."""
    return jnp.matmul(self.u[...], self.v[...], precision=self.precision)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """Embeds integer ids of any shape into ``ids.shape + (features,)`` (out-of-range ids: as TTEmbedding)."""
    ids, valid = _check_ids("LowRankEmbedding", ids, self.num_embeddings)
    u, v = self._factors()
    rows = jnp.matmul(u[jnp.where(valid, ids, 0)], v, precision=self.precision)
    return jnp.where(valid[..., None], rows, jnp.asarray(jnp.nan, rows.dtype))

  def attend(self, x: jax.Array) -> jax.Array:
    """Logits ``x @ E.T`` of shape (..., num_embeddings) for x of shape (..., features): the tied LM head,
    as ``(x @ v.T) @ u.T``."""
    _checks.check_last_dim("LowRankEmbedding.attend", x, self.features, "features")
    u, v = self._factors()
    y = jnp.matmul(x.astype(v.dtype), v.T, precision=self.precision)
    return jnp.matmul(y, u.T, precision=self.precision)
