import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import tnjax
from tests.core.reference import tt_full, ttm_full

EAGER_AND_JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def _tt(seed, dims, rank):
  return tnjax.random_tt(jax.random.key(seed), dims, rank, dtype=jnp.float64)


def _ttm(seed, in_dims, out_dims, rank):
  return tnjax.random_ttm(jax.random.key(seed), in_dims, out_dims, rank, dtype=jnp.float64)


@EAGER_AND_JIT
@pytest.mark.parametrize("dims, rank", [((6,), 1), ((3, 4), 2), ((2, 3, 4, 3), (2, 5, 3))])
def test_to_dense_tensor_train(dims, rank, jit):
  tt = _tt(0, dims, rank)
  f = jax.jit(tnjax.to_dense) if jit else tnjax.to_dense
  np.testing.assert_allclose(f(tt), tt_full(tt.cores), rtol=1e-12, atol=1e-12)


@EAGER_AND_JIT
@pytest.mark.parametrize("in_dims, out_dims, rank", [((5,), (3,), 1), ((2, 3), (4, 2), 3), ((2, 3, 2), (3, 2, 2), 4)])
def test_to_dense_tt_matrix(in_dims, out_dims, rank, jit):
  ttm = _ttm(0, in_dims, out_dims, rank)
  f = jax.jit(tnjax.to_dense) if jit else tnjax.to_dense
  np.testing.assert_allclose(f(ttm), ttm_full(ttm.cores), rtol=1e-12, atol=1e-12)


@EAGER_AND_JIT
@pytest.mark.parametrize("batch_shape", [(), (1,), (7,), (2, 3)])
@pytest.mark.parametrize("in_dims, out_dims, rank", [((4,), (3,), 1), ((2, 3, 4), (3, 2, 2), 3),
                                                     ((4, 2, 3, 2), (2, 3, 2, 2), 5)])
def test_matvec_equals_dense_product(rng, batch_shape, in_dims, out_dims, rank, jit):
  ttm = _ttm(1, in_dims, out_dims, rank)
  x = rng.standard_normal(batch_shape + (ttm.shape[0],))
  f = jax.jit(tnjax.matvec) if jit else tnjax.matvec
  y = f(ttm, x)
  assert y.shape == batch_shape + (ttm.shape[1],)
  np.testing.assert_allclose(y, x @ ttm_full(ttm.cores), rtol=1e-10, atol=1e-10)


def test_matvec_path_depends_on_token_count():
  w = tnjax.random_ttm(jax.random.key(0), (8, 8, 12), (12, 16, 16), rank=16)
  one, many = tnjax.matvec_plan(w, 1), tnjax.matvec_plan(w, 16384)
  assert one.opt_cost < one.naive_cost
  dense_flops = 2 * 16384 * 768 * 3072
  assert many.opt_cost <= 2 * dense_flops  # never far above one dense matmul (+ building W)
  assert [c[0] for c in one.contraction_list] != [c[0] for c in many.contraction_list]


def test_matvec_float32_bf16():
  w = tnjax.random_ttm(jax.random.key(0), (4, 4), (4, 4), rank=4)
  x = jax.random.normal(jax.random.key(1), (3, 16), jnp.float32)
  ref = np.asarray(x, np.float64) @ ttm_full(w.cores)
  np.testing.assert_allclose(tnjax.matvec(w, x), ref, rtol=1e-4, atol=1e-5)
  wb = jax.tree_util.tree_map(lambda c: c.astype(jnp.bfloat16), w)
  yb = tnjax.matvec(wb, x.astype(jnp.bfloat16))
  assert yb.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(yb, np.float64), ref, rtol=0.1, atol=0.1)


