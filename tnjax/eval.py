"""Evaluation: perplexity with the sliding-window method Hugging Face documents."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tnjax.core import _checks


@functools.partial(jax.jit, static_argnums=0)
def _window_nll(graphdef, state, ids, weights):
  """Sum of -log p(ids[t+1] | ids[:t+1]) over positions with weight 1, and the count."""
  logits = nnx.merge(graphdef, state)(ids).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(nll * weights[:, 1:]), jnp.sum(weights[:, 1:])


def windows(length: int, block_size: int, stride: int):
  """(begin, end, first scored position) of each window, as in Hugging Face's perplexity guide.

  Each token after the first is scored exactly once, with up to
  ``block_size - stride`` tokens of context carried over from the previous window.

  Examples:
    >>> list(windows(10, block_size=4, stride=2))  # (begin, end, first scored position)
    [(0, 4, 1), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
  """
  prev_end = 0
  for begin in range(0, length, stride):
    end = min(begin + block_size, length)
    yield begin, end, max(prev_end - begin, 1) if begin else 1
    prev_end = end
    if end == length:
      break


DEFAULT_WINDOW = 2048
"""Tokens per window when none is asked for and the model's context is longer: Llama-3.x and Qwen2.5 contexts
(32k-131k tokens) would make each window, and its activations, 16-64x larger than the text or the job needs."""


def window_size(fn: str, context: int, tokens: int, block_size: int | None = None, *, reads_past: int = 0,
                text: str = "token_ids", past_text: bool = False) -> int:
  """The window of an evaluation or calibration job: ``block_size`` checked, or a default that fits the job.

  The default is the smallest of the model's ``context``, `DEFAULT_WINDOW` and the text (``tokens`` less
  ``reads_past``: training and calibration windows read one target past the window and need one spare start).
  ``past_text=True`` accepts a ``block_size`` longer than the text (perplexity scores the text either way).

  Raises:
    ValueError: a ``block_size`` outside [2, context], or a text too short for the window, naming ``text``.

  Examples:
    >>> window_size("eval", context=131072, tokens=100_000), window_size("eval", context=1024, tokens=300)
    (2048, 300)
  """
  if block_size is not None and not 2 <= block_size <= context:
    raise ValueError(f"{fn}: block_size={block_size} but 2 <= block_size <= {context} (the model's context) is "
                     "expected")
  room = tokens - reads_past
  block = min(context, DEFAULT_WINDOW, room) if block_size is None else block_size
  if block < 2 or (block > room and not past_text):
    need = max(block, 2) + reads_past
    raise ValueError(f"{fn}: {text} has {tokens} tokens but a window of {max(block, 2)} needs at least {need}; "
                     "give more text or a smaller block_size (--block-size)")
  return block


LOGITS_PER_CALL = 1 << 25  # float32 logits one call may hold (128 MB): sets the default batch of windows


def perplexity(model, token_ids, *, block_size: int | None = None, stride: int | None = None,
               batch_size: int | None = None) -> dict:
  """Perplexity of a token sequence under ``model`` with overlapping windows.

  Args:
    model: a model of any family ([`GPT`][tnjax.models.GPT], [`Llama`][tnjax.models.Llama]).
    token_ids: 1-d integer ids (at least 2).
    block_size: window length (default: the smallest of the model's block_size, `DEFAULT_WINDOW` and
      the text; a window longer than the text scores the same tokens).
    stride: step between windows (default: block_size, no overlap); smaller
      strides give each token more context and a lower, more faithful figure.
    batch_size: windows per device call (default: as many as keep the logits within
      ``LOGITS_PER_CALL`` floats, at most 64; GPT-2's 1024 x 50257 gets 1). Every call has the same
      shape (the last is padded with unscored windows), so the model compiles once; on a GPU, one window
      per call leaves it waiting on dispatch.

  Returns:
    ``{"perplexity", "nll", "tokens"}``: exp of the mean NLL, the mean NLL in
    nats, and how many tokens were scored.

  Raises:
    ValueError: on fewer than 2 tokens, ids outside the vocabulary,
      block_size / stride out of range, or a non-finite result.

  Examples:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
    >>> result = perplexity(model, np.arange(200) % 512, block_size=64)
    >>> result["tokens"], 400 < result["perplexity"] < 700  # about uniform over 512 tokens at init
    (196, True)
  """
  fn = "perplexity"
  ids = np.asarray(token_ids)
  cfg = model.config
  if ids.ndim != 1 or ids.size < 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{fn}: token_ids.shape={ids.shape}, dtype={ids.dtype} but 1-d integer ids with at least 2 "
                     "tokens are expected")
  if ids.min() < 0 or ids.max() >= cfg.vocab_size:
    raise ValueError(f"{fn}: token_ids contain {int(ids.max())} but 0 <= id < vocab_size={cfg.vocab_size}")
  block = window_size(fn, cfg.block_size, ids.size, block_size, past_text=True)
  stride = block if stride is None else stride
  if not 1 <= stride <= block:
    raise ValueError(f"{fn}: stride={stride} but 1 <= stride <= block_size={block} is expected")
  if batch_size is not None:
    batch_size = _checks.check_positive_int(fn, "batch_size", batch_size)
  spans = list(windows(len(ids), block, stride))
  block = min(block, len(ids))  # causal: padding past the text changes no score, only the compiled shape
  batch = batch_size or max(1, min(64, LOGITS_PER_CALL // (block * cfg.vocab_size)))
  batch = min(batch, len(spans))
  graphdef, state = nnx.split(model)
  total, count = 0.0, 0.0
  for start in range(0, len(spans), batch):
    window = np.zeros((batch, block), np.int32)  # one shape for every call: one compilation
    weights = np.zeros((batch, block), np.float32)  # rows past the last window stay unscored
    for row, (begin, end, first) in enumerate(spans[start:start + batch]):
      window[row, : end - begin] = ids[begin:end]
      weights[row, first : end - begin] = 1.0
    nll, n = _window_nll(graphdef, state, jnp.asarray(window), jnp.asarray(weights))
    total, count = total + float(nll), count + float(n)
  mean = total / count
  if not math.isfinite(mean):
    raise ValueError(f"{fn}: the mean negative log-likelihood is {mean} (NaN or infinite) but a finite value is "
                     "expected; the model's parameters hold non-finite values")
  return {"perplexity": math.exp(mean), "nll": mean, "tokens": int(count)}
