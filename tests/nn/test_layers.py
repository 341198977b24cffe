import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import tnjax
from tnjax.nn import LowRankEmbedding, LowRankLinear, TTEmbedding, TTMLinear, TTParam

F32 = jnp.float32
F64 = jnp.float64


def _x(shape, seed=1):
  return jax.random.normal(jax.random.key(seed), shape, F32)


def _count(module):
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("path", ["dense", "direct", "split", "auto"])
@pytest.mark.parametrize("in_f, out_f", [(24, 36), pytest.param(50, 30, marks=pytest.mark.slow), (7, 5)])
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
  low_emb = nnx.eval_shape(lambda: LowRankEmbedding(50257, 768, rank=64, rngs=nnx.Rngs(0)))
  assert _count(low_emb) == 64 * (50257 + 768) == low_emb.num_params and low_emb.rank == 64


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
  low = LowRankEmbedding(4096, 256, rank=16, rngs=nnx.Rngs(0))
  assert abs(float(jnp.std(low.embedding)) / float(jnp.std(ref.embedding[...])) - 1) < 0.1
  low = LowRankEmbedding(4096, 256, rank=16, std=0.02, rngs=nnx.Rngs(0))
  assert abs(float(jnp.std(low.embedding)) / 0.02 - 1) < 0.1


@pytest.mark.parametrize("vocab, features", [pytest.param(60, 24, marks=pytest.mark.slow), (101, 10)])
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


def _low_rank_embedding(rng, vocab=37, features=12, rank=5):
  u, v = rng.normal(size=(vocab, rank)), rng.normal(size=(rank, features))
  return LowRankEmbedding(vocab, features, u=u, v=v, param_dtype=F64), u, v


def test_low_rank_embedding_lookup_and_attend_match_numpy(rng):
  emb, u, v = _low_rank_embedding(rng)
  table = u @ v  # float64 NumPy reference
  ids = rng.integers(0, 37, (3, 5))
  x = rng.normal(size=(2, 4, 12))
  np.testing.assert_allclose(emb.embedding, table, rtol=1e-12, atol=1e-12)
  for call, attend in ((lambda m, i: m(i), lambda m, x: m.attend(x)),
                       (nnx.jit(lambda m, i: m(i)), nnx.jit(lambda m, x: m.attend(x)))):
    out = call(emb, jnp.asarray(ids))
    assert out.shape == (3, 5, 12) and out.dtype == F64
    np.testing.assert_allclose(out, table[ids], rtol=1e-12, atol=1e-12)
    logits = attend(emb, jnp.asarray(x))
    assert logits.shape == (2, 4, 37)
    np.testing.assert_allclose(logits, x @ table.T, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(jax.vmap(emb)(jnp.asarray(ids)), table[ids], rtol=1e-12, atol=1e-12)
  # out-of-range ids under jit (no values to check) give NaN rows, as TTEmbedding and nnx.Embed
  rows = nnx.jit(lambda m, i: m(i))(emb, jnp.array([4, 37, -1]))
  assert bool(jnp.isfinite(rows[0]).all()) and bool(jnp.isnan(rows[1:]).all())


def test_low_rank_embedding_gradients_match_numpy(rng):
  emb, u, v = _low_rank_embedding(rng)
  table = u @ v
  ids = rng.integers(0, 20, (4, 3))  # rows 20.. are never looked up
  x = rng.normal(size=(6, 12))

  def loss(model, x):
    return jnp.sum(jnp.sin(model(jnp.asarray(ids)))) + jnp.sum(jnp.cos(model.attend(x)))

  # d loss / d table by hand: the lookup scatters cos(rows), the head adds -sin(logits).T @ x
  logits = x @ table.T
  g_table = -np.sin(logits).T @ x
  np.add.at(g_table, ids, np.cos(table[ids]))
  g_x = -np.sin(logits) @ table
  for grad in (nnx.value_and_grad(loss, argnums=(0, 1)), nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))):
    value, (g_model, gx) = grad(emb, jnp.asarray(x))
    np.testing.assert_allclose(value, np.sum(np.sin(table[ids])) + np.sum(np.cos(logits)), rtol=1e-12)
    np.testing.assert_allclose(g_model.u[...], g_table @ v.T, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(g_model.v[...], u.T @ g_table, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gx, g_x, rtol=1e-10, atol=1e-10)
  g_lookup = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(ids)) ** 2))(emb).u[...]
  assert bool(jnp.any(g_lookup[:20] != 0)) and not bool(jnp.any(g_lookup[20:] != 0))


