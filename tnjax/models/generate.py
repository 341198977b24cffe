"""Batched, KV-cached generation as one compiled program: a prefill of the prompts, then a loop over new tokens
on the device (a ``lax.while_loop`` that ends when every row has met a stop token, or, without stop tokens, a
loop of known trip count), sampling on the device.

The KV cache holds the request (longest prompt + new tokens), not the model's context. Prompts of different
lengths are left-padded: row r's tokens start at slot ``start[r]``, its positions count from there (learned
position embeddings and rotary angles are per row), and no query attends to a padding slot.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DTYPES = ("float32", "bfloat16", "float16")  # what ``generate(..., dtype=)`` and `Decoder.astype` are given


def sample(logits: jax.Array, key, *, temperature: float, top_k: int | None = None,
           top_p: float | None = None) -> jax.Array:
  """One token per row of ``logits`` (batch, vocab): the argmax when ``temperature`` is 0, else a draw from
  ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens and to the smallest set
  whose probability reaches ``top_p`` (nucleus; the most likely token is always kept). Runs under jit.

  Examples:
    >>> logits = jnp.array([[0.0, 3.0, 1.0]])
    >>> sample(logits, None, temperature=0.0).tolist(), sample(logits, jax.random.key(0), temperature=1.0,
    ...                                                         top_p=1e-6).tolist()
    ([1], [1])
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / jnp.float32(temperature)
  floor = jnp.float32(-jnp.inf)
  if top_k is not None and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, floor, logits)
  if top_p is not None and top_p < 1.0:
    ranked = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # the probability of the tokens ranked above each one
    kept = jnp.sum(before < jnp.float32(top_p), axis=-1, keepdims=True)  # >= 1
    threshold = jnp.take_along_axis(ranked, kept - 1, axis=-1)
    logits = jnp.where(logits < threshold, floor, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 9))
def _decode(graphdef, state, prompt, start, key, stops, max_new_tokens, temperature, top_k, top_p, pad_id):
  """(batch, max_new_tokens) new tokens; rows finished by a stop token are filled with ``pad_id``."""
  model = nnx.merge(graphdef, state)
  batch, time = prompt.shape
  pick = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)
  cache = model.init_cache(batch, time + max_new_tokens, start=start)
  logits, cache = model.step(prompt, cache, last_only=True)
  first = pick(logits[:, -1], jax.random.fold_in(key, 0))
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

  def stopped(token):
    return jnp.any(token[:, None] == stops[None, :], axis=-1)

  def running(carry):
    i, _, done, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def next_token(carry):
    i, token, done, cache, out = carry
    logits, cache = model.step(token[:, None], cache, last_only=True)
    token = jnp.where(done, pad_id, pick(logits[:, -1], jax.random.fold_in(key, i)))  # finished rows stay put
    out = jax.lax.dynamic_update_slice(out, token[:, None], (jnp.int32(0), i))
    return i + 1, token, done | stopped(token), cache, out

  carry = (jnp.int32(1), first, stopped(first), cache, out)
  if max_new_tokens == 1:  # the prefill alone (what a time-to-first-token measurement runs)
    return out
  if stops.shape[0] == 0:
    # No row can finish early: a loop of known trip count, which a GPU runs without reading a predicate back
    # to the host every step (a data-dependent while_loop does).
    return jax.lax.fori_loop(1, max_new_tokens, lambda _, c: next_token(c), carry)[-1]
  return jax.lax.while_loop(running, next_token, carry)[-1]


def _rows(fn: str, prompt_ids) -> tuple[list[np.ndarray], bool]:
  """The prompts as 1-d integer rows, and whether the input was one prompt."""
  if isinstance(prompt_ids, (list, tuple)) and any(np.ndim(r) == 1 for r in prompt_ids):  # prompts, maybe ragged
    rows = [np.asarray(r) for r in prompt_ids]
    for i, r in enumerate(rows):
      if r.ndim != 1 or (r.size and not np.issubdtype(r.dtype, np.integer)):
        raise ValueError(f"{fn}: prompt_ids[{i}] has shape {r.shape}, dtype {r.dtype} but a sequence of integer "
                         "ids is expected")
      if r.size == 0:
        raise ValueError(f"{fn}: prompt_ids[{i}] is empty but every prompt needs at least one token")
    return rows, False
  ids = np.asarray(prompt_ids)
  if ids.ndim not in (1, 2) or ids.shape[-1] < 1 or ids.size == 0:
    raise ValueError(f"{fn}: prompt_ids.shape={ids.shape} but (time,) or (batch, time) with time >= 1 is "
                     "expected")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{fn}: prompt_ids.dtype={ids.dtype} but integer ids are expected")
  return list(ids.reshape(-1, ids.shape[-1])), ids.ndim == 1


def _check_ids(fn: str, name: str, ids: np.ndarray, vocab: int) -> None:
  bad = ids[(ids < 0) | (ids >= vocab)]
  if bad.size:
    raise ValueError(f"{fn}: {name} contain {int(bad[0])} but 0 <= id < vocab_size={vocab} is expected")


