"""What the families share (`tnjax.models.decoder`): one causal attention with its KV cache."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tnjax.models import build, preset
from tnjax.models.decoder import CausalAttention

# GPT-2 (one key/value head per query head, no rotary), and Llama with every grouping of its 4 query heads. Ragged
# generation against transformers (tests/models/test_generate.py) covers GPT-2 and 2 key/value heads by default.
GROUPINGS = [pytest.param("tiny", {}, id="gpt2", marks=pytest.mark.slow),
             pytest.param("llama-tiny", {"n_kv_head": 4}, id="llama-mha"),
             pytest.param("llama-tiny", {"n_kv_head": 2}, id="llama-gqa", marks=pytest.mark.slow),
             pytest.param("llama-tiny", {"n_kv_head": 1}, id="llama-mqa")]


@pytest.mark.parametrize("name, overrides", GROUPINGS)
def test_cached_steps_of_a_left_padded_batch_equal_the_full_forward(name, overrides):
  """Row 1 starts at slot 3 (the slots before are padding it never sees): its positions count from there."""
  model = build(preset(name, n_layer=1, **overrides), rngs=nnx.Rngs(0))
  attn = model.h[0].attn
  assert isinstance(attn, CausalAttention) and attn.n_kv == model.config.kv_heads
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 8)), jnp.int32)
  step = nnx.jit(lambda m, i, c: m.step(i, c))
  logits, cache = step(model, ids[:, :5], model.init_cache(2, 8, start=[0, 3]))
  assert cache[0].keys.shape == (2, 8, model.config.kv_heads, model.config.head_dim)
  pieces = [logits]
  for t in range(5, 8):
    logits, cache = step(model, ids[:, t:t + 1], cache)
    pieces.append(logits)
  got = jnp.concatenate(pieces, axis=1)
  # Row 1 unpadded, zeros after it: a causal model's earlier logits do not see them.
  full = nnx.jit(lambda m, x: m(x))(model, ids.at[1].set(jnp.roll(ids[1], -3).at[5:].set(0)))
  np.testing.assert_allclose(got[0], full[0], atol=1e-5)
  np.testing.assert_allclose(got[1, 3:], full[1, :5], atol=1e-5)