def test_low_rank_embedding_from_dense(rng):
  table = rng.normal(size=(40, 24))
  s = np.linalg.svd(table, compute_uv=False)
  for rank in (None, 24):  # full rank: exact
    full = LowRankEmbedding.from_dense(table, rank=rank, param_dtype=F64)
    assert full.rank == 24 and (full.num_embeddings, full.features) == (40, 24)
    np.testing.assert_allclose(full.embedding, table, atol=1e-10)
    np.testing.assert_allclose(full(jnp.arange(40)), table, atol=1e-10)
  errors = []
  for rank in (1, 4, 12):
    low = LowRankEmbedding.from_dense(table, rank=rank, param_dtype=F64)
    errors.append(np.linalg.norm(np.asarray(low.embedding) - table))
    np.testing.assert_allclose(errors[-1], np.sqrt(np.sum(s[rank:] ** 2)), rtol=1e-8)  # Eckart-Young
    # balanced scales: column k of u and row k of v both have norm sqrt(s_k)
    np.testing.assert_allclose(jnp.linalg.norm(low.u[...], axis=0), np.sqrt(s[:rank]), rtol=1e-8)
    np.testing.assert_allclose(jnp.linalg.norm(low.v[...], axis=1), np.sqrt(s[:rank]), rtol=1e-8)
  assert errors[0] > errors[1] > errors[2]
  tol = LowRankEmbedding.from_dense(table, rtol=0.5, param_dtype=F64)
  assert tol.rank < 24 and np.linalg.norm(np.asarray(tol.embedding) - table) <= 0.5 * np.linalg.norm(table)


def test_low_rank_embedding_never_builds_table():
  emb = LowRankEmbedding(50257, 768, rank=32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(emb)
  for fn, arg in ((lambda m, i: m(i), jnp.zeros((8, 128), jnp.int32)), (lambda m, x: m.attend(x), _x((4, 768)))):
    jaxpr = jax.make_jaxpr(lambda s, a, fn=fn: fn(nnx.merge(graphdef, s), a))(state, arg)
    largest = max(math.prod(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars)
    assert largest < 50257 * 768 / 10


def test_low_rank_embedding_bfloat16_compute(rng):
  emb = LowRankEmbedding(30, 16, rank=4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert emb(jnp.array([1, 2])).dtype == jnp.bfloat16 and emb.attend(_x((2, 16))).dtype == jnp.bfloat16
  assert emb.u[...].dtype == F32 and emb.embedding.dtype == F32


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
    (lambda: LowRankLinear(4, 4, u=jnp.ones((4, 2))), r"LowRankLinear: u is given but v=None; expected both"),
    (lambda: LowRankEmbedding(10, 8, rank=9, rngs=nnx.Rngs(0)),
     r"LowRankEmbedding: rank=9 but min\(num_embeddings, features\)=8; expected rank <= that"),
    (lambda: LowRankEmbedding(10, 8, rngs=nnx.Rngs(0)),
     r"LowRankEmbedding: rank=None but a random init needs rank \(or pass u= and v= instead\)"),
    (lambda: LowRankEmbedding(10, 8, rank=2), r"LowRankEmbedding: rngs=None but a random init needs rngs"),
    (lambda: LowRankEmbedding(10, 8, rank=0, rngs=nnx.Rngs(0)), r"LowRankEmbedding: rank=0 but a positive integer"),
    (lambda: LowRankEmbedding(0, 8, rank=2, rngs=nnx.Rngs(0)),
     r"LowRankEmbedding: num_embeddings=0 but a positive integer"),
    (lambda: LowRankEmbedding(10, 8, v=jnp.ones((2, 8))), r"LowRankEmbedding: v is given but u=None; expected both"),
    (lambda: LowRankEmbedding(10, 8, u=jnp.ones((10, 2)), v=jnp.ones((3, 8))),
     r"LowRankEmbedding: u.shape=\(10, 2\), v.shape=\(3, 8\) but \(num_embeddings, r\) and \(r, features\) = "
     r"\(10, r\), \(r, 8\) are expected"),
    (lambda: LowRankEmbedding(10, 8, u=jnp.ones(10), v=jnp.ones((1, 8))),
     r"LowRankEmbedding: u.shape=\(10,\), v.shape=\(1, 8\) but \(num_embeddings, r\)"),
    (lambda: LowRankEmbedding.from_dense(jnp.ones(4)),
     r"LowRankEmbedding.from_dense: table.shape=\(4,\) but a 2-d \(vocab, features\) table is expected"),
    (lambda: LowRankLinear.from_dense(jnp.ones(4)),
     r"LowRankLinear.from_dense: kernel.shape=\(4,\) but a 2-d \(in, out\) kernel is expected"),
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
  low = LowRankEmbedding(10, 8, rank=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"LowRankEmbedding: ids.dtype=float32 but an integer dtype"):
    low(jnp.ones(3, F32))
  with pytest.raises(ValueError, match=r"LowRankEmbedding: ids contain 10 but 0 <= id < num_embeddings=10"):
    low(jnp.array([3, 10]))
  with pytest.raises(ValueError, match=r"LowRankEmbedding.attend: x.shape\[-1\]=7 but features=8"):
    low.attend(jnp.ones((2, 7), F32))


def test_wraps_existing_cores():
  with pytest.raises(ValueError, match=r"TTMLinear: ttm.shape=\(16, 6\) but it must cover \(in_features, out_"):
    TTMLinear(16, 7, ttm=tnjax.random_ttm(jax.random.key(0), (4, 4), (2, 3), rank=3))
  ttm = tnjax.random_ttm(jax.random.key(0), (4, 4), (2, 3), rank=3)
  layer = TTMLinear(16, 6, ttm=ttm, use_bias=False)
  x = _x((2, 16))
  np.testing.assert_allclose(layer(x), x @ tnjax.to_dense(ttm), atol=1e-5)
