"""A tiny GPT, briefly trained on a synthetic token stream with structure, shared by the compression tests."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tnjax.compress import heal
from tnjax.models import GPT, preset


def markov_tokens(n: int, vocab: int = 128, seed: int = 0) -> np.ndarray:
  """A sparse random Markov chain: each token has 4 likely successors, so there is something to learn."""
  rng = np.random.default_rng(seed)
  succ = rng.integers(0, vocab, (vocab, 4))
  out = np.empty(n, np.int64)
  out[0] = 0
  choices = rng.integers(0, 4, n)
  noise = rng.random(n) < 0.1
  rand = rng.integers(0, vocab, n)
  for i in range(1, n):
    out[i] = rand[i] if noise[i] else succ[out[i - 1], choices[i]]
  return out


@pytest.fixture(scope="session")
def tokens():
  return markov_tokens(20000)


@pytest.fixture(scope="session")
def trained(tokens):
  """2 blocks, d_model 64, vocab 128, 60 AdamW steps: perplexity well below uniform."""
  cfg = preset("tiny", vocab_size=128, block_size=64, d_model=64, n_head=4)
  model = GPT(cfg, rngs=nnx.Rngs(0))
  return heal(model, tokens[:16000], 60, lr=3e-3, batch_size=16, warmup=5)


@pytest.fixture(scope="session")
def ids(tokens):
  return tokens[16000:16256].reshape(4, 64)


def rel_err(model, ref_logits, ids):
  return float(jnp.linalg.norm(model(ids) - ref_logits) / jnp.linalg.norm(ref_logits))


def check_error_falls(model, ids, method, ranks):
  """The relative logit error of ``method(model, ids, r)`` falls strictly as r grows, and ends below 0.5."""
  ref = model(ids)
  errors = [rel_err(method(model, ids, r), ref, ids) for r in ranks]
  assert all(a > b for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < 0.5
