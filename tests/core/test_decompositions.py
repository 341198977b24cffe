import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tnjax
from tests.core.reference import low_rank_tensor, rel_err, tt_full, ttm_full

EAGER_AND_JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def _maybe_jit(f, jit, **static):
  g = lambda x: f(x, **static)
  return jax.jit(g) if jit else g


@EAGER_AND_JIT
@pytest.mark.parametrize("dims", [(7,), (5, 6), (3, 4, 5), (2, 3, 2, 4, 3)])
def test_tt_svd_full_rank_is_exact(rng, dims, jit):
  x = rng.standard_normal(dims)
  tt = _maybe_jit(tnjax.tt_svd, jit)(x)
  assert tt.ranks[0] == tt.ranks[-1] == 1
  np.testing.assert_allclose(tt_full(tt.cores), x, atol=1e-11)


@EAGER_AND_JIT
def test_tt_svd_max_rank_int_and_tuple(rng, jit):
  x = rng.standard_normal((4, 5, 6, 3))
  tt = _maybe_jit(tnjax.tt_svd, jit, max_rank=3)(x)
  assert tt.ranks == (1, 3, 3, 3, 1)
  tt = _maybe_jit(tnjax.tt_svd, jit, max_rank=(2, 100, 1))(x)
  assert tt.ranks == (1, 2, 10, 1, 1)  # 100 is clamped to the bond's useful rank, 2 * 5


def test_tt_svd_recovers_exact_low_rank(rng):
  x = low_rank_tensor(rng, (4, 5, 6, 7), rank=3)
  tt = tnjax.tt_svd(x, rtol=1e-10)
  assert tt.ranks == (1, 3, 3, 3, 1)
  assert rel_err(tt_full(tt.cores), x) < 1e-10


def test_tt_svd_matrix_rank_is_eckart_young_optimal(rng):
  # For d = 2 the rtol rank must be the smallest r with ||s[r:]|| <= rtol ||x||.
  x = rng.standard_normal((30, 40)) @ np.diag(0.8 ** np.arange(40))
  s = np.linalg.svd(x, compute_uv=False)
  for rtol in (0.5, 0.1, 0.01):
    tt = tnjax.tt_svd(x, rtol=rtol)
    tails = np.sqrt(np.cumsum(s[::-1] ** 2)[::-1])
    r_best = int(np.sum(tails > rtol * np.linalg.norm(x)))
    assert tt.ranks == (1, r_best, 1)


@EAGER_AND_JIT
def test_tt_svd_rtol_bound(rng, jit):
  x = low_rank_tensor(rng, (6, 5, 7, 4), rank=4, noise=0.3)
  for rtol in (0.05, 0.2, 0.5):
    tt = _maybe_jit(tnjax.tt_svd, jit, rtol=rtol)(x)
    assert rel_err(tt_full(tt.cores), x) <= rtol * (1 + 1e-9)


def test_tt_svd_rtol_under_jit_is_masked_buffer_equal_to_eager(rng):
  x = low_rank_tensor(rng, (6, 5, 7, 4), rank=3, noise=0.05)
  eager = tnjax.tt_svd(x, rtol=0.1, max_rank=6)
  jitted = jax.jit(lambda x: tnjax.tt_svd(x, rtol=0.1, max_rank=6))(x)
  assert jitted.ranks == (1, 6, 6, 4, 1)  # fixed buffers: min(max_rank, full rank)
  assert eager.ranks == (1, 3, 3, 3, 1)
  np.testing.assert_allclose(tt_full(jitted.cores), tt_full(eager.cores), atol=1e-10)
  assert tnjax.truncate(jitted, rtol=1e-12).ranks == eager.ranks  # padding stripped eagerly


def test_tt_svd_error_falls_as_rank_grows(rng):
  x = rng.standard_normal((4, 6, 5, 6))
  errs = [rel_err(tt_full(tnjax.tt_svd(x, max_rank=r).cores), x) for r in (1, 2, 3, 5, 8, 13, 30)]
  assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:]))
  assert errs[-1] < 1e-10


