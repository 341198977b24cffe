"""Jitted, KV-cached autoregressive generation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def _pick(logits: jax.Array, key, temperature: float, top_k: int | None) -> jax.Array:
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate(graphdef, state, prompt, key, max_new_tokens, temperature, top_k):
  model = nnx.merge(graphdef, state)
  batch, t0 = prompt.shape
  cache = model.init_cache(batch)
  logits, cache = model.step(prompt, cache, 0)
  keys = jax.random.split(key, max_new_tokens)
  first = _pick(logits[:, -1], keys[0], temperature, top_k)

  def body(carry, inputs):
    token, cache = carry
    i, k = inputs
    logits, cache = model.step(token[:, None], cache, t0 + i)
    nxt = _pick(logits[:, -1], k, temperature, top_k)
    return (nxt, cache), nxt

  _, rest = jax.lax.scan(body, (first, cache), (jnp.arange(max_new_tokens - 1), keys[1:]))
  return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)


def generate(model, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             rng=None) -> jax.Array:
  """Extends ``prompt_ids`` by ``max_new_tokens`` tokens with a KV cache, in one jitted call.

  Args:
    model: a model of any family ([`GPT`][tnjax.models.GPT], [`Llama`][tnjax.models.Llama]).
    prompt_ids: integer ids, shape (time,) or (batch, time); all rows the same length.
    max_new_tokens: tokens to add (static; a new value recompiles).
    temperature: 0 for greedy decoding, else softmax temperature for sampling.
    top_k: sample among the k most likely tokens only.
    rng: a ``jax.random`` key, required when sampling.

  Returns:
    (batch, time + max_new_tokens) ids (a 1-d prompt gives a 1-d result).

  Raises:
    ValueError: for ids out of range, prompt + new tokens longer than
      block_size, a negative temperature, top_k outside [1, vocab], or a
      missing rng when sampling.

  Examples:
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
    >>> generate(model, [1, 2, 3], 5, temperature=0.0).shape
    (8,)
  """
  fn = "generate"
  ids = jnp.asarray(prompt_ids)
  squeeze = ids.ndim == 1
  ids = ids[None] if squeeze else ids
  cfg = model.config
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"{fn}: max_new_tokens={max_new_tokens!r} but a positive integer is expected")
  if ids.ndim != 2 or ids.shape[1] < 1:
    raise ValueError(f"{fn}: prompt_ids.shape={jnp.shape(prompt_ids)} but (time,) or (batch, time) with time >= 1 "
                     "is expected")
  if ids.shape[1] + max_new_tokens > cfg.block_size:
    raise ValueError(f"{fn}: prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} = "
                     f"{ids.shape[1] + max_new_tokens} but block_size={cfg.block_size}")
  model._check_ids(ids)
  temperature = float(temperature)
  if temperature < 0:
    raise ValueError(f"{fn}: temperature={temperature} but a number >= 0 is expected (0 is greedy)")
  if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
    raise ValueError(f"{fn}: top_k={top_k} but 1 <= top_k <= vocab_size={cfg.vocab_size} is expected")
  if temperature > 0 and rng is None:
    raise ValueError(f"{fn}: rng=None but sampling (temperature={temperature}) needs a jax.random key")
  key = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  out = _generate(graphdef, state, ids.astype(jnp.int32), key, max_new_tokens, temperature, top_k)
  return out[0] if squeeze else out
