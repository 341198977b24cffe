import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tnjax.nn import Int8Linear, LowRankLinear, MPSEmbedding, TTMLinear, dequantize, quantize

F64 = jnp.float64


def dense_rows(cores):
  """float64 NumPy reference: each row's TT contracted on its own."""
  rows = []
  for i in range(cores[0].shape[0]):
    out = np.ones((1, 1))
    for c in cores:
      out = np.einsum("ar,rbs->abs", out, np.asarray(c[i])).reshape(-1, c.shape[-1])
    rows.append(out[:, 0])
  return np.stack(rows)


@pytest.mark.slow  # default suite time
def test_mps_embedding_exact_truncated_and_tolerance(rng):
  table = rng.normal(size=(20, 24))
  exact = MPSEmbedding.from_dense(table, feature_dims=(2, 3, 4), param_dtype=F64)
  np.testing.assert_allclose(exact.embedding, table, atol=1e-10)
  np.testing.assert_allclose(dense_rows([c[...] for c in exact.cores]), table, atol=1e-10)
  ids = jnp.array([[3, 0], [19, 7]])
  np.testing.assert_allclose(exact(ids), table[np.asarray(ids)], atol=1e-10)
  np.testing.assert_allclose(jax.jit(lambda e, i: e(i))(exact, ids), table[np.asarray(ids)], atol=1e-10)
  # Rank caps: each row is the TT-SVD of that row alone.
  from tnjax import to_dense, tt_svd

  capped = MPSEmbedding.from_dense(table, rank=2, feature_dims=(2, 3, 4), param_dtype=F64)
  for i in (0, 11):
    np.testing.assert_allclose(capped.embedding[i], to_dense(tt_svd(table[i].reshape(2, 3, 4), max_rank=2)).ravel(),
                               atol=1e-10)
  errors = [float(jnp.linalg.norm(
      MPSEmbedding.from_dense(table, rank=r, feature_dims=(2, 3, 4), param_dtype=F64).embedding - table))
      for r in (1, 2, 4)]
  assert errors[0] > errors[1] > errors[2]
  # Rows of TT rank 1 plus noise: a tolerance above the noise keeps rank 1 in every row.
  smooth = np.stack([np.kron(np.kron(rng.normal(size=2), rng.normal(size=3)), rng.normal(size=4)) for _ in range(20)])
  noisy = smooth + 0.01 * rng.normal(size=smooth.shape) * np.abs(smooth).mean()
  tol = MPSEmbedding.from_dense(noisy, rtol=0.1, feature_dims=(2, 3, 4), param_dtype=F64)
  rel = np.linalg.norm(tol.embedding - noisy, axis=1) / np.linalg.norm(noisy, axis=1)
  assert rel.max() <= 0.1 + 1e-12 and tol.ranks == (1, 1, 1, 1)
  # The tied head: x @ E.T.
  x = rng.normal(size=(5, 24))
  np.testing.assert_allclose(exact.attend(jnp.asarray(x)), x @ table.T, atol=1e-9)


@pytest.mark.slow  # default suite time
def test_mps_embedding_vmap_grad_and_init(rng):
  emb = MPSEmbedding(50, 12, rank=3, feature_dims=(2, 2, 3), std=0.5, param_dtype=F64, rngs=nnx.Rngs(0))
  assert [c.shape for c in emb.cores] == [(50, 1, 2, 2), (50, 2, 2, 3), (50, 3, 3, 1)]
  big = MPSEmbedding(2000, 12, rank=3, feature_dims=(2, 2, 3), std=0.5, rngs=nnx.Rngs(1))
  assert float(jnp.std(big.embedding)) == pytest.approx(0.5, rel=0.1)
  ids = jnp.arange(6).reshape(3, 2)
  np.testing.assert_allclose(jax.vmap(emb)(ids), emb(ids), atol=1e-12)
  graphdef, params = nnx.split(emb, nnx.Param)
  grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(ids) ** 2))(params)
  g0 = jax.tree_util.tree_leaves(grads)[0]
  assert bool(jnp.any(g0[:6] != 0)) and not bool(jnp.any(g0[6:] != 0))  # only looked-up rows get gradients