@EAGER_AND_JIT
@pytest.mark.parametrize("scale", [3e38, 1e-30], ids=["near-max", "tiny"])
def test_tt_svd_of_float32_values_near_the_limits_is_finite_and_exact(rng, jit, scale):
  """Finite values near the float32 maximum overflowed the SVDs' sums of squares: non-finite cores."""
  x = jnp.asarray(rng.uniform(-1, 1, (4, 5, 6)) * scale, jnp.float32)
  tt = _maybe_jit(tnjax.tt_svd, jit)(x)
  assert tt.ranks == (1, 4, 6, 1) and all(bool(jnp.isfinite(c).all()) for c in tt.cores)
  assert rel_err(tt_full([np.asarray(c, np.float64) for c in tt.cores]), np.asarray(x, np.float64)) < 1e-5


def test_tt_svd_rtol_on_large_float32_values_meets_the_bound(rng):
  """The tolerance's norm overflowed to inf: every bond was cut to rank 1, far past the bound."""
  x = jnp.asarray(rng.uniform(-1, 1, (4, 5, 6)) * 3e30, jnp.float32)
  tt = tnjax.tt_svd(x, rtol=0.5)
  assert tt.ranks[1] > 1 and rel_err(tt_full([np.asarray(c, np.float64) for c in tt.cores]), np.asarray(x)) <= 0.5


def test_tt_svd_vmap_equals_loop(rng):
  xs = rng.standard_normal((5, 4, 6, 3))
  batched = jax.vmap(lambda x: tnjax.tt_svd(x, max_rank=2))(xs)
  for i, x in enumerate(xs):
    one = tnjax.tt_svd(x, max_rank=2)
    np.testing.assert_allclose(tt_full([c[i] for c in batched.cores]), tt_full(one.cores), atol=1e-10)


def test_tt_svd_float32_and_int_input(rng):
  x = rng.standard_normal((4, 5, 6)).astype(np.float32)
  tt = tnjax.tt_svd(x)
  assert tt.dtype == jnp.float32
  assert rel_err(tt_full(tt.cores), x) < 1e-5
  assert jnp.issubdtype(tnjax.tt_svd(np.arange(24).reshape(2, 3, 4)).dtype, jnp.floating)


@settings(max_examples=6, deadline=None)
@given(dims=st.lists(st.integers(1, 5), min_size=1, max_size=4),
       max_rank=st.integers(1, 6), rtol=st.sampled_from([None, 0.01, 0.1, 0.3]), seed=st.integers(0, 1000))
def test_tt_svd_properties(dims, max_rank, rtol, seed):
  x = np.random.default_rng(seed).standard_normal(dims)
  tt = tnjax.tt_svd(x, max_rank=max_rank, rtol=rtol)
  assert tt.dims == tuple(dims)
  assert max(tt.ranks) <= max_rank
  full = tnjax.tt_svd(x, max_rank=None, rtol=rtol)
  if rtol is not None and x.any():
    assert rel_err(tt_full(full.cores), x) <= rtol * (1 + 1e-9)
  if rtol is None:
    np.testing.assert_allclose(tt_full(full.cores), x, atol=1e-10)


@pytest.mark.parametrize(
    "args, match",
    [((np.float64(3.0),), r"tt_svd: x.shape=\(\) but a tensor with at least one mode"),
     ((np.ones((2, 3)) * (1 + 1j),), r"tt_svd: x.dtype=complex128 but a real floating dtype"),
     ((np.full((2, 3), np.nan),), r"tt_svd: x has non-finite values"),
     ((np.ones((2, 3, 4)), 0), r"tt_svd: max_rank=0 but a positive integer"),
     ((np.ones((2, 3, 4)), (2,)), r"tt_svd: max_rank has 1 entries but the tensor has 2 bonds"),
     ((np.ones((2, 3, 4)), (2, -1)), r"tt_svd: max_rank\[1\]=-1 but a positive integer"),
     ((np.ones((2, 3, 4)), None, -0.1), r"tt_svd: rtol=-0.1 but a finite number >= 0")],
)
def test_tt_svd_errors(args, match):
  with pytest.raises(ValueError, match=match):
    tnjax.tt_svd(*args)


@EAGER_AND_JIT
@pytest.mark.parametrize("in_dims, out_dims", [((2, 3, 4), (3, 2, 2)), ((4, 4), (2, 8)), ((5,), (3,))])
def test_ttm_svd_full_rank_is_exact(rng, in_dims, out_dims, jit):
  w = rng.standard_normal((int(np.prod(in_dims)), int(np.prod(out_dims))))
  ttm = _maybe_jit(tnjax.ttm_svd, jit, in_dims=in_dims, out_dims=out_dims)(w)
  assert ttm.in_dims == in_dims and ttm.out_dims == out_dims
  np.testing.assert_allclose(ttm_full(ttm.cores), w, atol=1e-11)


