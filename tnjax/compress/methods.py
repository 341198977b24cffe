"""Training-free compression by factorization: truncated SVD (the baseline), SVD-LLM (SVD in the data
metric), MPO (CompactifAI, in the weight or the data metric), TensorGPT embeddings, and weight-only int8 on
top of any of them.

Every function maps a model of any family ([`GPT`][tnjax.models.GPT],
[`Llama`][tnjax.models.Llama]) to a new one (the input is
left untouched) whose config records the new layer kinds, so the result saves
and loads like any tnjax model and exports to Hugging Face as dense.

Targets (`tnjax.compress.targets`): exactly one of ``rank`` (a rank cap for
every layer), ``ratio`` (the fraction of the compressed part's stored
parameters kept, spread by ``allocation``) or ``rtol`` (a per-layer relative
error bound). ``ratio=1`` returns an unchanged model; a layer the target
would not make smaller is refused (``if_larger="error"``), left as it is
(``"keep"``) or written anyway (``"allow"``).

Data-aware fits (``svdllm_compress``, ``mpo_compress(fit="data")``) minimize
each layer's output error on calibration text, ``||X (W - W')||_F``, from the
input Grams of [`input_grams`][tnjax.compress.calibration.input_grams];
``sequential=True`` measures block i on the outputs of the already-compressed
blocks before it.

Memory: given ids and a budget each layer sets alone (``allocation="uniform"``,
or a rank or rtol target), block i's layers are fitted inside the calibration
pass as soon as its Grams are summed, and the Grams are dropped before block
i + 1 is measured: the host holds one block's float64 Grams (about 2 GB at a
Llama-3.1-8B shape), not the model's (65 GB). ``allocation="importance"`` and
``"loss"`` read every block's statistics before any fit, and a `Calibration`
already holds them all, so those keep every Gram until the fits are done.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from tnjax.compress import _model
from tnjax.compress._progress import bar
from tnjax.compress.calibration import Calibration, calibration_pass, check_tokens
from tnjax.compress.targets import (
  IF_LARGER,
  Target,
  check_choice,
  largest_rank,
  layer_budgets,
  least_fraction,
  rank_within,
)
from tnjax.core import _checks, fused
from tnjax.core.btt import btt_dims, btt_from_dense
from tnjax.core.decompositions import truncation_rank, ttm_svd
from tnjax.core.ops import to_dense
from tnjax.core.shapes import factorize
from tnjax.core.whitening import (
  btt_basis,
  btt_spectrum,
  whiten_with,
  whitened_basis,
  whitened_btt,
  whitened_spectrum,
  whitened_ttm_svd,
  whitening,
)
from tnjax.models.config import LayerSpec
from tnjax.models.decoder import Decoder, dense_kernel
from tnjax.models.names import parse_layer_key
from tnjax.nn import BTTLinear, Int8Linear, LowRankEmbedding, LowRankLinear, MPSEmbedding, TTEmbedding, TTMLinear, kinds

FITS = ("weights", "data")


def _bias(layer):
  return None if layer.bias is None else layer.bias[...]


def _bonds(ranks) -> tuple[int, ...] | None:
  """The interior (per-bond) ranks the config records, from ranks with their boundary 1s."""
  return tuple(int(r) for r in ranks[1:-1]) or None


def calibration(fn: str, model: Decoder, calib, *, keep_grams: bool = True) -> Calibration:
  """``calib`` as a `Calibration`: computed from (batch, time) ids, or one already computed. ``keep_grams=False``
  for a caller that reads only importance or token counts: a pass from ids then keeps no Gram."""
  if isinstance(calib, Calibration):
    return calib
  return calibration_pass(fn, model, calib, keep_grams=keep_grams)


def _with_bias(layer, bias, n: int):
  if bias is not None:
    layer.bias[...] = jnp.asarray(bias, layer.bias.dtype).reshape(n)
  return layer


@dataclasses.dataclass
class _Job:
  """One layer-by-layer compression: what each method supplies to `_run`."""

  fn: str
  target: Target
  names: list[str]
  fit: object  # fit(name, layer, w, cap, gram) -> (module, LayerSpec) | None (None: not smaller at this budget)
  cap: object  # cap(name, layer, w, budget) -> a rank (or None) for the fit, None when nothing smaller fits
  spectrum: object  # spectrum(name, w, gram) -> singular values, for allocation="loss"
  unit: object  # unit(w) -> parameters per unit of rank of the low-rank form, for allocation="loss"
  data: bool  # whether the fit reads the layer's input Gram
  forget: object = None  # forget() drops what the fits cached of a Gram (its whitening, the spectra of "loss")


def _run(job: _Job, model: Decoder, *, calib, allocation: str, sequential: bool, if_larger: str) -> Decoder:
  """Fits every named layer at its budget, refuses growth per ``if_larger``, and rebuilds the model."""
  fn, target = job.fn, job.target
  check_choice(fn, "if_larger", if_larger, IF_LARGER)
  if sequential and not job.data:
    raise ValueError(f"{fn}: sequential=True but this fit does not read calibration statistics; use a data-aware "
                     "fit (svdllm, mpo with fit='data')")
  if (target.key, target.value) == ("ratio", 1.0):
    return _model.rebuild(model, model.config, {})
  needs_cal = job.data or allocation == "importance"
  if needs_cal and calib is None:
    raise ValueError(f"{fn}: calib=None but {'this fit' if job.data else 'allocation=importance'} needs calibration "
                     "ids (batch, time) or a Calibration from input_grams")
  if sequential and isinstance(calib, Calibration):
    raise ValueError(f"{fn}: sequential=True but calib is a Calibration; sequential calibration runs the text "
                     "through the compressed blocks, so pass the ids")
  by_block: dict[int | None, list[str]] = {}
  for name in job.names:
    by_block.setdefault(parse_layer_key(name)[0], []).append(name)
  if job.data and None in by_block:
    raise ValueError(f"{fn}: layers {by_block[None]} are not in a block but this fit reads each layer's input Gram, "
                     "which calibration measures in the blocks only; compress them with a data-free fit")
  given = calib.grams if job.data and isinstance(calib, Calibration) else None
  missing = [] if given is None else [name for name in job.names if name not in given]
  if missing:  # a pass with keep_grams=False keeps importance and token counts only
    raise ValueError(f"{fn}: calib is a Calibration without the Grams of {missing[:3]}"
                     f"{'...' if len(missing) > 3 else ''} (a pass with keep_grams=False, or another model) but this "
                     "fit reads each layer's input Gram; pass the ids or input_grams(model, ids)")
  layers = {name: _model.get_layer(model, name) for name in job.names}
  # Each dense kernel is formed when a fit or spectrum reads it, never all at once: for bf16 parameters (or
  # tensorized layers) every kernel is a new float32 array, twice the model's size on the device at 8B.
  shapes = {name: jax.eval_shape(lambda layer=layer: dense_kernel(layer)) for name, layer in layers.items()}

  def kernel(name):
    w = dense_kernel(layers[name])
    _checks.check_finite(fn, f"layer {name!r}", w)  # a NaN weight gave NaN factors without a word
    return w

  if job.data:
    check_tokens(fn, calib, {name: w.shape[0] for name, w in shapes.items()})
  # Fitted inside the calibration pass, block by block, when each fit needs only its own layer's Gram and budget
  # (ids and a uniform allocation; sequential always, each block on its own pass): one block's Grams at a time.
  blockwise = job.data and not isinstance(calib, Calibration) and (sequential or allocation == "uniform")
  # A whole-model pass first, for a global allocation (every block's importance, the spectra "loss" reads) or for
  # fits from it; it keeps every Gram only when something reads them all.
  whole = needs_cal and not (blockwise and allocation == "uniform")
  keep = job.data and (allocation == "loss" or not blockwise)
  cal = calibration(fn, model, calib, keep_grams=keep) if whole else None
  stored = {name: _model.weights(layer) for name, layer in layers.items()}
  last_copy: dict = {}

  def on_device(source, dtype):  # projections reading one input share one Gram: one device copy, one whitening
    if last_copy.get("source") is not source or last_copy["gram"].dtype != dtype:
      last_copy.update(source=source, gram=jnp.asarray(source, dtype))
    return last_copy["gram"]

  gram = lambda name: on_device(cal.grams[name], shapes[name].dtype) if job.data else None  # noqa: E731
  budgets = layer_budgets(
      fn, target, allocation, stored, importance=None if cal is None else cal.importance,
      unit={name: job.unit(w) for name, w in shapes.items()},
      spectra=lambda name: np.asarray(job.spectrum(name, kernel(name), gram(name)), np.float64))
  replaced, specs = {}, {}

  def fit_one(name, g):
    layer, w = layers[name], kernel(name)
    cap = job.cap(name, layer, w, budgets[name]) if target.key == "ratio" else (
        target.value if target.key == "rank" else None)
    out = None if (target.key == "ratio" and cap is None) else job.fit(name, layer, w, cap, g)
    if out is not None and (_model.weights(out[0]) < stored[name] or if_larger == "allow"):
      replaced[name], specs[name] = out
      return out[0]
    if if_larger == "error":
      got = "no smaller form" if out is None else f"{_model.weights(out[0]):,} parameters"
      raise ValueError(f"{fn}: {target} would give layer {name!r} {got} but it stores {stored[name]:,} now; "
                       "choose a smaller target, or pass if_larger='keep' to leave such layers as they are")
    return None

  if blockwise:
    def refit(i, grams):
      out = {}
      for name in by_block.get(i, []):
        proj = parse_layer_key(name)[1]
        new = fit_one(name, on_device(grams[proj], shapes[name].dtype))
        if new is not None:
          out[proj] = new
      last_copy.clear()  # the block's Grams, and the fit's whitening of them, die with its fits
      if job.forget is not None:
        job.forget()
      return out if sequential else {}  # {}: the states go on through the model's own blocks, as in one pass

    if sequential and job.forget is not None:  # the spectra of "loss" came from the one-pass Grams
      job.forget()
    calibration_pass(fn, model, calib, refit, keep_grams=False)
  else:
    for name in bar(job.names, f"{fn}: fit", unit="layer"):
      fit_one(name, gram(name))
  return _model.rebuild(model, _model.with_specs(model.config, specs), replaced)


def refactored(cfg, names, kind: str) -> dict[str, str]:
  """``{name: kind}`` of the layers among ``names`` that a fit writing ``kind`` layers would re-factor: tensorized
  ones of another kind (TT-matrix, BTT), rebuilt dense and factored anew, which is slow (a TT layer's dense
  reconstruction, then a full SVD) and loses the structure the layer was trained in (low-rank factors of a trained
  TT-matrix GPT at 90% of its weights had 5x its perplexity)."""
  kinds = {name: cfg.spec_of(name).kind for name in names}
  return {name: k for name, k in kinds.items() if k not in ("dense", kind)}


def refactoring_note(fn: str, found: dict[str, str], kind: str, by: str = "it") -> str:
  """One line naming the layers `refactored` found, by kind, that ``by`` (the method) would re-factor."""
  by_kind: dict[str, list[str]] = {}
  for name, k in found.items():
    by_kind.setdefault(k, []).append(name)
  listed = "; ".join(f"{len(v)} {k} layer{'s' * (len(v) > 1)} ({', '.join(v[:4])}{', ...' * (len(v) > 4)})"
                     for k, v in by_kind.items())
  return (f"{fn}: the default layers include {listed}, which {by} re-factors into {kind} layers from their dense "
          "reconstruction (slow, and their trained structure is lost)")


def _warn_refactored(fn: str, cfg, names, layers, kind: str) -> None:
  """Warns when the default selection (``layers=None``) re-factors tensorized layers; naming them is consent."""
  found = refactored(cfg, names, kind) if layers is None else {}
  if found:
    warnings.warn(refactoring_note(fn, found, kind) + "; name them with layers= to do so without this warning",
                  stacklevel=3)


def _rtol_rank(sv, rtol: float) -> int:
  """`truncation_rank` of singular values read back to the host in float64: the rank a fit slices to (a shape,
  so a host int) keeping ``sum(sv[r:]**2) <= rtol**2 sum(sv**2)``."""
  return int(truncation_rank(np.asarray(sv, np.float64) ** 2, rtol))


def _balanced(w, vt, rank: int) -> tuple[jax.Array, jax.Array]:
  """The factors ``u`` (in, rank), ``v`` (rank, out) of ``(w V_r) V_r^T``, each column/row pair at one scale.

  On the device, in float32 or wider at full matmul precision (a GPU's default float32 matmul rounds to
  TF32). Column k of ``u`` depends on row k of ``vt`` alone, so one program per layer shape and multiple of 128
  ranks serves every rank below it (an allocation gives each layer its own rank: a program per rank compiled
  more often than it ran); the host, where this ran before, read each kernel back and multiplied there."""
  bucket = min(vt.shape[0], -(-rank // 128) * 128)
  u, v = _balanced_bucket(w, vt, bucket)
  return u[:, :rank], v[:rank]


@functools.partial(jax.jit, static_argnums=2)
def _balanced_bucket(w, vt, rank: int):
  work = jnp.result_type(w.dtype, jnp.float32)
  b = vt[:rank].astype(work)
  a = jnp.matmul(w.astype(work), b.T, precision=jax.lax.Precision.HIGHEST)
  root = jnp.sqrt(jnp.maximum(jnp.linalg.norm(a, axis=0), 1e-30))
  return (a / root[None, :]).astype(w.dtype), (b * root[:, None]).astype(w.dtype)


def _lowrank_cap(shape, stored: int, budget: float) -> int | None:
  """The rank an (m, n) layer storing ``stored`` weights gets from ``budget``; None when no rank is smaller."""
  m, n = shape
  r = rank_within(budget, m + n)
  return None if r >= min(m, n) or r * (m + n) >= stored else r


def _smallest(model: Decoder, names, allocation: str, params_at_least) -> int:
  """The weights of layers ``names`` at their smallest under ``allocation``: ``params_at_least(name, shape,
  stored, budget)`` at the least budget a layer gets (`least_fraction`), None where no form within it is smaller
  than the layer, which then stays as it is."""
  total = 0
  for name in names:
    stored = _model.weights(_model.get_layer(model, name))
    block, projection = parse_layer_key(name)
    least = params_at_least(name, model.config.projection_shape(projection, block), stored,
                            least_fraction(allocation, name) * stored)
    total += stored if least is None else least
  return total


def lowrank_least(model: Decoder, names, allocation: str = "uniform") -> int:
  """The weights `svd_compress` and `svdllm_compress` keep at their smallest (rank 1 in every layer that is
  then smaller, or the rank of the least budget of ``allocation``), from the shapes alone."""
  def least(name, shape, stored, budget):
    r = _lowrank_cap(shape, stored, budget)
    return None if r is None else r * sum(shape)

  return _smallest(model, names, allocation, least)


def _lowrank_job(fn: str, target: Target, names, data: bool) -> _Job:
  """Low-rank fits from one SVD per layer (of ``W``, or of the whitened ``S^T W``), cached: an allocation's
  spectrum and the fit at any rank read the same factorization. The rank-r optimum in either metric is
  ``(W V_r) V_r^T`` with ``V_r`` the top right singular vectors."""
  cache: dict[str, tuple] = {}
  last: dict = {}  # the whitening of the last Gram: q/k/v (gate/up) read one input, so one Gram and one eigh

  def factor(name, w, g):
    if name not in cache:
      if data and last.get("gram") is not g:
        last.update(gram=g, s_t=whitening(g, fn=fn)[0])
      cache[name] = whitened_basis(whiten_with(last["s_t"], w, fn=fn) if data else w, fn=fn)
    return cache[name]

  def unit(w):
    return sum(w.shape)

  def cap(name, layer, w, budget):
    return _lowrank_cap(w.shape, _model.weights(layer), budget)

  def spectrum(name, w, g):
    return factor(name, w, g)[0]

  def fit(name, layer, w, r, g):
    bias = _bias(layer)
    sv, vt = factor(name, w, g)
    u, v = _balanced(w, vt, min(_rtol_rank(sv, target.value) if r is None else r, *w.shape))
    new = _with_bias(LowRankLinear(*w.shape, u=u, v=v, use_bias=bias is not None), bias, w.shape[1])
    cache.pop(name)  # the fit is a layer's last use of its factorization
    return new, LayerSpec(kind="lowrank", rank=new.rank)

  def forget():
    cache.clear()
    last.clear()

  return _Job(fn, target, names, fit, cap, spectrum, unit, data, forget=forget)


def svd_compress(model: Decoder, *, ratio: float | None = None, rank: int | None = None, rtol: float | None = None,
                 layers=None, allocation: str = "uniform", calib=None, if_larger: str = "error") -> Decoder:
  """Truncated SVD of every selected projection: W (m, n) -> U (m, r) V (r, n), the baseline.

  Args:
    model: the model to compress.
    ratio: fraction of the selected layers' weights kept; with ``allocation="uniform"`` each layer gets
      r = floor(ratio m n / (m + n)).
    rank: r for every layer (capped at min(m, n)).
    rtol: per-layer relative Frobenius error bound.
    layers: names (see `tnjax.compress._model.resolve_layers`); default every
      attention and MLP projection.
    allocation: how a ratio is spread: "uniform", "importance" (needs ``calib``) or "loss" (from the
      singular values); see `tnjax.compress.targets`.
    calib: calibration ids (batch, time) or a `Calibration`, for ``allocation="importance"``.
    if_larger: "error", "keep" or "allow" (a layer the target would not make smaller).

  Raises:
    ValueError: on no target or more than one, ratio outside (0, 1], rank < 1, a
      negative rtol, an unknown layer name or allocation, a layer with NaN or Inf, or a layer that would grow.

  Warns:
    UserWarning: when the default layers include tensorized ones (TT-matrix, BTT), which are re-factored into
      low-rank layers from their dense reconstruction (`refactored`); naming them in ``layers`` is consent.

  Examples:
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
    >>> small = svd_compress(model, ratio=0.5)
    >>> small.config.spec("mlp.c_fc", 0).kind, small.num_params < model.num_params
    ('lowrank', True)
  """
  fn = "svd_compress"
  target = Target.of(fn, ratio=ratio, rank=rank, rtol=rtol)
  names = _model.resolve_layers(fn, model.config, layers)
  _warn_refactored(fn, model.config, names, layers, "lowrank")
  return _run(_lowrank_job(fn, target, names, data=False), model, calib=calib, allocation=allocation,
              sequential=False, if_larger=if_larger)


def svdllm_compress(model: Decoder, calib, *, ratio: float | None = None, rank: int | None = None,
                    rtol: float | None = None, layers=None, allocation: str = "uniform", sequential: bool = False,
                    if_larger: str = "error") -> Decoder:
  """SVD-LLM (Wang et al. 2024): each projection's rank-r factors that minimize its *output* error on
  calibration text, ``||X (W - U V)||_F``, by truncation-aware whitening
  ([`whitened_svd`][tnjax.core.whitening.whitened_svd] of the input Gram from
  [`input_grams`][tnjax.compress.calibration.input_grams]).

  Args:
    model: the model to compress (any family; projections dense or tensorized).
    calib: calibration ids, (batch, time) arrays, or a `Calibration` (reused across targets, but it holds every
      block's Grams; ids with a uniform allocation hold one block's at a time, see the module docstring); at
      least as many tokens as the widest input compressed.
    ratio, rank, layers, allocation, if_larger: as in `svd_compress` ("loss" reads the whitened spectra).
    rtol: per-layer relative *output* error bound ``||X (W - W')|| <= rtol ||X W||`` on the calibration inputs.
    sequential: measure block i on the outputs of the compressed blocks 0..i-1 (needs ids, not a Calibration).

  Raises:
    ValueError: on the target errors of `svd_compress`, bad or too short calibration.

  Examples:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
    >>> small = svdllm_compress(model, np.random.default_rng(0).integers(0, 512, (8, 64)), ratio=0.5)
    >>> small.config.spec("mlp.c_fc", 0).kind, small.num_params < model.num_params
    ('lowrank', True)
  """
  fn = "svdllm_compress"
  target = Target.of(fn, ratio=ratio, rank=rank, rtol=rtol)
  names = _model.resolve_layers(fn, model.config, layers)
  _warn_refactored(fn, model.config, names, layers, "lowrank")
  if calib is None:
    raise ValueError(f"{fn}: calib=None but SVD-LLM needs calibration ids (batch, time) or a Calibration")
  return _run(_lowrank_job(fn, target, names, data=True), model, calib=calib, allocation=allocation,
              sequential=sequential, if_larger=if_larger)


def _ttm_params(in_dims, out_dims, rank: int) -> int:
  modes = [i * o for i, o in zip(in_dims, out_dims)]
  r = (1,) + tuple(min(rank, f) for f in _checks.full_ranks(modes)) + (1,)
  return sum(r[k] * modes[k] * r[k + 1] for k in range(len(modes)))


def mpo_compress(model: Decoder, *, rank: int | None = None, ratio: float | None = None, rtol: float | None = None,
                 layers=None, num_cores: int = 3, method: str = "svd", layout: str = "balanced",
                 fit: str = "weights", calib=None, allocation: str = "uniform", sequential: bool = False,
                 if_larger: str = "error") -> Decoder:
  """CompactifAI's step one: every selected projection becomes an MPO (TT-matrix) of bond dimension ``rank``.

  Each kernel is decomposed into ``num_cores`` cores with
  [`factorize`][tnjax.factorize] dims; the layer becomes a
  [`TTMLinear`][tnjax.nn.TTMLinear]. ``fit="weights"`` is CompactifAI's
  [`ttm_svd`][tnjax.ttm_svd] of the weights; ``fit="data"`` fits the layer's
  outputs on calibration text instead
  ([`whitened_ttm_svd`][tnjax.core.whitening.whitened_ttm_svd]: TT-SVD in the
  Kronecker-factored metric of the input Gram). That metric only approximates
  the Gram, so at a rank or ratio each layer keeps whichever of the two fits
  (same size) has the lower output error in the full metric: on a trained
  12 x 768 GPT the Kronecker fit alone was better at half the parameters and
  worse at 0.7 and 0.9 kept. With ``layout="fused"`` every
  layer gets the two cores of [`fused_dims`][tnjax.core.contraction.fused.fused_dims] and
  ``path="fused"``, so on a GPU it runs the fused Pallas kernels (ranks up to 16).

  Args:
    model: the model to compress.
    rank: bond dimension (rank cap) of every layer.
    ratio: fraction of the selected layers' weights kept; each layer's bond dimension is the largest within
      its budget (see ``allocation``).
    rtol: per-layer relative error bound (ranks chosen per bond), of the weights or, with ``fit="data"``, of
      the whitened weights.
    layers: names (see `tnjax.compress._model.resolve_layers`); default all projections.
    num_cores: MPO sites per layer ("balanced" layout).
    method: TT-SVD steps, "svd" or "gram" (faster on GPUs, same truncation; see [`tt_svd`][tnjax.tt_svd]).
    layout: "balanced" (``factorize`` dims, ``num_cores`` sites) or "fused" (two sites in the fused
      kernel's layout; widths must be multiples of 256, rank <= 16).
    fit: "weights" or "data" (needs ``calib``).
    calib, allocation, sequential, if_larger: as in `svdllm_compress` ("loss" reads each layer's singular
      values, whitened for ``fit="data"``).

  Raises:
    ValueError: as `svd_compress`, for num_cores < 1, an unknown layout or fit, and for the fused layout a
      width it cannot take or a rank above 16.

  Complexity:
    One TT-SVD per layer, O(n[0]^2 m n) for an (m, n) kernel (a QR first
    when the first unfolding is wide); ``fit="data"`` adds one eigendecomposition per input mode.

  Examples:
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
    >>> small = mpo_compress(model, rank=8, layers=["mlp.c_fc"])
    >>> type(small.h[0].mlp.c_fc).__name__, max(small.h[0].mlp.c_fc.ranks), small.num_params < model.num_params
    ('TTMLinear', 8, True)
  """
  fn = "mpo_compress"
  target = Target.of(fn, rank=rank, ratio=ratio, rtol=rtol)
  num_cores = _checks.check_positive_int(fn, "num_cores", num_cores)
  check_choice(fn, "layout", layout, ("balanced", "fused"))
  check_choice(fn, "fit", fit, FITS)
  if layout == "fused":
    num_cores = 2
    if rank is not None and rank > fused.MAX_RANK:
      raise ValueError(f"{fn}: rank={rank} but the fused layout takes at most {fused.MAX_RANK}")
    if fit == "data":
      raise ValueError(f"{fn}: fit='data' with layout='fused' but the data-aware fit is for the balanced layout")
  names = _model.resolve_layers(fn, model.config, layers)
  _warn_refactored(fn, model.config, names, layers, "ttm")

  @functools.cache
  def dims(name):
    return _mpo_dims(fn, name, dense_kernel(_model.get_layer(model, name)).shape, layout, num_cores)

  def cap(name, layer, w, budget):
    return _mpo_cap(*dims(name), layout, _model.weights(layer), budget)

  def spectrum(name, w, g):
    return whitened_spectrum(w, g if fit == "data" else None)

  def fit_layer(name, layer, w, c, g):
    in_dims, out_dims = dims(name)
    r_tol = target.value if target.key == "rtol" else None
    bias = _bias(layer)
    if fit == "data":
      tt = whitened_ttm_svd(w, g, in_dims, out_dims, max_rank=c, rtol=r_tol)
      if r_tol is None:  # the Kronecker metric approximates the Gram: keep whichever fit is closer in the full one
        plain = ttm_svd(w, in_dims, out_dims, max_rank=c, method=method)
        if _output_error(plain, w, g) < _output_error(tt, w, g):
          tt = plain
      new = _with_bias(TTMLinear(*w.shape, ttm=tt, use_bias=bias is not None), bias, w.shape[1])
    else:
      new = TTMLinear.from_dense(w, bias, rank=c, rtol=r_tol, in_dims=in_dims, out_dims=out_dims, method=method)
    path = "fused" if layout == "fused" else _model.spec_of(model.config, name).path
    new.path = path
    return new, LayerSpec(kind="ttm", rank=max(new.ranks), in_dims=in_dims, out_dims=out_dims,
                          num_cores=len(in_dims), path=path, ranks=_bonds(new.ranks))

  job = _Job(fn, target, names, fit_layer, cap, spectrum, lambda w: sum(w.shape), fit == "data")
  return _run(job, model, calib=calib, allocation=allocation, sequential=sequential, if_larger=if_larger)


def _mpo_dims(fn: str, name: str, shape, layout: str, num_cores: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The (in_dims, out_dims) of layer ``name`` of ``shape`` as an MPO of ``layout``."""
  m, n = shape
  if layout == "fused":
    try:
      return fused.fused_dims(m, n)
    except ValueError as err:
      raise ValueError(f"{fn}: layer {name} is {m} x {n}: {err}") from None
  return factorize(m, num_cores), factorize(n, num_cores)


def _mpo_cap(in_dims, out_dims, layout: str, stored: int, budget: float) -> int | None:
  """The largest bond dimension within ``budget``; None when even that is not smaller than ``stored``."""
  full = max(_checks.full_ranks([i * o for i, o in zip(in_dims, out_dims)]) or (1,))
  if layout == "fused":
    full = min(full, fused.MAX_RANK)
  params_at = functools.partial(_ttm_params, in_dims, out_dims)
  c = largest_rank(params_at, budget, full)
  return None if params_at(c) >= stored else c


def mpo_least(model: Decoder, names, allocation: str = "uniform", *, layout: str = "balanced",
              num_cores: int = 3) -> int:
  """The weights `mpo_compress` keeps at its smallest (bond dimension 1 in every layer that is then smaller, or
  the one of the least budget of ``allocation``), from the shapes alone."""
  def least(name, shape, stored, budget):
    in_dims, out_dims = _mpo_dims("mpo_compress", name, shape, layout, num_cores)
    c = _mpo_cap(in_dims, out_dims, layout, stored, budget)
    return None if c is None else _ttm_params(in_dims, out_dims, c)

  return _smallest(model, names, allocation, least)


def _output_error(tt, w, gram) -> float:
  """``tr((W - W_tt)^T G (W - W_tt))``: the squared output error of a TT-matrix fit on the calibration inputs."""
  d = w - to_dense(tt)[: w.shape[0], : w.shape[1]].astype(w.dtype)
  return float(jnp.sum((gram @ d) * d))


def _btt_params(in_dims, out_dims, rank: int) -> int:
  (m1, m2), (n1, n2) = in_dims, out_dims
  return rank * (m1 * m2 * n1 + n1 * n2 * m2)


def _btt_cap(in_dims, out_dims, stored: int, budget: float) -> int | None:
  """The largest BTT rank within ``budget``; None when even rank 1 is not smaller than ``stored``."""
  full = min(in_dims[0], out_dims[1])
  params_at = functools.partial(_btt_params, in_dims, out_dims)
  r = largest_rank(params_at, budget, full)
  return None if params_at(r) >= stored else r


def btt_compress(model: Decoder, *, rank: int | None = None, ratio: float | None = None, rtol: float | None = None,
                 layers=None, fit: str = "weights", calib=None, allocation: str = "uniform",
                 sequential: bool = False, if_larger: str = "error") -> Decoder:
  """Every selected projection becomes a Block-TT layer ([`BTTLinear`][tnjax.nn.BTTLinear]) of rank ``rank``:
  the structure that pre-trains best ("Compute Better Spent"), reached from a trained dense model.

  ``fit="weights"`` is the per-block truncated SVD of
  [`btt_from_dense`][tnjax.core.btt.btt_from_dense] (the best BTT in Frobenius norm); ``fit="data"`` fits the
  layer's outputs on calibration text
  ([`whitened_btt`][tnjax.core.whitening.whitened_btt]: SVD-LLM per block in the metric of its input block,
  then the right cores by least squares in the full input Gram). Dims are
  [`btt_dims`][tnjax.core.btt.btt_dims]'s.

  Args:
    model: the model to compress.
    rank: the BTT rank of every layer (capped at each layer's ``min(m1, n2)``).
    ratio: fraction of the selected layers' weights kept (see ``allocation``).
    rtol: per-layer relative error bound: of the weights, or with ``fit="data"`` of the outputs in the
      metric of each input block's own Gram (before the refit, which lowers the error further).
    layers: names (see `tnjax.compress._model.resolve_layers`); default all projections.
    fit: "weights" or "data" (needs ``calib``).
    calib, allocation, sequential, if_larger: as in `svdllm_compress` ("loss" reads `btt_spectrum`).

  Raises:
    ValueError: as `svd_compress`, and for an unknown fit.

  Examples:
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
    >>> small = btt_compress(model, rank=2, layers=["mlp.c_fc"])
    >>> type(small.h[0].mlp.c_fc).__name__, small.h[0].mlp.c_fc.rank, small.num_params < model.num_params
    ('BTTLinear', 2, True)
  """
  fn = "btt_compress"
  target = Target.of(fn, rank=rank, ratio=ratio, rtol=rtol)
  check_choice(fn, "fit", fit, FITS)
  names = _model.resolve_layers(fn, model.config, layers)
  _warn_refactored(fn, model.config, names, layers, "btt")
  data = fit == "data"

  def dims(w):
    return btt_dims(*w.shape)

  def cap(name, layer, w, budget):
    return _btt_cap(*dims(w), _model.weights(layer), budget)

  cache: dict[str, tuple] = {}

  def basis(name, w, g):  # fit="data": the spectrum and the fit read one eigh of each layer's block matrices
    if name not in cache:
      cache[name] = btt_basis(w, *dims(w), g, fn=fn)
    return cache[name]

  def spectrum(name, w, g):
    return basis(name, w, g)[0] if data else btt_spectrum(w, *dims(w))

  def unit(w):
    return _btt_params(*dims(w), 1)

  def fit_layer(name, layer, w, r, g):
    in_dims, out_dims = dims(w)
    full = min(in_dims[0], out_dims[1])
    r = min(_rtol_rank(spectrum(name, w, g), target.value) if r is None else r, full)
    if data:
      btt = whitened_btt(w, g, in_dims, out_dims, r, vectors=basis(name, w, g)[1])
      cache.pop(name)  # the fit is a layer's last use of its eigenpairs
    else:
      btt = btt_from_dense(w, in_dims, out_dims, r)
    bias = _bias(layer)
    new = _with_bias(BTTLinear(*w.shape, btt=btt, use_bias=bias is not None, param_dtype=btt.dtype), bias,
                     w.shape[1])
    return new, LayerSpec(kind="btt", rank=r, in_dims=in_dims, out_dims=out_dims)

  job = _Job(fn, target, names, fit_layer, cap, spectrum, unit, data, forget=cache.clear)
  return _run(job, model, calib=calib, allocation=allocation, sequential=sequential, if_larger=if_larger)


def btt_least(model: Decoder, names, allocation: str = "uniform") -> int:
  """The weights `btt_compress` keeps at its smallest (rank 1 in every layer that is then smaller, or the rank
  of the least budget of ``allocation``), from the shapes alone."""
  def least(name, shape, stored, budget):
    in_dims, out_dims = btt_dims(*shape)
    r = _btt_cap(in_dims, out_dims, stored, budget)
    return None if r is None else _btt_params(in_dims, out_dims, r)

  return _smallest(model, names, allocation, least)


def _mps_params(dims, rank: int) -> int:
  r = (1,) + tuple(min(rank, f) for f in _checks.full_ranks(dims)) + (1,)
  return sum(r[k] * dims[k] * r[k + 1] for k in range(len(dims)))


def _embedding_params(form: str, v: int, d: int, vocab_dims, feature_dims):
  """(parameters at rank r, full rank) of a (v, d) embedding table in ``form``."""
  if form == "mps":
    return lambda r: v * _mps_params(feature_dims, r), max(_checks.full_ranks(feature_dims) or (1,))
  if form == "lowrank":
    return lambda r: r * (v + d), min(v, d)
  full = max(_checks.full_ranks([a * b for a, b in zip(vocab_dims, feature_dims)]) or (1,))
  return lambda r: _ttm_params(vocab_dims, feature_dims, r), full


def embedding_least(model: Decoder, *, form: str = "mps", feature_dims=None, num_cores: int = 3) -> int:
  """The parameters `tensorgpt_embedding` keeps at its smallest (rank 1, or the embedding as it is when that is
  not smaller), from the shapes alone."""
  stored = _model.count_params(model.wte)
  v, d = model.config.vocab_size, model.config.d_model
  feature_dims = factorize(d, num_cores) if feature_dims is None else tuple(feature_dims)
  params_at, _ = _embedding_params(form, v, d, factorize(v, len(feature_dims)), feature_dims)
  return min(params_at(1), stored)


def tensorgpt_embedding(model: Decoder, *, rank: int | None = None, ratio: float | None = None,
                        rtol: float | None = None, feature_dims=None, num_cores: int = 3,
                        form: str = "mps", calib=None, count_smoothing: float = 1.0, head: str = "tied",
                        if_larger: str = "error") -> Decoder:
  """TensorGPT: the token embedding compressed without training.

  ``form="mps"`` (the paper): each row, reshaped to ``feature_dims``, is
  decomposed by TT-SVD into its own MPS, vmapped over the vocabulary
  ([`MPSEmbedding`][tnjax.nn.MPSEmbedding]). ``form="ttm"``: the whole table as one
  TT-matrix ([`TTEmbedding`][tnjax.nn.TTEmbedding]). ``form="lowrank"``: ``U V``
  ([`LowRankEmbedding`][tnjax.nn.LowRankEmbedding]), the baseline at equal size.
  A tied head keeps reading the (compressed) embedding, so it stays tied;
  ``head="dense"`` unties it first (the head keeps the dense table, and only
  the input embedding is compressed).

  With ``calib`` (form "lowrank"), each row is weighted by how often its token
  occurs (``counts + count_smoothing``): the exact minimizer of
  ``sum_v c_v ||E_v - E'_v||^2`` ([`whitened_svd`][tnjax.core.whitening.whitened_svd]
  with a diagonal metric), so frequent tokens are fitted best. Per-row MPS rows
  are independent, so a metric cannot change them; a token metric does not
  factor over a TT-matrix's vocabulary modes (token ids carry no Kronecker
  structure), so "ttm" takes none either.

  Args:
    model: the model to compress.
    rank: TT rank cap (per row for "mps").
    ratio: fraction of the table's stored parameters kept; rank is the largest that fits.
    rtol: relative error bound, per row for "mps", of the whole (weighted) table for "ttm".
    feature_dims: factorization of d_model (default ``factorize(d_model, num_cores)``).
    num_cores: d, used when feature_dims is not given.
    form: "mps", "ttm" or "lowrank".
    calib: calibration ids (batch, time) or a `Calibration` ("lowrank" only): its token counts.
    count_smoothing: added to every token's count, so tokens unseen in ``calib`` still count.
    head: "tied" (a tied head reads the compressed table) or "dense" (untie: the head keeps the dense table).
    if_larger: "error", "keep" or "allow", for a result not smaller than the embedding.

  The compression ratio is ``vocab * d_model / stored parameters``; with
  rank 1 and dims summing to s it is d_model / s (GPT-2, dims summing to 20: 38.4x).

  Raises:
    ValueError: for the target errors of `svd_compress`, an unknown form, feature_dims whose product is below
      d_model, calib with a form other than "lowrank", or a result that would not be smaller.

  Examples:
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
    >>> small = tensorgpt_embedding(model, rank=1, feature_dims=(4, 4, 8))
    >>> 512 * 128 / small.wte.num_params
    8.0
  """
  fn = "tensorgpt_embedding"
  target = Target.of(fn, rank=rank, ratio=ratio, rtol=rtol)
  check_choice(fn, "form", form, ("mps", "ttm", "lowrank"))
  check_choice(fn, "head", head, ("tied", "dense"))
  check_choice(fn, "if_larger", if_larger, IF_LARGER)
  if calib is not None and form != "lowrank":
    raise ValueError(f"{fn}: calib given with form={form!r} but only form='lowrank' takes a token-frequency "
                     "metric")
  if isinstance(count_smoothing, bool) or not isinstance(count_smoothing, (int, float)) or not count_smoothing >= 0:
    raise ValueError(f"{fn}: count_smoothing={count_smoothing!r} but a number >= 0 is expected")
  table = model.embedding_table
  v, d = table.shape
  feature_dims = (factorize(d, num_cores) if feature_dims is None
                  else _checks.check_dims(fn, "feature_dims", feature_dims))
  if math.prod(feature_dims) < d:
    raise ValueError(f"{fn}: prod(feature_dims)={math.prod(feature_dims)} but d_model={d}; expected at least that")
  vocab_dims = factorize(v, len(feature_dims))
  if (target.key, target.value) == ("ratio", 1.0):
    return _model.rebuild(model, model.config, {})
  stored = _model.count_params(model.wte)
  cap = target.value if target.key == "rank" else None
  rtol = target.value if target.key == "rtol" else None
  if target.key == "ratio":
    params_at, full = _embedding_params(form, v, d, vocab_dims, feature_dims)
    cap = largest_rank(params_at, target.value * stored, full)
  if form == "mps":
    wte = MPSEmbedding.from_dense(table, rank=cap, rtol=rtol, feature_dims=feature_dims)
    spec = LayerSpec(kind="mps", rank=max(wte.ranks), out_dims=feature_dims, num_cores=len(feature_dims),
                     ranks=_bonds(wte.ranks))
  elif form == "lowrank":
    if calib is None:
      wte = LowRankEmbedding.from_dense(table, rank=None if cap is None else min(cap, v, d), rtol=rtol)
    else:
      counts = calibration(fn, model, calib, keep_grams=False).token_counts.astype(np.float64) + count_smoothing
      sv, vt = whitened_basis(table, jnp.asarray(counts, table.dtype), fn=fn)
      u, vv = _balanced(table, vt, min(_rtol_rank(sv, rtol) if cap is None else cap, v, d))
      wte = LowRankEmbedding(v, d, u=u, v=vv)
    spec = LayerSpec(kind="lowrank", rank=wte.rank)
  else:
    wte = TTEmbedding.from_dense(table, rank=cap, rtol=rtol, vocab_dims=vocab_dims, feature_dims=feature_dims)
    spec = LayerSpec(kind="ttm", rank=max(wte.ttm.ranks), in_dims=vocab_dims, out_dims=feature_dims,
                     num_cores=len(feature_dims), ranks=_bonds(wte.ttm.ranks))
  if _model.count_params(wte) >= stored and if_larger != "allow":
    if if_larger == "keep":
      return _model.rebuild(model, model.config, {})
    raise ValueError(f"{fn}: {target} would give the embedding {_model.count_params(wte):,} parameters but it "
                     f"stores {stored:,} now; choose a smaller target, or pass if_larger='keep'")
  cfg, replaced = _model.with_specs(model.config, {"embedding": spec}), {"embedding": wte}
  if head == "dense" and cfg.tie_embeddings:
    cfg = cfg.replace(tie_embeddings=False, layers={**cfg.layers, "lm_head": LayerSpec()})
    replaced["lm_head"] = {"kernel": np.asarray(table).T}
  return _model.rebuild(model, cfg, replaced)


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

  Examples:
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
    new = kinds.kind_of(layer).quantize(layer)  # the kind's own int8 form (TT cores, factors), if it has one
    if new is None:
      w = dense_kernel(layer)
      new, spec = Int8Linear(*w.shape, kernel=w, bias=_bias(layer), use_bias=use_bias), LayerSpec("dense")
    elif use_bias:
      new.bias[...] = layer.bias[...]
    replaced[name] = new
    specs[name] = dataclasses.replace(spec, quant="int8")
  return _model.rebuild(model, _model.with_specs(cfg, specs), replaced)
