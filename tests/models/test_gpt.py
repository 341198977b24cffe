import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.hf_fixtures import hf_logits, make_hf_gpt2
from tnjax.interop import load_hf_gpt2
from tnjax.models import GPT, GPTConfig, generate, preset
from tnjax.nn import LowRankEmbedding, LowRankLinear, TTEmbedding, TTMLinear

pytestmark = pytest.mark.filterwarnings("ignore")


def _ids(shape, vocab=512, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


@pytest.mark.slow  # layer-level full-rank tests (tests/nn) stay in the default run
def test_tensorized_at_full_rank_gives_dense_logits():
  small = dict(vocab_size=128, d_model=64, n_head=2, block_size=32)  # full-rank TT-SVDs stay cheap
  dense = GPT(preset("tiny", **small), rngs=nnx.Rngs(0))
  cfg = preset("tiny", **small, layers={"embedding": {"kind": "ttm", "rank": 4}, "mlp.c_fc": {"kind": "ttm", "rank": 4},
                               "mlp.c_proj": {"kind": "ttm", "rank": 4}, "attn.c_attn": {"kind": "lowrank", "rank": 4},
                               "h.1.attn.c_proj": {"kind": "ttm", "rank": 4}})
  tt = GPT(cfg, rngs=nnx.Rngs(1))
  assert isinstance(tt.wte, TTEmbedding) and isinstance(tt.h[0].mlp.c_fc, TTMLinear)
  assert isinstance(tt.h[1].attn.c_proj, TTMLinear) and isinstance(tt.h[0].attn.c_proj, nnx.Linear)
  # Give the tensorized model the dense model's weights at full rank, through from_dense.
  nnx.update(tt, nnx.state(dense, nnx.Not(nnx.Any(nnx.PathContains("wte"), nnx.PathContains("c_fc"),
                                                   nnx.PathContains("c_proj"), nnx.PathContains("c_attn")))))
  tt.wte = TTEmbedding.from_dense(dense.wte.embedding[...])
  for a, b in zip(tt.h, dense.h):
    for parent_t, parent_d, name in ((a.mlp, b.mlp, "c_fc"), (a.mlp, b.mlp, "c_proj"), (a.attn, b.attn, "c_attn"),
                                     (a.attn, b.attn, "c_proj")):
      src = getattr(parent_d, name)
      cls = type(getattr(parent_t, name))
      if cls is nnx.Linear:
        setattr(parent_t, name, src)
      else:
        setattr(parent_t, name, cls.from_dense(src.kernel[...], src.bias[...]))
  assert isinstance(tt.h[0].attn.c_attn, LowRankLinear)
  ids = _ids((2, 24), vocab=128)
  np.testing.assert_allclose(tt(ids), dense(ids), atol=1e-4)


def test_low_rank_embedding_gpt_forward_and_tied_head():
  dense = GPT(preset("tiny"), rngs=nnx.Rngs(0))
  model = GPT(preset("tiny", layers={"embedding": {"kind": "lowrank", "rank": 8}}), rngs=nnx.Rngs(0))
  assert isinstance(model.wte, LowRankEmbedding) and model.lm_head is None and model.wte.rank == 8
  assert model.num_params == dense.num_params - 512 * 128 + 8 * (512 + 128)
  assert model.embedding_table.shape == (512, 128)
  ids = _ids((2, 12))
  logits = model(ids)
  assert logits.shape == (2, 12, 512) and bool(jnp.isfinite(logits).all())
  np.testing.assert_allclose(nnx.jit(lambda m, i: m(i))(model, ids), logits, atol=1e-5)
  # the tied head reads the factors: the same logits as the dense table's head
  x = model.ln_f(model.h[1](model.h[0](model.embed(ids))[0])[0])
  np.testing.assert_allclose(logits, x @ model.embedding_table.T, atol=1e-5)


@pytest.mark.slow  # default suite time; .ci/run runs it
def test_kv_cached_steps_equal_full_forward():
  model = GPT(preset("tiny", layers={"mlp.c_fc": {"kind": "ttm", "rank": 8}}), rngs=nnx.Rngs(0))
  ids = _ids((2, 12))
  full = model(ids)
  cache = model.init_cache(2)
  logits, cache = model.step(ids[:, :5], cache)
  pieces = [logits]
  step = nnx.jit(lambda m, i, c: m.step(i, c))  # one function: one compilation for every position
  for t in range(5, 12):
    logits, cache = step(model, ids[:, t:t + 1], cache)
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5)


def test_forward_under_jit_and_grad():
  model = GPT(preset("tiny", dropout=0.1), rngs=nnx.Rngs(0))
  ids = _ids((2, 16))

  def loss(m):
    logits = m(ids[:, :-1], deterministic=False)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1))

  value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
  assert np.isfinite(float(value)) and abs(float(value) - np.log(512)) < 0.5
  assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.slow  # HF parity of logits stays in the default run (tests/interop)
def test_greedy_generation_equals_hugging_face(tmp_path):
  hf = make_hf_gpt2(tmp_path, vocab_size=97, n_positions=40)
  model = load_hf_gpt2(tmp_path)
  prompt = np.random.default_rng(3).integers(0, 97, (2, 6))
  import torch

  with torch.no_grad():
    ref = hf.generate(torch.tensor(prompt), max_new_tokens=12, do_sample=False, pad_token_id=0).numpy()
  out = generate(model, prompt, 12, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(out), ref)
  np.testing.assert_allclose(model(jnp.asarray(ref)), hf_logits(hf, ref), atol=1e-4)