def generate(model, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, rng=None, stop_tokens=(), pad_id: int = 0, dtype: str | None = None
             ) -> jax.Array:
  """Continues each prompt by up to ``max_new_tokens`` tokens, in one compiled call (see the module docstring).

  Every argument is checked before anything compiles. A new prompt length, batch size, ``max_new_tokens``,
  sampling setting or number of stop tokens compiles anew; the same shapes reuse the program.

  Args:
    model: a model of any family ([`GPT`][tnjax.models.GPT], [`Llama`][tnjax.models.Llama]) and layer kind.
    prompt_ids: integer ids: one prompt (time,), a batch (batch, time), or a list of prompts of any lengths
      (each at least one token), which are left-padded.
    max_new_tokens: tokens to add to each prompt.
    temperature: 0 for greedy decoding, else the softmax temperature for sampling.
    top_k: sample among the k most likely tokens only.
    top_p: sample from the smallest set of tokens whose probability reaches top_p, in (0, 1] (1: all).
    rng: a ``jax.random`` key, required when sampling (the same key gives the same tokens).
    stop_tokens: ids that finish a row: it keeps the stop token, then only ``pad_id``; the loop ends when
      every row has finished.
    pad_id: the id written in left padding and after a row's stop token.
    dtype: None (the model as it is) or one of `DTYPES`: the model's floating parameters are cast to it once
      ([`Decoder.astype`][tnjax.models.decoder.Decoder.astype]) and it computes in it (bfloat16 halves the
      bytes each step reads); the KV cache is kept in the computation dtype.

  Returns:
    (batch, longest prompt + max_new_tokens) ids, each row its left-padded prompt then its new tokens (a
    1-d prompt gives a 1-d result), as Hugging Face's ``generate`` returns a left-padded batch.

  Raises:
    ValueError: for an empty prompt, ids out of range, the longest prompt + new tokens longer than the
      model's block_size, a NaN, infinite or negative temperature, top_k outside [1, vocab], top_p outside
      (0, 1], a missing rng when sampling, or an unknown dtype.

  Examples:
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
    >>> generate(model, [1, 2, 3], 5, temperature=0.0).shape
    (8,)
    >>> generate(model, [[1, 2, 3], [4]], 2, temperature=0.0).shape  # ragged: [4] gets two padding slots
    (2, 5)
  """
  fn = "generate"
  cfg = model.config
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"{fn}: max_new_tokens={max_new_tokens!r} but a positive integer is expected")
  rows, squeeze = _rows(fn, prompt_ids)
  longest = max(r.size for r in rows)
  if longest + max_new_tokens > cfg.block_size:
    raise ValueError(f"{fn}: prompt length {longest} + max_new_tokens {max_new_tokens} = {longest + max_new_tokens}"
                     f" but block_size={cfg.block_size}")
  for r in rows:
    _check_ids(model._name, "ids", r, cfg.vocab_size)
  temperature = float(temperature)
  if not 0 <= temperature < math.inf:
    raise ValueError(f"{fn}: temperature={temperature} but a number >= 0 (finite; 0 is greedy) is expected")
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= cfg.vocab_size):
    raise ValueError(f"{fn}: top_k={top_k!r} but 1 <= top_k <= vocab_size={cfg.vocab_size} is expected")
  if top_p is not None:
    top_p = float(top_p)
    if not 0 < top_p <= 1:
      raise ValueError(f"{fn}: top_p={top_p} but 0 < top_p <= 1 is expected")
  if temperature > 0 and rng is None:
    raise ValueError(f"{fn}: rng=None but sampling (temperature={temperature}) needs a jax.random key")
  stops = np.asarray(list(stop_tokens) if not np.isscalar(stop_tokens) else [stop_tokens])
  if stops.size and not np.issubdtype(stops.dtype, np.integer):
    raise ValueError(f"{fn}: stop_tokens={stop_tokens!r} but integer ids are expected")
  _check_ids(fn, "stop_tokens", stops, cfg.vocab_size)
  if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)) or not 0 <= pad_id < cfg.vocab_size:
    raise ValueError(f"{fn}: pad_id={pad_id!r} but an id in [0, vocab_size={cfg.vocab_size}) is expected")
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(f"{fn}: dtype={dtype!r} but None or one of {DTYPES} is expected")

  model = model if dtype is None else model.astype(dtype)
  prompt = np.full((len(rows), longest), pad_id, np.int32)
  for i, r in enumerate(rows):
    prompt[i, longest - r.size:] = r
  start = np.asarray([longest - r.size for r in rows], np.int32)
  key = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  new = _decode(graphdef, state, jnp.asarray(prompt), jnp.asarray(start), key, jnp.asarray(stops, jnp.int32),
                max_new_tokens, temperature, top_k, None if top_p == 1.0 else top_p, jnp.int32(pad_id))
  out = jnp.concatenate([jnp.asarray(prompt), new], axis=1)
  return out[0] if squeeze else out