def test_matvec_errors():
  w = _ttm(0, (4, 4), (2, 2), 2)
  with pytest.raises(ValueError, match=r"matvec: x.shape\[-1\]=15 but prod\(in_dims\)=16 \(in_dims=\(4, 4\)\)"):
    tnjax.matvec(w, jnp.ones((3, 15)))
  with pytest.raises(ValueError, match=r"matvec: x.shape=\(\) but prod\(in_dims\)=16"):
    tnjax.matvec(w, jnp.float64(1.0))
  with pytest.raises(ValueError, match=r"matvec: ttm is a TensorTrain but a TTMatrix is expected"):
    tnjax.matvec(_tt(0, (4, 4), 2), jnp.ones(16))


# First derivatives by default; second derivatives (forward over reverse) in the slow run.
GRAD_ORDERS = [1, pytest.param(2, marks=pytest.mark.slow)]


@pytest.mark.parametrize("order", GRAD_ORDERS)
def test_matvec_and_to_dense_gradients(rng, order):
  w = _ttm(3, (2, 3, 2), (3, 2, 2), 3)
  x = jnp.asarray(rng.standard_normal((4, 12)))
  check_grads(lambda w, x: tnjax.matvec(w, x), (w, x), order=order, modes=("fwd", "rev"))
  check_grads(tnjax.to_dense, (w,), order=order, modes=("fwd", "rev"))
  check_grads(tnjax.to_dense, (_tt(4, (3, 4, 2), 2),), order=1, modes=("rev",))


def test_vmap_over_stacked_cores_equals_loop(rng):
  ws = [_ttm(s, (2, 3), (3, 2), 2) for s in range(4)]
  stacked = jax.tree_util.tree_map(lambda *c: jnp.stack(c), *ws)
  x = jnp.asarray(rng.standard_normal((4, 5, 6)))
  dense = jax.vmap(tnjax.to_dense)(stacked)
  out = jax.vmap(tnjax.matvec)(stacked, x)
  for i, w in enumerate(ws):
    np.testing.assert_allclose(dense[i], ttm_full(w.cores), atol=1e-12)
    np.testing.assert_allclose(out[i], np.asarray(x[i]) @ ttm_full(w.cores), atol=1e-10)


def test_second_jitted_call_does_not_retrace(rng):
  traces = []

  @jax.jit
  def f(w, x):
    traces.append(1)
    return tnjax.matvec(w, x), tnjax.norm(w), tnjax.to_dense(tnjax.add(w, w))

  w1, w2 = _ttm(0, (2, 3), (3, 2), 2), _ttm(1, (2, 3), (3, 2), 2)
  x = jnp.asarray(rng.standard_normal((4, 6)))
  f(w1, x)
  f(w2, 2 * x)
  assert len(traces) == 1


@EAGER_AND_JIT
def test_balance_equalizes_core_norms_and_keeps_the_tensor(jit):
  wrap = jax.jit if jit else (lambda f: f)
  a = _tt(0, (3, 4, 5), (2, 3))
  lopsided = tnjax.TensorTrain((a.cores[0] * 1e6, a.cores[1], a.cores[2] * 1e-3))
  b = wrap(tnjax.balance)(lopsided)
  np.testing.assert_allclose(tt_full(b.cores), tt_full(lopsided.cores), rtol=1e-12)
  norms = [np.linalg.norm(np.asarray(c)) for c in b.cores]
  np.testing.assert_allclose(norms, np.prod([np.linalg.norm(np.asarray(c)) for c in lopsided.cores]) ** (1 / 3),
                             rtol=1e-12)
  m = _ttm(2, (2, 3), (4, 2), 3)
  bm = wrap(tnjax.balance)(tnjax.TTMatrix((m.cores[0] * 1e4, m.cores[1])))
  assert isinstance(bm, tnjax.TTMatrix) and bm.ranks == m.ranks
  np.testing.assert_allclose(ttm_full(bm.cores), 1e4 * ttm_full(m.cores), rtol=1e-10)
  zero = tnjax.TensorTrain((a.cores[0] * 0, a.cores[1], a.cores[2]))
  assert all(np.array_equal(x, y) for x, y in zip(tnjax.balance(zero).cores, zero.cores))  # nothing to balance
  with pytest.raises(ValueError, match="balance: tt is"):
    tnjax.balance(np.ones((2, 2)))