def test_ttm_svd_pads_non_square_matrix(rng):
  w = rng.standard_normal((23, 10))  # 23 rows into 4*6 = 24, 10 cols into 3*4 = 12
  ttm = tnjax.ttm_svd(w, (4, 6), (3, 4))
  dense = ttm_full(ttm.cores)
  assert dense.shape == (24, 12)
  np.testing.assert_allclose(dense[:23, :10], w, atol=1e-11)
  np.testing.assert_allclose(dense[23:], 0, atol=1e-11)
  np.testing.assert_allclose(dense[:, 10:], 0, atol=1e-11)


def test_ttm_svd_vocab_sized_padding():
  w = np.random.default_rng(1).standard_normal((50257, 2)).astype(np.float32)
  in_dims = tnjax.factorize(50257, 3)
  ttm = tnjax.ttm_svd(w, in_dims, (1, 1, 2), max_rank=8)
  assert ttm.shape == (int(np.prod(in_dims)), 2) and max(ttm.ranks) <= 8


@EAGER_AND_JIT
def test_ttm_svd_rtol_bound(rng, jit):
  w = rng.standard_normal((48, 36)) @ np.diag(0.9 ** np.arange(36))
  for rtol in (0.05, 0.3):
    ttm = _maybe_jit(tnjax.ttm_svd, jit, in_dims=(4, 3, 4), out_dims=(3, 4, 3), rtol=rtol)(w)
    assert rel_err(ttm_full(ttm.cores), w) <= rtol * (1 + 1e-9)


@pytest.mark.parametrize(
    "w_shape, in_dims, out_dims, match",
    [((25, 12), (4, 6), (3, 4), r"ttm_svd: w.shape\[0\]=25 but prod\(in_dims\)=24 \(in_dims=\(4, 6\)\)"),
     ((24, 13), (4, 6), (3, 4), r"ttm_svd: w.shape\[1\]=13 but prod\(out_dims\)=12"),
     ((24, 12), (4, 6), (12,), r"ttm_svd: len\(in_dims\)=2 but len\(out_dims\)=1"),
     ((24,), (4, 6), (1, 1), r"ttm_svd: w.shape=\(24,\) but a 2-d matrix"),
     ((24, 12), (4, 0), (3, 4), r"ttm_svd: in_dims=\(4, 0\) but every entry must be a positive integer")],
)
def test_ttm_svd_errors(w_shape, in_dims, out_dims, match):
  with pytest.raises(ValueError, match=match):
    tnjax.ttm_svd(np.ones(w_shape), in_dims, out_dims)


def test_ttm_svd_names_itself_in_rank_errors():
  with pytest.raises(ValueError, match=r"ttm_svd: max_rank=0 but a positive integer"):
    tnjax.ttm_svd(np.ones((4, 4)), (2, 2), (2, 2), max_rank=0)


def _left_orthogonal(c):
  m = np.asarray(c).reshape(-1, c.shape[-1])
  return np.allclose(m.T @ m, np.eye(m.shape[1]), atol=1e-10)


def _right_orthogonal(c):
  m = np.asarray(c).reshape(c.shape[0], -1)
  return np.allclose(m @ m.T, np.eye(m.shape[0]), atol=1e-10)


@EAGER_AND_JIT
def test_orthogonalize_left_and_right(jit):
  tt = tnjax.random_tt(jax.random.key(0), (3, 4, 5, 2), rank=3, dtype=jnp.float64)
  orth = jax.jit(tnjax.orthogonalize, static_argnums=1) if jit else tnjax.orthogonalize
  left = orth(tt, "left")
  assert all(_left_orthogonal(c) for c in left.cores[:-1])
  np.testing.assert_allclose(np.linalg.norm(left.cores[-1]), np.linalg.norm(tt_full(tt.cores)), rtol=1e-10)
  right = orth(tt, "right")
  assert all(_right_orthogonal(c) for c in right.cores[1:])
  for t in (left, right):
    np.testing.assert_allclose(tt_full(t.cores), tt_full(tt.cores), atol=1e-10)


