"""Every compression method on a tiny trained Llama-style model, with the GPT-2 tests' properties: full rank
leaves logits unchanged, error falls as rank grows, nothing grows; MoDeGPT's rotary pairs and grouped V/O."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.compress.conftest import check_error_falls, rel_err
from tests.hf_fixtures import hf_logits
from tnjax.compress import (
  calibrate,
  modegpt_compress,
  mpo_compress,
  quantize_int8,
  svd_compress,
  tensorgpt_embedding,
)
from tnjax.compress.modegpt import _narrow_value_output
from tnjax.interop import load_model, save_hf, save_model
from tnjax.models import Llama, preset


@pytest.fixture(scope="module")
def llama():
  """2 blocks, d_model 64, 4 query and 2 key/value heads, q/k/v biases (Qwen2-style); random weights large
  enough that every block matters (training it first, as the GPT-2 tests do, costs CPU time the suite does not
  have; `heal` on a Llama is covered by the slow CLI training test)."""
  cfg = preset("llama-tiny", vocab_size=128, block_size=64, d_model=64, d_ff=128, attention_bias=True, init_std=0.1)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  for block in model.h:  # random biases and norm scales, so their handling is checked too
    block.attn.q_proj.bias[...] = 0.1 * jnp.ones_like(block.attn.q_proj.bias[...])
    block.attn.v_proj.bias[...] = jnp.linspace(-0.3, 0.3, block.attn.v_proj.bias.shape[0], dtype=jnp.float32)
    block.ln_2.scale[...] = jnp.linspace(0.5, 1.5, 64, dtype=jnp.float32)
  return model


EXACT = [
    ("svd full rank", lambda m, ids: svd_compress(m, rank=256, if_larger="allow")),
    ("svd ratio 1", lambda m, ids: svd_compress(m, ratio=1.0)),
    pytest.param("mpo exact", lambda m, ids: mpo_compress(m, rank=10**6, if_larger="allow"), marks=pytest.mark.slow,
                 id="mpo exact"),
    ("tensorgpt mps exact", lambda m, ids: tensorgpt_embedding(m, rank=10**6, if_larger="allow")),
    ("modegpt ratio 1", lambda m, ids: modegpt_compress(m, ids, ratio=1.0)),
]


@pytest.mark.parametrize("name,method", EXACT, ids=[getattr(e, "id", None) or e[0] for e in EXACT])
def test_full_rank_or_ratio_1_leaves_logits_unchanged(llama, ids, name, method):
  np.testing.assert_allclose(method(llama, ids)(ids), llama(ids), atol=1e-4)


SWEEPS = [
    # error vs rank, whatever the size: growth allowed; random weights: flat spectra
    ("svd", lambda m, ids, r: svd_compress(m, rank=r, if_larger="allow"), [2, 16, 60]),
    pytest.param("mpo", lambda m, ids, r: mpo_compress(m, rank=r, if_larger="allow"), [2, 8, 32],
                 marks=pytest.mark.slow, id="mpo"),
    ("tensorgpt", lambda m, ids, r: tensorgpt_embedding(m, rank=r, if_larger="allow"), [1, 2, 4]),
    ("modegpt", lambda m, ids, r: modegpt_compress(m, ids, ratio=r, allocation="uniform"), [0.3, 0.6, 0.9]),
]


@pytest.mark.parametrize("name,method,ranks", SWEEPS, ids=[getattr(s, "id", None) or s[0] for s in SWEEPS])
def test_error_falls_as_rank_grows(llama, ids, name, method, ranks):
  check_error_falls(llama, ids, method, ranks)


@pytest.mark.slow  # ~8 s; .ci/run runs it
def test_modegpt_keeps_rotary_pairs_and_kv_groups(llama, ids, tmp_path):
  """Narrowed blocks keep whole rotary pairs (same frequencies in q and k), kv heads stay shared, the KV cache
  narrows, the result saves, loads and exports to transformers as the same function."""
  from transformers import Qwen2ForCausalLM

  small = modegpt_compress(llama, calibrate(llama, ids), ratio=0.5, allocation="uniform")
  cfg = small.config
  ff, qk, v = cfg.block_dims(0)
  assert (ff, qk, v) == (64, 8, 8) and len(cfg.rope_pairs(0)) == 4  # head_dim 16: 4 of its 8 rotary pairs
  assert small.h[0].attn.k_proj.kernel.shape == (64, 2 * 8) and small.h[0].attn.q_proj.kernel.shape == (64, 4 * 8)
  assert small.num_params < llama.num_params
  logits, cache = small.step(jnp.asarray(ids[:1]), small.init_cache(1))
  assert cache[0].keys.shape[-2:] == (2, 8)
  np.testing.assert_allclose(logits, small(ids[:1]), atol=1e-5)
  again = load_model(save_model(small, tmp_path / "m"))
  assert again.config == cfg
  np.testing.assert_allclose(again(ids), small(ids), atol=1e-6)
  save_hf(small, tmp_path / "hf")
  hf = Qwen2ForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  np.testing.assert_allclose(hf_logits(hf, ids), small(ids), atol=1e-4)


def test_grouped_value_output_is_exact_at_full_rank(rng):
  """Two query heads read each value head; with a value bias and no output bias (Qwen2) the bias is fitted on
  inputs [X, 1]: at full rank the attention output is unchanged for any attention weights."""
  d, kv, group, vd, n = 12, 2, 2, 3, 200
  x = rng.normal(size=(n, d))
  w_v, b_v, w_o = rng.normal(size=(d, kv * vd)), rng.normal(size=kv * vd), rng.normal(size=(kv * group * vd, d))
  st = {"attn_in": x.T @ x, "attn_sum": x.sum(0), "tokens": float(n)}

  def out(w_v, b_v, w_o):
    values = (x @ w_v + b_v).reshape(n, kv, 1, -1).repeat(group, axis=2).reshape(n, -1)
    return values @ w_o

  (w_v2, b_v2), (w_o2, b_o2) = _narrow_value_output((w_v, b_v), (w_o, None), st, kv, group, vd, ridge=0.0)
  assert b_o2 is None and w_v2.shape == (d, kv * vd)
  np.testing.assert_allclose(out(w_v2, b_v2, w_o2), out(w_v, b_v, w_o), atol=1e-6)


@pytest.mark.slow  # five compressions
def test_int8_and_recompression_never_grow(llama, ids):
  q = quantize_int8(llama)
  assert rel_err(q, llama(ids), ids) < 0.02
  for base in (mpo_compress(llama, rank=4), svd_compress(llama, rank=4)):
    for method in (svd_compress, mpo_compress):
      assert method(base, ratio=0.5).num_params <= base.num_params