def test_mps_embedding_errors():
  with pytest.raises(ValueError, match=r"MPSEmbedding: ids contain 10 but 0 <= id < num_embeddings=10"):
    MPSEmbedding(10, 8, rank=2, rngs=nnx.Rngs(0))(jnp.array([10]))
  with pytest.raises(ValueError, match=r"MPSEmbedding: cores have shapes"):
    MPSEmbedding(10, 8, cores=[jnp.ones((9, 1, 2, 1)), jnp.ones((9, 1, 4, 1))])
  with pytest.raises(ValueError, match=r"MPSEmbedding.from_dense: prod\(feature_dims\)=6 but table.shape\[1\]=8"):
    MPSEmbedding.from_dense(jnp.ones((3, 8)), feature_dims=(2, 3))
  with pytest.raises(ValueError, match=r"MPSEmbedding: rank=None but a random init needs rank"):
    MPSEmbedding(10, 8, rngs=nnx.Rngs(0))


def test_quantize_round_trip_bound(rng):
  for shape in [(7, 5), (2, 3, 4, 3)]:
    w = rng.normal(size=shape)
    q, scale = quantize(w)
    assert q.dtype == jnp.int8 and scale.shape == (1,) * (len(shape) // 2) + shape[len(shape) // 2:]
    err = np.abs(np.asarray(dequantize(q, scale)) - w)
    assert np.all(err <= np.asarray(scale) / 2 * (1 + 1e-6))
    assert np.all(np.max(np.abs(np.asarray(q)), axis=tuple(range(len(shape) // 2))) == 127)
  q, scale = quantize(np.zeros((3, 2)))
  assert np.all(np.asarray(q) == 0) and np.all(np.asarray(scale) == 1)


@pytest.mark.slow  # default suite time; .ci/run runs it
def test_int8_layers_match_their_dequantized_float_layers(rng):
  xn = rng.normal(size=(3, 4, 16))
  x = jnp.asarray(xn)
  w, b = rng.normal(size=(16, 12)), rng.normal(size=(12,))
  layer = Int8Linear(16, 12, kernel=w, bias=b)
  assert layer.q.dtype == jnp.int8
  np.testing.assert_allclose(layer(x), xn @ np.asarray(layer.kernel, np.float64) + b, atol=1e-5)
  assert np.max(np.abs(np.asarray(layer.kernel) - w)) <= np.max(np.abs(w)) / 254 * (1 + 1e-6)
  tt = TTMLinear.from_dense(w, b, rank=4, in_dims=(4, 4), out_dims=(3, 4))
  tt8 = TTMLinear(16, 12, ttm=tt.ttm, quant="int8")
  tt8.bias[...] = tt.bias[...]
  assert all(c.dtype == jnp.int8 for c in tt8.cores)
  np.testing.assert_allclose(tt8(x.astype(jnp.float32)), xn @ np.asarray(tt8.kernel, np.float64) + b, atol=1e-5)
  assert float(jnp.linalg.norm(tt8.kernel - tt.kernel) / jnp.linalg.norm(tt.kernel)) < 0.02
  lr = LowRankLinear.from_dense(w, b, rank=5)
  lr8 = LowRankLinear(16, 12, u=lr.u[...], v=lr.v[...], quant="int8", use_bias=False)
  np.testing.assert_allclose(lr8(x.astype(jnp.float32)), xn @ np.asarray(lr8.kernel, np.float64), atol=1e-5)
  assert lr8.num_params == 5 * (16 + 12) + 5 + 12
  with pytest.raises(ValueError, match=r"TTMLinear: quant='int4' but one of \(None, 'int8'\)"):
    TTMLinear(16, 12, rank=2, quant="int4", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"Int8Linear: kernel.shape=\(16, 12\) but \(in_features, out_features\)"):
    Int8Linear(12, 16, kernel=w)