def test_orthogonalize_tt_matrix_keeps_format():
  ttm = tnjax.random_ttm(jax.random.key(1), (2, 3), (4, 2), rank=3, dtype=jnp.float64)
  out = tnjax.orthogonalize(ttm, "right")
  assert isinstance(out, tnjax.TTMatrix) and out.in_dims == (2, 3) and out.out_dims == (4, 2)
  np.testing.assert_allclose(ttm_full(out.cores), ttm_full(ttm.cores), atol=1e-10)


def test_orthogonalize_errors():
  tt = tnjax.random_tt(jax.random.key(0), (3, 4), rank=2)
  with pytest.raises(ValueError, match=r"orthogonalize: direction='up' but 'left' or 'right'"):
    tnjax.orthogonalize(tt, "up")
  with pytest.raises(ValueError, match=r"orthogonalize: tt is a ndarray but a TensorTrain or TTMatrix"):
    tnjax.orthogonalize(np.ones((3, 4)))


@EAGER_AND_JIT
def test_truncate_of_sum_recovers_ranks(jit):
  a = tnjax.random_tt(jax.random.key(0), (4, 5, 6, 3), rank=(3, 4, 2), dtype=jnp.float64)
  s = tnjax.add(a, a)
  assert s.ranks == (1, 6, 8, 4, 1)
  if jit:
    out = jax.jit(lambda t: tnjax.truncate(t, max_rank=(3, 4, 2)))(s)
  else:
    out = tnjax.truncate(s, rtol=1e-10)
  assert out.ranks == a.ranks
  np.testing.assert_allclose(tt_full(out.cores), 2 * tt_full(a.cores), atol=1e-10)


@EAGER_AND_JIT
def test_truncate_rtol_bound_and_cap(rng, jit):
  x = low_rank_tensor(rng, (5, 6, 5, 6), rank=5, noise=0.2)
  tt = tnjax.tt_svd(x)
  for rtol in (0.05, 0.3):
    out = _maybe_jit(tnjax.truncate, jit, rtol=rtol)(tt)
    assert rel_err(tt_full(out.cores), x) <= rtol * (1 + 1e-9)
  capped = tnjax.truncate(tt, max_rank=2)
  assert max(capped.ranks) == 2


def test_truncate_tt_matrix():
  a = tnjax.random_ttm(jax.random.key(2), (2, 3, 2), (3, 2, 2), rank=2, dtype=jnp.float64)
  out = tnjax.truncate(tnjax.add(a, tnjax.scale(a, 0.5)), rtol=1e-10)
  assert isinstance(out, tnjax.TTMatrix) and out.ranks == a.ranks
  np.testing.assert_allclose(ttm_full(out.cores), 1.5 * ttm_full(a.cores), atol=1e-10)


def test_truncate_errors():
  tt = tnjax.random_tt(jax.random.key(0), (3, 4, 5), rank=2)
  with pytest.raises(ValueError, match=r"truncate: max_rank=0 but a positive integer"):
    tnjax.truncate(tt, max_rank=0)
  with pytest.raises(ValueError, match=r"truncate: rtol=inf but a finite number >= 0"):
    tnjax.truncate(tt, rtol=float("inf"))
  with pytest.raises(ValueError, match=r"truncate: tt is a list but a TensorTrain or TTMatrix"):
    tnjax.truncate(list(tt.cores))


@pytest.mark.parametrize("rtol", [0.0, 0.05, 0.3, 0.7, 1.0, 2.0])
def test_truncation_rank_is_the_smallest_rank_within_the_budget(rng, rtol):
  s2 = np.sort(rng.random(12) ** 4)[::-1]
  # Brute force: the first r whose tail sum(s2[r:]) is within rtol^2 of the total, at least 1.
  want = max(next(r for r in range(13) if s2[r:].sum() <= rtol * rtol * s2.sum()), 1)
  assert int(tnjax.core.truncation_rank(s2, rtol)) == want
  assert int(jax.jit(tnjax.core.truncation_rank, static_argnums=1)(jnp.asarray(s2), rtol)) == want
  # A budget split over bonds and relative to another norm, as TT-SVD asks it.
  split = max(next(r for r in range(13) if s2[r:].sum() <= rtol * rtol / 3 * 10.0), 1)
  assert int(tnjax.core.truncation_rank(s2, rtol, norm2=10.0, num_bonds=3)) == split


