"""Calibration for output-error compression: the input Gram matrix ``X^T X`` of every projection.

With ``G = X^T X`` of a layer's inputs, the output error of any replacement
``W'`` is ``||X (W - W')||_F^2 = tr((W - W')^T G (W - W'))``, so the data-aware
decompositions of [`tnjax.core.whitening`][tnjax.core.whitening] need only
``G``. One pass through the model, block by block through each block's
``trace`` (the model seam), collects it for every projection of every family,
with each block's importance (MoDeGPT's ``1 - cos(input, output)``) and the
token counts (an embedding's metric).

Sequential calibration (``refit``): block i's statistics are taken on the
hidden states that leave the already-compressed blocks 0..i-1, so each fit
sees the inputs it will get (as GPTQ and SVD-LLM's sequential variant do).

Precision and memory: each batch's Grams are computed on the device to
float32 accuracy (`gram_precision`) and summed there with compensated
(Kahan) summation, so rounding does not grow with the number of batches; each
block's sums reach the host once, as float64. (Moving every batch's Grams to
the host took most of svdllm's 242 s on a Llama-3.2-1B shape.) Projections
that read the same input (Llama's q/k/v, gate/up) share one computation and
one stored array. The hidden
states of all batches are kept between blocks (tokens x d_model float32:
400 MB for 128k tokens of GPT-2 124M); GPT-2 124M's float64 Grams take
about 1.1 GB (its 3072-wide MLP inputs dominate), a Llama-3.1-8B shape's
about 2 GB a block and 65 GB in all. ``keep_grams=False`` streams them: each
block's Grams go to ``refit`` and are dropped before the next block is
measured, so the host holds one block's Grams, not the model's.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tnjax.compress._progress import bar
from tnjax.models.decoder import Decoder
from tnjax.models.names import layer_key


def as_batches(fn: str, batches) -> list[jax.Array]:
  """Calibration batches as a list of (batch, time) integer id arrays; ``fn`` names the caller in errors."""
  if batches is None:
    raise ValueError(f"{fn}: batches=None but calibration ids (batch, time) are expected")
  if isinstance(batches, (np.ndarray, jax.Array)) and np.ndim(batches) == 2:
    batches = [batches]
  batches = [jnp.asarray(b) for b in batches]
  if not batches or any(b.ndim != 2 or not jnp.issubdtype(b.dtype, jnp.integer) or b.size == 0 for b in batches):
    raise ValueError(f"{fn}: batches must be one or more non-empty integer id arrays of shape (batch, time)")
  return batches


@dataclasses.dataclass
class Calibration:
  """What a calibration pass collects (`input_grams`).

  Attributes:
    grams: ``{"h.{i}.{projection}": (n_in, n_in) float64}``, ``X^T X`` of each projection's inputs; empty
      from a pass with ``keep_grams=False`` (the Grams were streamed to its ``refit``, or not needed).
    tokens: tokens summed.
    importance: per block, ``1 - mean cos(block input, block output)`` (MoDeGPT's block importance).
    token_counts: (vocab_size,) int64, occurrences of each id (an embedding's diagonal metric).
    sequential: whether block i was measured after blocks 0..i-1 were compressed.
  """

  grams: dict[str, np.ndarray]
  tokens: int
  importance: list[float]
  token_counts: np.ndarray
  sequential: bool = False


def check_tokens(fn: str, calib, widths: dict[str, int]) -> None:
  """Refuses calibration (ids or a `Calibration`) with fewer tokens than the widest input in ``widths``
  (layer name -> input features): its Gram would be singular, leaving the fit free in directions the
  data never visits."""
  if calib is None or not widths:
    return
  tokens = calib.tokens if isinstance(calib, Calibration) else sum(int(b.size) for b in as_batches(fn, calib))
  name = max(widths, key=widths.get)
  if tokens < widths[name]:
    raise ValueError(f"{fn}: calib has {tokens} tokens but layer {name!r} reads {widths[name]} features; expected "
                     f"at least {widths[name]} calibration tokens (more text in calib, --calib, or longer batches)")


def _cos_sum(x, y):
  return jnp.sum(jnp.sum(x * y, -1) / (jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1) + 1e-12))


def shared_inputs(block, x) -> tuple[dict[str, str], dict[str, int]]:
  """Of one block, found by tracing ``block.trace`` abstractly (no computation): ``{projection: the first
  projection reading the same array}`` (Llama's q/k/v and gate/up read one input each) and ``{that first
  projection: its input width}``."""
  first: dict[str, str] = {}
  width: dict[str, int] = {}

  def names(block, x):
    seen: dict[int, str] = {}
    for name, inp in block.trace(x)[1]["inputs"].items():
      first[name] = seen.setdefault(id(inp), name)
      width.setdefault(first[name], inp.shape[-1])
    return 0

  nnx.eval_shape(names, block, x)
  return first, width


def gram_precision():
  """The matmul precision of a batch's Gram: float32-accurate everywhere, by the fastest route the backend has.
  On a GPU that is six bf16 tensor-core products per float32 one (``BF16_BF16_F32_X6``, about 2.5x the
  float32 units' rate on an H100/H200, where the Grams of a Llama-3.1-8B shape's 14336-wide MLP inputs
  dominate calibration); elsewhere ``Precision.HIGHEST``."""
  if jax.default_backend() == "gpu":
    return jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6
  return jax.lax.Precision.HIGHEST


def _compensated_add(total, value):
  """Kahan summation: ``(sum, lost low-order bits)`` plus ``value``; float32 sums whose error does not grow
  with the number of terms, so Grams can be summed on the device and moved to the host once per block."""
  s, c = total
  y = value - c
  t = s + y
  return t, (t - s) - y


@functools.partial(nnx.jit, donate_argnums=2)
def _block_stats(block, x, totals) -> tuple[jax.Array, dict, jax.Array]:
  """Block outputs, the Grams of its distinct inputs added into ``totals`` (donated), and the cosine sum."""
  y, acts = block.trace(x)
  out = {}
  for name, (s, c) in totals.items():
    z = acts["inputs"][name]
    z = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
    out[name] = _compensated_add((s, c), jnp.matmul(z.T, z, precision=gram_precision()))
  return y.astype(jnp.float32), out, _cos_sum(x, y.astype(jnp.float32))


@nnx.jit
def _embed(model, ids):
  return model.embed(ids).astype(jnp.float32)


@nnx.jit
def _forward(block, x):
  return block(x)[0].astype(jnp.float32)


def with_layers(block: nnx.Module, layers: dict[str, nnx.Module]) -> nnx.Module:
  """A copy of ``block`` whose projections (``{"mlp.c_fc": module}``) are replaced."""
  block = nnx.clone(block)
  for name, module in layers.items():
    *path, last = name.split(".")
    owner = block
    for part in path:
      owner = getattr(owner, part)
    if hasattr(module, "dtype") and hasattr(getattr(owner, last), "dtype"):  # keep the computation dtype
      module.dtype = getattr(owner, last).dtype
    setattr(owner, last, module)
  return block


Refit = Callable[[int, dict[str, np.ndarray]], dict[str, nnx.Module]]


def calibration_pass(fn: str, model: Decoder, batches, refit: Refit | None = None, *,
                     keep_grams: bool = True) -> Calibration:
  """One pass over the calibration batches, block by block.

  ``refit(i, grams)`` (``grams`` keyed by projection name; projections reading
  one input share one array, so it must not be modified in place) returns
  block i's replacement projections; the states go on through block i with
  them, so block i + 1 is measured on the compressed model's states. Without
  ``refit``, or when it returns ``{}``, the model's own blocks carry them.

  ``keep_grams=False``: the returned ``grams`` is empty and block i's Grams are
  released when ``refit(i, ...)`` returns, before block i + 1 is measured, so
  the host holds one block's Grams at a time (for a fit that needs only its
  own layer's Gram, or a caller that reads only importance and token counts).
  """
  batches = as_batches(fn, batches)
  for b in batches:
    model._check_ids(b)
  counts = np.zeros(model.config.vocab_size, np.int64)
  for b in batches:
    counts += np.bincount(np.asarray(b).ravel(), minlength=model.config.vocab_size)
  states = [_embed(model, b) for b in batches]
  grams, importance, sequential = {}, [], False
  for i, block in bar(enumerate(model.h), f"{fn}: blocks", unit="block", total=len(model.h)):
    first, width = shared_inputs(block, states[0])
    zero = lambda n: jnp.zeros((n, n), jnp.float32)  # noqa: E731
    totals = {name: (zero(n), zero(n)) for name, n in width.items()}  # (sum, compensation) per distinct input
    cos, outs = 0.0, []
    for x in states:
      y, totals, c = _block_stats(block, x, totals)
      cos, outs = cos + c, outs + [y]  # no host sync per batch
    importance.append(1.0 - float(cos) / sum(int(np.prod(x.shape[:-1])) for x in states))
    # one float64 array per distinct input, shared by the projections that read it
    distinct = {name: np.asarray(jax.device_get(s), np.float64) for name, (s, _) in totals.items()}
    del totals
    block_grams = {name: distinct[first[name]] for name in first}
    if keep_grams:
      grams.update({layer_key(i, name): v for name, v in block_grams.items()})
    replaced = refit(i, block_grams) if refit is not None else {}
    del distinct, block_grams  # else they live on through block i + 1's measurement, two blocks' Grams at once
    if replaced:
      new = with_layers(block, replaced)
      outs, sequential = [_forward(new, x) for x in states], True
    states = outs
  tokens = sum(int(b.size) for b in batches)
  # sequential only when states went on through replaced blocks (a streamed one-pass fit's refit returns {})
  return Calibration(grams, tokens, importance, counts, sequential=sequential)


def input_grams(model: Decoder, batches) -> Calibration:
  """``X^T X`` of the inputs of every projection, summed over calibration batches, in one pass.

  Args:
    model: any decoder family (GPT-2, Llama-style), dense or tensorized.
    batches: integer id arrays (batch, time), or one such array.

  Returns:
    A `Calibration`: ``grams`` ``{"h.{i}.{projection}": (n_in, n_in) float64}``, the number of ``tokens``,
    per-block ``importance`` and ``token_counts``.

  Raises:
    ValueError: on empty or non-integer batches, or ids the model refuses (out of vocabulary, too long).

  Examples:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> cal = input_grams(GPT(preset("tiny"), rngs=nnx.Rngs(0)), np.zeros((2, 16), np.int32))
    >>> cal.tokens, cal.grams["h.1.attn.c_attn"].shape, cal.grams["h.1.mlp.c_proj"].shape, int(cal.token_counts[0])
    (32, (128, 128), (512, 512), 32)
  """
  return calibration_pass("input_grams", model, batches)
