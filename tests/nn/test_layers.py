import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import tnjax
from tnjax.nn import LowRankLinear, TTEmbedding, TTMLinear, TTParam

F32 = jnp.float32


def _x(shape, seed=1):
  return jax.random.normal(jax.random.key(seed), shape, F32)


def _count(module):
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("path", ["dense", "direct", "split", "auto"])
@pytest.mark.parametrize("in_f, out_f", [(24, 36), (50, 30), (7, 5)])
def test_ttm_linear_full_rank_reproduces_nnx_linear(in_f, out_f, path):
  ref = nnx.Linear(in_f, out_f, rngs=nnx.Rngs(0), bias_init=nnx.initializers.normal(1.0))
  layer = TTMLinear.from_dense(ref.kernel[...], ref.bias[...], path=path)
  x = _x((4, in_f))
  np.testing.assert_allclose(layer(x), ref(x), atol=1e-5)
  np.testing.assert_allclose(layer.kernel, ref.kernel[...], atol=1e-5)
  assert layer.kernel.shape == (in_f, out_f)


def test_ttm_linear_paths_agree_in_outputs_and_gradients():
  layer = TTMLinear(48, 60, rank=4, in_dims=(4, 3, 4), out_dims=(3, 4, 5), rngs=nnx.Rngs(0))
  x = _x((3, 5, 48))

  def loss(model, x):
    return jnp.sum(jnp.sin(model(x)))

  results = {}
  for path in ("dense", "direct", "split"):
    layer.path = path
    results[path] = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(layer, x)
  va, (ga, gxa) = results["dense"]
  for other in ("direct", "split"):
    vb, (gb, gxb) = results[other]
    np.testing.assert_allclose(va, vb, rtol=1e-5)
    np.testing.assert_allclose(gxa, gxb, rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_ttm_linear_vmap_matches_batch():
  layer = TTMLinear(12, 8, rank=2, rngs=nnx.Rngs(0))
  x = _x((6, 12))
  np.testing.assert_allclose(jax.vmap(layer)(x), layer(x), atol=1e-6)


def test_gpt2_sized_parameter_counts_by_eval_shape():
  mlp = nnx.eval_shape(lambda: TTMLinear(768, 3072, rank=64, rngs=nnx.Rngs(0)))
  # cores (1,8,12,64), (64,8,16,64), (64,12,16,1) plus bias
  assert _count(mlp) == 6144 + 524288 + 12288 + 3072 == mlp.num_params
  emb = nnx.eval_shape(lambda: TTEmbedding(50257, 768, rank=64, rngs=nnx.Rngs(0)))
  assert emb.vocab_dims == (27, 38, 49) and emb.feature_dims == (8, 8, 12)
  assert _count(emb) == 27 * 8 * 64 + 64 * 38 * 8 * 64 + 64 * 49 * 12 == emb.num_params
  low = nnx.eval_shape(lambda: LowRankLinear(768, 3072, rank=64, rngs=nnx.Rngs(0)))
  assert _count(low) == 64 * (768 + 3072) + 3072 == low.num_params


@pytest.mark.parametrize("make, std", [
    (lambda std: TTMLinear(768, 3072, rank=16, kernel_std=std, rngs=nnx.Rngs(0)), None),
    (lambda std: TTMLinear(768, 3072, rank=64, kernel_std=std, rngs=nnx.Rngs(1)), 0.02),
    (lambda std: TTMLinear(1000, 300, rank=8, num_cores=2, kernel_std=std, rngs=nnx.Rngs(2)), None),
    (lambda std: LowRankLinear(768, 3072, rank=32, kernel_std=std, rngs=nnx.Rngs(0)), None),
])
def test_init_std_of_dense_kernel(make, std):
  layer = make(std)
  target = std if std is not None else 1 / math.sqrt(layer.in_features)
  assert abs(float(jnp.std(layer.kernel)) / target - 1) < 0.1


def test_embedding_init_std_matches_nnx_embed():
  emb = TTEmbedding(4096, 256, rank=16, rngs=nnx.Rngs(0))
  ref = nnx.Embed(4096, 256, rngs=nnx.Rngs(0))
  assert abs(float(jnp.std(emb.embedding)) / float(jnp.std(ref.embedding[...])) - 1) < 0.1
  gpt2 = TTEmbedding(4096, 256, rank=16, std=0.02, rngs=nnx.Rngs(0))
  assert abs(float(jnp.std(gpt2.embedding)) / 0.02 - 1) < 0.1


@pytest.mark.parametrize("vocab, features", [(60, 24), (101, 10)])
def test_tt_embedding_full_rank_reproduces_nnx_embed(vocab, features):
  ref = nnx.Embed(vocab, features, rngs=nnx.Rngs(0))
  emb = TTEmbedding.from_dense(ref.embedding[...])
  ids = jax.random.randint(jax.random.key(2), (3, 9), 0, vocab)
  np.testing.assert_allclose(emb(ids), ref(ids), atol=1e-5)
  x = _x((3, features))
  for path in ("dense", "direct"):
    emb.path = path
    np.testing.assert_allclose(emb.attend(x), ref.attend(x), atol=1e-5)
  np.testing.assert_allclose(nnx.jit(lambda m, i: m(i))(emb, ids), ref(ids), atol=1e-5)


def test_tt_embedding_vocab_50257_padding_rows_never_returned():
  emb = TTEmbedding(50257, 64, rank=8, rngs=nnx.Rngs(0))
  assert math.prod(emb.vocab_dims) > 50257
  out = emb(jnp.array([0, 50256]))
  assert out.shape == (2, 64) and bool(jnp.isfinite(out).all())
  assert emb.attend(_x((2, 64))).shape == (2, 50257)
  with pytest.raises(ValueError, match=r"TTEmbedding: ids contain 50257 but 0 <= id < num_embeddings=50257"):
    emb(jnp.array([1, 50257]))
  jitted = nnx.jit(lambda m, i: m(i))(emb, jnp.array([5, 50257, -1]))
  assert bool(jnp.isfinite(jitted[0]).all()) and bool(jnp.isnan(jitted[1:]).all())


def test_tt_embedding_forward_never_builds_table():
  emb = TTEmbedding(50257, 768, rank=32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(emb)
  jaxpr = jax.make_jaxpr(lambda s, i: nnx.merge(graphdef, s)(i))(state, jnp.zeros((8, 128), jnp.int32))
  largest = max(math.prod(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars)
  assert largest < 50257 * 768 / 10


def test_low_rank_from_dense():
  ref = nnx.Linear(40, 30, rngs=nnx.Rngs(0))
  full = LowRankLinear.from_dense(ref.kernel[...], ref.bias[...])
  x = _x((5, 40))
  np.testing.assert_allclose(full(x), ref(x), atol=1e-5)
  kernel = np.asarray(ref.kernel[...], np.float64)
  s = np.linalg.svd(kernel, compute_uv=False)
  for r in (1, 5, 12):
    low = LowRankLinear.from_dense(ref.kernel[...], rank=r)
    assert low.rank == r
    err = np.linalg.norm(np.asarray(low.kernel, np.float64) - kernel)
    np.testing.assert_allclose(err, np.sqrt(np.sum(s[r:] ** 2)), rtol=1e-4)  # Eckart-Young
  tol = LowRankLinear.from_dense(ref.kernel[...], rtol=0.5)
  assert np.linalg.norm(np.asarray(tol.kernel) - kernel) <= 0.5 * np.linalg.norm(kernel) * (1 + 1e-5)


def test_tt_param_filter_and_training_step():
  model = TTMLinear(16, 16, rank=4, rngs=nnx.Rngs(0))
  cores = nnx.state(model, TTParam)
  assert len(jax.tree_util.tree_leaves(cores)) == 3
  target = jax.random.normal(jax.random.key(5), (16, 16), F32) * 0.3
  x = _x((64, 16))
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - x @ target) ** 2))(model)
    opt.update(model, grads)
    return loss

  with jax.numpy_dtype_promotion("standard"):  # optax mixes its int step count with floats
    losses = [float(step(model, opt)) for _ in range(50)]
  assert losses[-1] < 0.5 * losses[0]