@EAGER_AND_JIT
def test_balanced_svd_is_the_truncated_svd_split_evenly(rng, jit):
  a = rng.standard_normal((9, 6))
  u, v = _maybe_jit(tnjax.core.balanced_svd, jit, max_rank=4)(a)
  uu, s, vt = np.linalg.svd(a, full_matrices=False)
  np.testing.assert_allclose(u @ v, (uu[:, :4] * s[:4]) @ vt[:4], atol=1e-10)
  np.testing.assert_allclose(np.linalg.norm(u, axis=0), np.sqrt(s[:4]), rtol=1e-10)
  np.testing.assert_allclose(np.linalg.norm(v, axis=1), np.sqrt(s[:4]), rtol=1e-10)


def test_balanced_svd_rtol_and_errors(rng):
  a = rng.standard_normal((8, 7))
  u, v = tnjax.core.balanced_svd(a, rtol=0.3)
  assert rel_err(u @ v, a) <= 0.3 and u.shape[1] < 7
  with pytest.raises(ValueError, match=r"balanced_svd: a.shape=\(4,\) but a 2-d matrix \(m, n\) is expected"):
    tnjax.core.balanced_svd(np.ones(4))
  with pytest.raises(ValueError, match=r"tt_svd: rtol=-1"):
    tnjax.core.balanced_svd(a, rtol=-1.0)


def _decaying(rng, m, n, power=0.5):
  """A matrix with singular values i^-power, like trained weights (slow decay)."""
  k = min(m, n)
  u, _ = np.linalg.qr(rng.normal(size=(m, k)))
  v, _ = np.linalg.qr(rng.normal(size=(n, k)))
  return (u * np.arange(1, k + 1) ** -power) @ v.T


# One case by default; float32 and the tall shape are in the slow run.
@pytest.mark.parametrize("dtype", [np.float64, pytest.param(np.float32, marks=pytest.mark.slow)])
@pytest.mark.parametrize("shape,in_dims,out_dims", [
    pytest.param((96, 384), (4, 4, 6), (6, 8, 8), marks=pytest.mark.slow),
    pytest.param((1000, 48), (10, 10, 10), (4, 4, 3), marks=pytest.mark.slow)])
def test_gram_method_matches_svd_truncation(rng, dtype, shape, in_dims, out_dims):
  """The Gram-eigh steps give the exact truncation error (within 1%) at equal ranks, eager and jitted."""
  w = jnp.asarray(_decaying(rng, *shape), dtype)
  for rank in (2, 24):
    errs = {}
    for method in ("svd", "gram"):
      f = functools.partial(tnjax.ttm_svd, in_dims=in_dims, out_dims=out_dims, max_rank=rank, method=method)
      for label, g in (("eager", f), ("jit", jax.jit(f))):
        ttm = g(w)
        errs[method, label] = float(jnp.linalg.norm(tnjax.to_dense(ttm) - w) / jnp.linalg.norm(w))
        assert ttm.ranks == tnjax.ttm_svd(w, in_dims, out_dims, max_rank=rank).ranks
    for label in ("eager", "jit"):
      assert errs["gram", label] <= 1.01 * errs["svd", label] + 1e-6, errs
  # Tolerances pick the same ranks and keep the bound.
  a = tnjax.ttm_svd(w, in_dims, out_dims, rtol=0.4, method="gram")
  assert a.ranks == tnjax.ttm_svd(w, in_dims, out_dims, rtol=0.4).ranks
  assert float(jnp.linalg.norm(tnjax.to_dense(a) - w) / jnp.linalg.norm(w)) <= 0.4 * (1 + 1e-5)


def test_gram_method_orthonormal_cores_and_errors(rng):
  x = jnp.asarray(rng.normal(size=(6, 7, 8, 5)))
  tt = tnjax.tt_svd(x, max_rank=4, method="gram")
  for core in tt.cores[:-1]:
    g = core.reshape(-1, core.shape[-1])
    np.testing.assert_allclose(g.T @ g, np.eye(g.shape[1]), atol=1e-10)
  with pytest.raises(ValueError, match=r"tt_svd: method='qr' but one of \('svd', 'gram'\)"):
    tnjax.tt_svd(x, method="qr")
  with pytest.raises(ValueError, match=r"ttm_svd: method='eig' but one of"):
    tnjax.ttm_svd(jnp.ones((4, 4)), (2, 2), (2, 2), method="eig")
