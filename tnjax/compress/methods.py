"""Training-free compression by factorization: truncated SVD (the baseline), MPO (CompactifAI), TensorGPT
embeddings, and weight-only int8 on top of any of them.

Every function maps a model of any family ([`GPT`][tnjax.models.GPT],
[`Llama`][tnjax.models.Llama]) to a new one (the input is
left untouched) whose config records the new layer kinds, so the result saves
and loads like any tnjax model and exports to Hugging Face as dense.

Targets: ``ratio`` is the fraction of a layer's weight parameters kept (bias
excluded), counted as the layer stores them now (a layer already tensorized
counts its cores, not the dense size); a layer whose factorized form would not
be smaller at that ratio stays as it is, so ``ratio=1`` returns an unchanged
model and compressing a compressed model never grows it. ``rank`` (``chi``
for MPO) caps ranks; ``rtol`` bounds each layer's relative Frobenius error
(ranks chosen on the host). With no target the decomposition is exact.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from tnjax.compress import _model
from tnjax.core import _checks, fused
from tnjax.core.shapes import factorize
from tnjax.models.config import LayerSpec
from tnjax.models.decoder import Decoder, dense_kernel
from tnjax.nn import BTTLinear, Int8Linear, LowRankLinear, MPSEmbedding, TTEmbedding, TTMLinear


def _bias(layer):
  return None if layer.bias is None else layer.bias[...]


def _bonds(ranks) -> tuple[int, ...] | None:
  """The interior (per-bond) ranks the config records, from ranks with their boundary 1s."""
  return tuple(int(r) for r in ranks[1:-1]) or None


def _target(fn: str, **targets) -> tuple[str | None, object]:
  key, value = _model.one_target(fn, **targets)
  if key == "ratio":
    _model.check_ratio(fn, value)
  elif key == "rtol":
    _checks.check_rtol(fn, value)
  elif key is not None:
    _checks.check_positive_int(fn, key, value)
  return key, value


def svd_compress(model: Decoder, *, ratio: float | None = None, rank: int | None = None, rtol: float | None = None,
                 layers=None) -> Decoder:
  """Truncated SVD of every selected projection: W (m, n) -> U (m, r) V (r, n), the baseline.

  Args:
    model: the model to compress.
    ratio: fraction of each layer's weights kept: r = floor(ratio m n / (m + n)).
    rank: r for every layer (capped at min(m, n); the full rank is exact).
    rtol: per-layer relative Frobenius error bound.
    layers: names (see `tnjax.compress._model.resolve_layers`); default every
      attention and MLP projection.

  Raises:
    ValueError: on more than one target, ratio outside (0, 1], rank < 1, a
      negative rtol, or an unknown layer name.

  Example:
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
    >>> small = svd_compress(model, ratio=0.5)
    >>> small.config.spec("mlp.c_fc", 0).kind, small.num_params < model.num_params
    ('lowrank', True)
  """
  fn = "svd_compress"
  key, value = _target(fn, ratio=ratio, rank=rank, rtol=rtol)

  def fit(name, w, r, bias):
    return LowRankLinear.from_dense(w, bias, rank=r, rtol=value if key == "rtol" else None)

  return _lowrank(fn, model, key, value, layers, fit)


def _lowrank(fn: str, model: Decoder, key, value, layers, fit) -> Decoder:
  """Every selected projection as the LowRankLinear ``fit(name, kernel, rank, bias)`` returns, the rank set by
  the target (None for rtol: ``fit`` chooses); a layer that would not shrink at a ratio is left as it is."""
  names = _model.resolve_layers(fn, model.config, [] if (key, value) == ("ratio", 1) else layers)
  replaced, specs = {}, {}
  for name in names:
    layer = _model.get_layer(model, name)
    w = dense_kernel(layer)
    m, n = w.shape
    r = None
    if key == "ratio":
      stored = _model.weights(layer)
      r = max(math.floor(value * stored / (m + n)), 1)
      if r >= min(m, n) or r * (m + n) >= stored:
        continue  # no smaller at this ratio
    elif key == "rank":
      r = min(value, m, n)
    new = fit(name, w, r, _bias(layer))
    replaced[name] = new
    specs[name] = LayerSpec(kind="lowrank", rank=new.rank)
  return _model.rebuild(model, _model.with_specs(model.config, specs), replaced)


def svdllm_compress(model: Decoder, calib, *, ratio: float | None = None, rank: int | None = None,
                    rtol: float | None = None, layers=None) -> Decoder:
  """SVD-LLM (Wang et al. 2024): each projection's rank-r factors that minimize its *output* error on
  calibration text, ``||X (W - U V)||_F``, by truncation-aware whitening
  ([`whitened_svd`][tnjax.core.whitening.whitened_svd] of the input Gram from
  [`input_grams`][tnjax.compress.calibration.input_grams]).

  Args:
    model: the model to compress (any family; projections dense or tensorized).
    calib: calibration ids, (batch, time) arrays.
    ratio, rank, layers: as in `svd_compress` (a ratio sets the same rank as plain SVD would).
    rtol: per-layer relative *output* error bound ``||X (W - W')|| <= rtol ||X W||`` on the calibration inputs.

  Raises:
    ValueError: on the target errors of `svd_compress`, no target, or bad calibration batches.

  Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
    >>> small = svdllm_compress(model, np.random.default_rng(0).integers(0, 512, (4, 32)), ratio=0.5)
    >>> small.config.spec("mlp.c_fc", 0).kind, small.num_params < model.num_params
    ('lowrank', True)
  """
  import jax.numpy as jnp

  from tnjax.compress.calibration import input_grams
  from tnjax.core.whitening import whitened_spectrum, whitened_svd

  fn = "svdllm_compress"
  key, value = _target(fn, ratio=ratio, rank=rank, rtol=rtol)
  if key is None:
    raise ValueError(f"{fn}: no target; give exactly one of ratio, rank or rtol")
  grams, _ = input_grams(model, calib)

  def fit(name, w, r, bias):
    gram = jnp.asarray(grams[name], w.dtype)
    if r is None:  # rtol: the smallest rank whose discarded whitened energy is within the bound
      s2 = np.asarray(whitened_spectrum(w, gram), np.float64) ** 2
      tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])
      r = max(int(np.argmax(tail <= value * value * s2.sum())), 1)
    a, b = whitened_svd(w, gram, r)
    root = jnp.sqrt(jnp.maximum(jnp.linalg.norm(a, axis=0), 1e-30))  # balance the two factors' scales
    layer = LowRankLinear(*w.shape, u=a / root[None, :], v=b * root[:, None], use_bias=bias is not None)
    if bias is not None:
      layer.bias[...] = jnp.asarray(bias, layer.bias.dtype).reshape(w.shape[1])
    return layer

  return _lowrank(fn, model, key, value, layers, fit)


def _ttm_params(in_dims, out_dims, rank: int) -> int:
  modes = [i * o for i, o in zip(in_dims, out_dims)]
  r = (1,) + tuple(min(rank, f) for f in _checks.full_ranks(modes)) + (1,)
  return sum(r[k] * modes[k] * r[k + 1] for k in range(len(modes)))


def mpo_compress(model: Decoder, *, chi: int | None = None, ratio: float | None = None, rtol: float | None = None,
                 layers=None, num_cores: int = 3, method: str = "svd", layout: str = "balanced") -> Decoder:
  """CompactifAI's step one: every selected projection becomes an MPO (TT-matrix) of bond dimension chi.

  Each kernel is decomposed by [`ttm_svd`][tnjax.ttm_svd] into ``num_cores``
  cores with [`factorize`][tnjax.factorize] dims; the layer becomes a
  [`TTMLinear`][tnjax.nn.TTMLinear]. With ``layout="fused"`` every layer gets the
  two cores of [`fused_dims`][tnjax.core.fused.fused_dims] and ``path="fused"``, so
  on a GPU it runs the fused Pallas kernels (bond dimensions up to 16).

  Args:
    model: the model to compress.
    chi: bond dimension (rank cap) of every layer.
    ratio: fraction of each layer's weights kept; chi is the largest that fits.
    rtol: per-layer relative Frobenius error bound (ranks chosen per bond).
    layers: names (see `tnjax.compress._model.resolve_layers`); default all projections.
    num_cores: MPO sites per layer ("balanced" layout).
    method: TT-SVD steps, "svd" or "gram" (faster on GPUs, same truncation; see [`tt_svd`][tnjax.tt_svd]).
    layout: "balanced" (``factorize`` dims, ``num_cores`` sites) or "fused" (two sites in the fused
      kernel's layout; widths must be multiples of 256, chi <= 16).

  Raises:
    ValueError: as `svd_compress`, for num_cores < 1, an unknown layout, and for the fused layout a
      width it cannot take or a bond dimension above 16.

  Complexity:
    One TT-SVD per layer, O(n[0]^2 m n) for an (m, n) kernel (a QR first
    when the first unfolding is wide).

  Example:
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
    >>> small = mpo_compress(model, chi=8, layers=["mlp.c_fc"])
    >>> type(small.h[0].mlp.c_fc).__name__, max(small.h[0].mlp.c_fc.ranks), small.num_params < model.num_params
    ('TTMLinear', 8, True)
  """
  fn = "mpo_compress"
  key, value = _target(fn, chi=chi, ratio=ratio, rtol=rtol)
  num_cores = _checks.check_positive_int(fn, "num_cores", num_cores)
  if layout not in ("balanced", "fused"):
    raise ValueError(f"{fn}: layout={layout!r} but 'balanced' or 'fused' is expected")
  if layout == "fused":
    num_cores = 2
    if chi is not None and chi > fused.MAX_RANK:
      raise ValueError(f"{fn}: chi={chi} but the fused layout takes at most {fused.MAX_RANK}")
  replaced, specs = {}, {}
  for name in _model.resolve_layers(fn, model.config, [] if (key, value) == ("ratio", 1) else layers):
    layer = _model.get_layer(model, name)
    w = dense_kernel(layer)
    m, n = w.shape
    if layout == "fused":
      try:
        in_dims, out_dims = fused.fused_dims(m, n)
      except ValueError as err:
        raise ValueError(f"{fn}: layer {name} is {m} x {n}: {err}") from None
    else:
      in_dims, out_dims = factorize(m, num_cores), factorize(n, num_cores)
    cap = chi
    if key == "ratio":
      stored = _model.weights(layer)
      full = max(_checks.full_ranks([i * o for i, o in zip(in_dims, out_dims)]) or (1,))
      if layout == "fused":
        full = min(full, fused.MAX_RANK)
      cap = _model.largest_rank(functools.partial(_ttm_params, in_dims, out_dims), value * stored, full)
      if _ttm_params(in_dims, out_dims, cap) >= stored:
        continue
    new = TTMLinear.from_dense(w, _bias(layer), rank=cap, rtol=rtol, in_dims=in_dims, out_dims=out_dims,
                               method=method)
    replaced[name] = new
    path = "fused" if layout == "fused" else _model.spec_of(model.config, name).path
    new.path = path
    specs[name] = LayerSpec(kind="ttm", rank=max(new.ranks), in_dims=in_dims, out_dims=out_dims,
                            num_cores=num_cores, path=path, ranks=_bonds(new.ranks))
  return _model.rebuild(model, _model.with_specs(model.config, specs), replaced)


def _mps_params(dims, rank: int) -> int:
  r = (1,) + tuple(min(rank, f) for f in _checks.full_ranks(dims)) + (1,)
  return sum(r[k] * dims[k] * r[k + 1] for k in range(len(dims)))


def tensorgpt_embedding(model: Decoder, *, rank: int | None = None, ratio: float | None = None,
                        rtol: float | None = None, feature_dims=None, num_cores: int = 3,
                        form: str = "mps") -> Decoder:
  """TensorGPT: the token embedding compressed without training.

  ``form="mps"`` (the paper): each row, reshaped to ``feature_dims``, is
  decomposed by TT-SVD into its own MPS, vmapped over the vocabulary
  ([`MPSEmbedding`][tnjax.nn.MPSEmbedding]). ``form="ttm"``: the whole table as one
  TT-matrix ([`TTEmbedding`][tnjax.nn.TTEmbedding]). A tied head keeps reading the
  (compressed) embedding, so it stays tied.

  Args:
    model: the model to compress.
    rank: TT rank cap (per row for "mps").
    ratio: fraction of the table's stored parameters kept; rank is the largest that fits
      (an embedding that would not get smaller is returned unchanged).
    rtol: relative error bound, per row for "mps", of the whole table for "ttm".
    feature_dims: factorization of d_model (default ``factorize(d_model, num_cores)``).
    num_cores: d, used when feature_dims is not given.
    form: "mps" or "ttm".

  The compression ratio is ``vocab * d_model / stored parameters``; with
  rank 1 and dims summing to s it is d_model / s (GPT-2, dims summing to 20: 38.4x).

  Example:
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
    >>> small = tensorgpt_embedding(model, rank=1, feature_dims=(4, 4, 8))
    >>> 512 * 128 / small.wte.num_params
    8.0
  """
  fn = "tensorgpt_embedding"
  key, value = _target(fn, rank=rank, ratio=ratio, rtol=rtol)
  if form not in ("mps", "ttm"):
    raise ValueError(f"{fn}: form={form!r} but 'mps' or 'ttm' is expected")
  table = model.embedding_table
  v, d = table.shape
  feature_dims = (factorize(d, num_cores) if feature_dims is None
                  else _checks.check_dims(fn, "feature_dims", feature_dims))
  if math.prod(feature_dims) < d:
    raise ValueError(f"{fn}: prod(feature_dims)={math.prod(feature_dims)} but d_model={d}; expected at least that")
  vocab_dims = factorize(v, len(feature_dims))
  cap = rank
  if (key, value) == ("ratio", 1):
    return _model.rebuild(model, model.config, {})
  if key == "ratio":
    if form == "mps":
      params_at = lambda r: v * _mps_params(feature_dims, r)
      full = max(_checks.full_ranks(feature_dims) or (1,))
    else:
      params_at = lambda r: _ttm_params(vocab_dims, feature_dims, r)
      full = max(_checks.full_ranks([a * b for a, b in zip(vocab_dims, feature_dims)]) or (1,))
    stored = _model.count_params(model.wte)
    cap = _model.largest_rank(params_at, value * stored, full)
    if params_at(cap) >= stored:
      return _model.rebuild(model, model.config, {})
  if form == "mps":
    wte = MPSEmbedding.from_dense(table, rank=cap, rtol=rtol, feature_dims=feature_dims)
    spec = LayerSpec(kind="mps", rank=max(wte.ranks), out_dims=feature_dims, num_cores=len(feature_dims),
                     ranks=_bonds(wte.ranks))
  else:
    wte = TTEmbedding.from_dense(table, rank=cap, rtol=rtol, vocab_dims=vocab_dims, feature_dims=feature_dims)
    spec = LayerSpec(kind="ttm", rank=max(wte.ttm.ranks), in_dims=vocab_dims, out_dims=feature_dims,
                     num_cores=len(feature_dims), ranks=_bonds(wte.ttm.ranks))
  return _model.rebuild(model, _model.with_specs(model.config, {"embedding": spec}), {"embedding": wte})


def quantize_int8(model: Decoder, *, layers=None) -> Decoder:
  """Weight-only per-channel int8 for the selected projections (dense kernels, TT cores or low-rank factors).

  Weights are stored as int8 with one float32 scale per output channel
  ([`quantize`][tnjax.nn.quantize]) and dequantized inside the layer's matmul;
  biases, norms and embeddings stay float. Run `heal` before, not after.

  Args:
    model: a model, compressed or not.
    layers: names as in `svd_compress`; default every projection (and an untied head).

  Raises:
    ValueError: for an unknown layer name or a layer already quantized.

  Example:
    >>> from flax import nnx
    >>> from tnjax.compress import count_bytes
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
    >>> q = quantize_int8(model)
    >>> q.h[0].mlp.c_fc.q.dtype, round(count_bytes(q) / count_bytes(model), 2)
    (dtype('int8'), 0.39)
  """
  fn = "quantize_int8"
  cfg = model.config
  if layers is None:
    layers = _model.projection_names(cfg) + ([] if cfg.tie_embeddings else ["lm_head"])
  replaced, specs = {}, {}
  for name in _model.resolve_layers(fn, cfg, layers):
    layer, spec = _model.get_layer(model, name), _model.spec_of(cfg, name)
    if spec.quant is not None:
      raise ValueError(f"{fn}: layer {name!r} is already quantized (quant={spec.quant!r})")
    use_bias = layer.bias is not None
    if isinstance(layer, TTMLinear):
      new = TTMLinear(layer.in_features, layer.out_features, ttm=layer.ttm, use_bias=use_bias, path=layer.path,
                      quant="int8")
    elif isinstance(layer, BTTLinear):
      new = BTTLinear(layer.in_features, layer.out_features, btt=layer.btt, use_bias=use_bias, quant="int8")
    elif isinstance(layer, LowRankLinear):
      new = LowRankLinear(layer.in_features, layer.out_features, u=layer.u[...], v=layer.v[...], use_bias=use_bias,
                          quant="int8")
    else:
      w = dense_kernel(layer)
      new = Int8Linear(*w.shape, kernel=w, bias=_bias(layer), use_bias=use_bias)
    if use_bias and not isinstance(new, Int8Linear):
      new.bias[...] = layer.bias[...]
    replaced[name] = new
    specs[name] = dataclasses.replace(spec, quant="int8")
  return _model.rebuild(model, _model.with_specs(cfg, specs), replaced)