def test_bfloat16_compute():
  layer = TTMLinear(32, 32, rank=4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  y = layer(_x((2, 32)))
  assert y.dtype == jnp.bfloat16 and layer.cores[0][...].dtype == F32


@pytest.mark.parametrize("make, match", [
    (lambda: TTMLinear(16, 16, rngs=nnx.Rngs(0)),
     r"TTMLinear: rank=None but a random init needs rank \(or pass ttm= instead\)"),
    (lambda: TTEmbedding(16, 16, rank=2), r"TTEmbedding: rngs=None but a random init needs rngs"),
    (lambda: TTMLinear(16, 16, rank=2, path="fast", rngs=nnx.Rngs(0)),
     r"TTMLinear: path='fast' but one of \('auto', 'dense', 'direct', 'split', 'fused', 'fused_fwd'\)"),
    (lambda: TTMLinear(16, 16, rank=2, in_dims=(3, 5), rngs=nnx.Rngs(0)),
     r"TTMLinear: prod\(in_dims\)=15 but in_features=16"),
    (lambda: TTMLinear(0, 16, rank=2, rngs=nnx.Rngs(0)), r"TTMLinear: in_features=0 but a positive integer"),
    (lambda: TTMLinear.from_dense(jnp.ones(4)), r"TTMLinear.from_dense: kernel.shape=\(4,\) but a 2-d"),
    (lambda: TTEmbedding(100, 16, rank=2, feature_dims=(2, 2), rngs=nnx.Rngs(0)),
     r"TTEmbedding: prod\(feature_dims\)=4 but features=16"),
    (lambda: LowRankLinear(8, 4, rank=5, rngs=nnx.Rngs(0)),
     r"LowRankLinear: rank=5 but min\(in_features, out_features\)=4"),
])
def test_constructor_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_call_errors():
  with pytest.raises(ValueError, match=r"TTMLinear: x.shape\[-1\]=15 but in_features=16"):
    TTMLinear(16, 8, rank=2, rngs=nnx.Rngs(0))(jnp.ones((2, 15), F32))
  emb = TTEmbedding(100, 16, rank=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"TTEmbedding: ids.dtype=float32 but an integer dtype"):
    emb(jnp.ones(3, F32))
  with pytest.raises(ValueError, match=r"TTEmbedding.attend: x.shape\[-1\]=8 but features=16"):
    emb.attend(jnp.ones((2, 8), F32))
  with pytest.raises(ValueError, match=r"LowRankLinear: x.shape\[-1\]=3 but in_features=4"):
    LowRankLinear(4, 4, rank=2, rngs=nnx.Rngs(0))(jnp.ones((1, 3), F32))


def test_wraps_existing_cores():
  with pytest.raises(ValueError, match=r"TTMLinear: ttm.shape=\(16, 6\) but it must cover \(in_features, out_"):
    TTMLinear(16, 7, ttm=tnjax.random_ttm(jax.random.key(0), (4, 4), (2, 3), rank=3))
  ttm = tnjax.random_ttm(jax.random.key(0), (4, 4), (2, 3), rank=3)
  layer = TTMLinear(16, 6, ttm=ttm, use_bias=False)
  x = _x((2, 16))
  np.testing.assert_allclose(layer(x), x @ tnjax.to_dense(ttm), atol=1e-5)