@pytest.mark.slow  # tests/models/test_generate.py covers top_k=1 and seeds by default
def test_sampling_is_seeded_and_respects_top_k():
  model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
  a = generate(model, [1, 2, 3], 10, temperature=1.0, top_k=1, rng=jax.random.key(0))
  greedy = generate(model, [1, 2, 3], 10, temperature=0.0)
  np.testing.assert_array_equal(a, greedy)  # top_k=1 is greedy
  b = generate(model, [1, 2, 3], 10, temperature=1.0, rng=jax.random.key(1))
  c = generate(model, [1, 2, 3], 10, temperature=1.0, rng=jax.random.key(1))
  np.testing.assert_array_equal(b, c)
  assert b.shape == (13,)


def test_bad_inputs():
  model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"GPT: ids contain 512 but 0 <= id < vocab_size=512"):
    model(jnp.array([[1, 512]]))
  with pytest.raises(ValueError, match=r"GPT: 129 positions \(ids.shape=\(1, 129\)\) but block_size=128"):
    model(jnp.zeros((1, 129), jnp.int32))
  with pytest.raises(ValueError, match=r"GPT: ids.shape=\(4,\), dtype=int32 but integer ids of shape"):
    model(jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match=r"generate: prompt length 100 \+ max_new_tokens 40 = 140 but block_size=128"):
    generate(model, jnp.zeros(100, jnp.int32), 40)
  with pytest.raises(ValueError, match=r"GPT: ids contain 999 but"):
    generate(model, [1, 999], 4)
  with pytest.raises(ValueError, match=r"generate: rng=None but sampling \(temperature=1.0\) needs"):
    generate(model, [1, 2], 4)
  with pytest.raises(ValueError, match=r"generate: temperature=-1.0 but a number >= 0"):
    generate(model, [1, 2], 4, temperature=-1)
  with pytest.raises(ValueError, match=r"generate: top_k=0 but 1 <= top_k <= vocab_size=512"):
    generate(model, [1, 2], 4, temperature=1.0, top_k=0, rng=jax.random.key(0))
  with pytest.raises(ValueError, match=r"generate: max_new_tokens=0 but a positive integer"):
    generate(model, [1, 2], 0)


@pytest.mark.slow  # default suite time
def test_vocab_padding_is_invisible_outside_the_loss():
  cfg = preset("tiny", vocab_size=300, n_layer=1, block_size=16)
  exact = GPT(cfg.replace(vocab_multiple=1), rngs=nnx.Rngs(0))
  padded = GPT(cfg, rngs=nnx.Rngs(0))
  assert cfg.padded_vocab == 384 and padded.wte.embedding.shape == (384, 128)
  assert padded.num_params == exact.num_params and padded.embedding_table.shape == (300, 128)
  # the same weights on the vocabulary's rows give the same logits, loss and gradients
  padded.wte.embedding[...] = jnp.zeros((384, 128), jnp.float32).at[:300].set(exact.wte.embedding[...])
  nnx.update(padded, nnx.state(exact, nnx.Not(nnx.PathContains("wte"))))
  ids = _ids((2, 16), vocab=300)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(padded, ids), nnx.jit(lambda m, x: m(x))(exact, ids),
                             atol=1e-6)
  full = nnx.jit(lambda m, x: m(x, padded_logits=True))(padded, ids)
  assert full.shape == (2, 16, 384) and bool(jnp.all(jnp.isneginf(full[..., 300:])))

  def loss(model):
    logp = jax.nn.log_softmax(model(ids[:, :-1], padded_logits=True), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

  (l_pad, g_pad), (l_exact, g_exact) = (nnx.jit(nnx.value_and_grad(loss))(m) for m in (padded, exact))
  np.testing.assert_allclose(l_pad, l_exact, rtol=1e-6)
  np.testing.assert_allclose(g_pad.wte.embedding[...][:300], g_exact.wte.embedding[...], atol=1e-7)
  assert not bool(jnp.any(g_pad.wte.embedding[...][300:]))
  cache = padded.init_cache(1)
  assert padded.step(ids[:1, :3], cache)[0].shape == (1, 3, 300)
  # a config written before the field existed means no padding; tensorized embeddings are never padded
  assert GPTConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "vocab_multiple"}).padded_vocab == 300
  assert cfg.replace(layers={"embedding": {"kind": "ttm", "rank": 4}}).padded_vocab == 300


def test_flops_per_token_by_hand():
  def flops(layers, rows=64):
    return nnx.eval_shape(lambda: GPT(preset("tiny", layers=layers), rngs=nnx.Rngs(0))).flops_per_token(rows)

  # tiny: d 128, ff 512, 2 layers, 4 heads, block 128, vocab 512
  projections = 2 * (128 * 384 + 128 * 128 + 128 * 512 + 512 * 128)
  attention = 2 * 128 * 4 * (32 + 32)
  assert flops({}) == 2 * (projections + attention) + 2 * 128 * 512
  # BTT 128 -> 512 at rank 4: dims (16, 8) -> (16, 32), 2 r (m n1 + n m2) per token
  assert flops({}) - flops({"mlp.c_fc": {"kind": "btt", "rank": 4}}) == 2 * (2 * 128 * 512 - 8 * (128 * 16 + 512 * 8))
  assert flops({}) - flops({"attn.c_proj": {"kind": "lowrank", "rank": 8}}) == 2 * (2 * 128 * 128 - 2 * 8 * 256)
  # a tied low-rank embedding's head is (x @ v.T) @ u.T: 2 r (d + vocab) per token instead of 2 d vocab
  assert flops({}) - flops({"embedding": {"kind": "lowrank", "rank": 8}}) == 2 * 128 * 512 - 2 * 8 * (128 + 512)
  # a TT-matrix that rebuilds W costs the matmul plus the rebuild spread over the rows
  ttm = {"mlp.c_proj": {"kind": "ttm", "rank": 4, "path": "dense"}}
  assert flops(ttm, rows=64) > flops(ttm, rows=4096) > flops({})