@EAGER_AND_JIT
def test_add_scale_inner_norm_match_dense(jit):
  wrap = jax.jit if jit else (lambda f: f)
  a, b = _tt(0, (3, 4, 5), (2, 3)), _tt(1, (3, 4, 5), (3, 2))
  da, db = tt_full(a.cores), tt_full(b.cores)
  s = wrap(tnjax.add)(a, b)
  assert s.ranks == (1, 5, 5, 1)
  np.testing.assert_allclose(tt_full(s.cores), da + db, atol=1e-12)
  np.testing.assert_allclose(tt_full(wrap(tnjax.scale)(a, -2.5).cores), -2.5 * da, atol=1e-12)
  np.testing.assert_allclose(wrap(tnjax.inner)(a, b), np.sum(da * db), rtol=1e-10)
  np.testing.assert_allclose(wrap(tnjax.norm)(a), np.linalg.norm(da), rtol=1e-10)
  m, n = _ttm(2, (2, 3), (4, 2), 3), _ttm(3, (2, 3), (4, 2), 2)
  np.testing.assert_allclose(ttm_full(wrap(tnjax.add)(m, n).cores), ttm_full(m.cores) + ttm_full(n.cores), atol=1e-12)
  np.testing.assert_allclose(wrap(tnjax.inner)(m, n), np.sum(ttm_full(m.cores) * ttm_full(n.cores)), rtol=1e-10)
  one = _tt(5, (7,), 1)
  np.testing.assert_allclose(tt_full(tnjax.add(one, one).cores), 2 * tt_full(one.cores), atol=1e-12)


@pytest.mark.parametrize("order", GRAD_ORDERS)
def test_inner_gradient(order):
  a, b = _tt(0, (3, 4, 2), 2), _tt(1, (3, 4, 2), 3)
  check_grads(tnjax.inner, (a, b), order=order, modes=("fwd", "rev"))


@pytest.mark.parametrize(
    "fn, args, match",
    [(tnjax.add, lambda: (_tt(0, (3, 4), 2), _tt(0, (4, 3), 2)),
      r"add: a has dims=\(3, 4\) but b has dims=\(4, 3\); expected equal mode sizes"),
     (tnjax.inner, lambda: (_ttm(0, (2, 3), (3, 2), 2), _ttm(0, (3, 2), (2, 3), 2)),
      r"inner: a has \(in_dims, out_dims\)=\(\(2, 3\), \(3, 2\)\) but b has"),
     (tnjax.add, lambda: (_tt(0, (6, 6), 2), _ttm(0, (2, 3), (3, 2), 2)),
      r"add: a is a TensorTrain but b is a TTMatrix; expected the same format"),
     (tnjax.scale, lambda: (_tt(0, (3, 4), 2), jnp.ones(2)), r"scale: alpha.shape=\(2,\) but a scalar"),
     (tnjax.norm, lambda: (np.ones(3),), r"norm: tt is a ndarray but a TensorTrain or TTMatrix"),
     (tnjax.to_dense, lambda: (np.ones(3),), r"to_dense: tt is a ndarray but a TensorTrain or TTMatrix")],
)
def test_algebra_errors(fn, args, match):
  with pytest.raises(ValueError, match=match):
    fn(*args())


@settings(max_examples=4, deadline=None)
@given(in_dims=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 1000),
       rank=st.integers(1, 4), batch=st.integers(1, 5))
def test_matvec_property(in_dims, seed, rank, batch):
  out_dims = list(reversed(in_dims))
  w = _ttm(seed, in_dims, out_dims, rank)
  x = np.random.default_rng(seed).standard_normal((batch, w.shape[0]))
  np.testing.assert_allclose(tnjax.matvec(w, x), x @ ttm_full(w.cores), rtol=1e-9, atol=1e-9)
  back = tnjax.ttm_svd(ttm_full(w.cores), in_dims, out_dims)
  np.testing.assert_allclose(ttm_full(back.cores), ttm_full(w.cores), atol=1e-9)
