"""Decompositions in the data metric against float64 NumPy references: whitened SVD is Eckart-Young in
``||X dW||_F``; the Kronecker-whitened TT-matrix fit beats the weight-error TTM-SVD on correlated inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tnjax
from tnjax.core.whitening import (
    kronecker_grams,
    whiten,
    whitened_basis,
    whitened_spectrum,
    whitened_svd,
    whitened_ttm_svd,
    whitening,
)


def _data(n_in=12, n_out=10, tokens=400, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((tokens, n_in)) @ rng.standard_normal((n_in, n_in)) * np.linspace(0.2, 3.0, n_in)
  return x, rng.standard_normal((n_in, n_out))


def _reference_best(x, w, rank):
  """Eckart-Young in the data metric, computed independently: QR of X, SVD of R W."""
  _, r = np.linalg.qr(x)
  u, s, vt = np.linalg.svd(r @ w)
  best = np.linalg.solve(r, (u[:, :rank] * s[:rank]) @ vt[:rank])
  return best, np.sqrt(np.sum(s[rank:] ** 2))


@pytest.mark.parametrize("rank, jit", [(1, False), (4, True), (10, False)])
def test_whitened_svd_is_the_best_rank_r_fit_of_the_outputs(rank, jit):
  x, w = _data()
  fn = jax.jit(whitened_svd, static_argnums=2) if jit else whitened_svd
  a, b = fn(jnp.asarray(w), jnp.asarray(x.T @ x), rank)
  got = np.asarray(a @ b)
  best, bound = _reference_best(x, w, rank)
  assert np.linalg.norm(x @ (w - got)) == pytest.approx(bound, rel=1e-6, abs=1e-9)
  np.testing.assert_allclose(got, best, rtol=1e-6, atol=1e-8)
  # no other rank-r matrix does better, plain SVD included
  u, s, vt = np.linalg.svd(w)
  assert np.linalg.norm(x @ (w - (u[:, :rank] * s[:rank]) @ vt[:rank])) >= bound - 1e-9
  rng = np.random.default_rng(1)
  for _ in range(5):
    other = (np.asarray(a) + 1e-2 * rng.standard_normal((12, rank))) @ (np.asarray(b) + 1e-2 * rng.standard_normal(
        (rank, 10)))  # a nearby rank-r matrix
    assert np.linalg.norm(x @ (w - other)) >= bound - 1e-9
  np.testing.assert_allclose(np.asarray(b @ b.T), np.eye(rank), atol=1e-10)


@pytest.mark.parametrize("n_in, n_out, jit", [(12, 10, False), (10, 25, False), (10, 25, True), (8, 8, True)])
def test_gram_basis_equals_the_svd_at_every_rank_tall_wide_and_weight_metric(n_in, n_out, jit):
  """The eigh-based basis (of the smaller Gram, a QR for a wide matrix) gives SVD's values and, at every rank,
  its optimum: the data-metric one (against QR + SVD of X) and, with gram=None, plain Eckart-Young."""
  x, w = _data(n_in, n_out)
  fn = jax.jit(whitened_basis) if jit else whitened_basis
  for gram, metric in ((jnp.asarray(x.T @ x), x), (None, np.eye(n_in))):
    s, vt = (np.asarray(v) for v in fn(jnp.asarray(w), gram))
    k = min(n_in, n_out)
    assert s.shape == (k,) and vt.shape == (k, n_out)
    np.testing.assert_allclose(vt @ vt.T, np.eye(k), atol=1e-10)
    _, r = np.linalg.qr(metric)
    np.testing.assert_allclose(s, np.linalg.svd(r @ w, compute_uv=False), rtol=1e-8)
    for rank in (1, k // 2, k):
      got = (w @ vt[:rank].T) @ vt[:rank]
      best, bound = _reference_best(metric, w, rank) if gram is not None else (None, np.sqrt(np.sum(s[rank:] ** 2)))
      assert np.linalg.norm(metric @ (w - got)) == pytest.approx(bound, rel=1e-6, abs=1e-8)
      if best is not None:
        np.testing.assert_allclose(got, best, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(np.asarray(whitened_spectrum(jnp.asarray(w))), np.linalg.svd(w, compute_uv=False),
                             rtol=1e-10)
  with pytest.raises(ValueError, match=r"whitened_basis: w has non-finite values \(NaN or Inf\)"):
    whitened_basis(jnp.asarray(w).at[0, 0].set(jnp.nan))


@pytest.mark.parametrize("jit", [False, True])
def test_whiten_preserves_output_norms_full_and_diagonal(jit):
  x, w = _data()
  fn = jax.jit(whiten) if jit else whiten
  sw = np.asarray(fn(jnp.asarray(w), jnp.asarray(x.T @ x)))
  # ||S^T w v|| = ||X w v|| for every v: the whitened matrix has the outputs' Gram w^T X^T X w
  np.testing.assert_allclose(sw.T @ sw, w.T @ x.T @ x @ w, rtol=1e-8, atol=1e-8)
  counts = np.arange(1.0, 13.0)  # a diagonal metric: sum_i c_i ||w_i||^2
  sd = np.asarray(fn(jnp.asarray(w), jnp.asarray(counts)))
  np.testing.assert_allclose(sd, np.sqrt(counts)[:, None] * w, rtol=1e-10)
  g = jax.grad(lambda m: jnp.sum(whiten(m, jnp.asarray(x.T @ x)) ** 2))(jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(g), 2 * x.T @ x @ w, rtol=1e-6, atol=1e-8)
  with pytest.raises(ValueError, match=r"whiten: gram.shape=\(3,\) but \(12, 12\) is expected"):
    whiten(jnp.asarray(w), jnp.ones(3))


def test_spectrum_gives_the_truncation_loss_and_identity_gram_is_plain_svd():
  x, w = _data()
  s = np.asarray(whitened_spectrum(jnp.asarray(w), jnp.asarray(x.T @ x)))
  for rank in (2, 5):
    assert np.sqrt(np.sum(s[rank:] ** 2)) == pytest.approx(_reference_best(x, w, rank)[1], rel=1e-6)
  a, b = whitened_svd(jnp.asarray(w), jnp.eye(12), 3)
  u, sv, vt = np.linalg.svd(w)
  np.testing.assert_allclose(np.asarray(a @ b), (u[:, :3] * sv[:3]) @ vt[:3], atol=1e-10)


def test_singular_gram_follows_the_floor_rule_and_vmap_matches():
  x, w = _data(tokens=5)  # 5 tokens, 12 features: rank-5 Gram
  a, b = whitened_svd(jnp.asarray(w), jnp.asarray(x.T @ x), 5)
  # rank 5 spans the data exactly: the outputs on the calibration tokens are reproduced
  np.testing.assert_allclose(x @ np.asarray(a @ b), x @ w, rtol=1e-3)  # up to the floor's weight
  ws = jnp.stack([jnp.asarray(w), 2 * jnp.asarray(w)])
  batched = jax.vmap(lambda m: whitened_svd(m, jnp.asarray(x.T @ x + np.eye(12)), 3))(ws)
  single = whitened_svd(2 * jnp.asarray(w), jnp.asarray(x.T @ x + np.eye(12)), 3)
  np.testing.assert_allclose(np.asarray(batched[0][1] @ batched[1][1]), np.asarray(single[0] @ single[1]), atol=1e-9)


def test_kronecker_factors_and_exact_metric_fold():
  rng = np.random.default_rng(0)
  ga, gb = (m @ m.T + np.eye(n) for n, m in ((4, rng.standard_normal((4, 4))), (3, rng.standard_normal((3, 3)))))
  g0, g1 = kronecker_grams(jnp.asarray(np.kron(ga, gb)), (4, 3))
  np.testing.assert_allclose(np.asarray(g0), np.trace(gb) * ga, rtol=1e-10)
  np.testing.assert_allclose(np.asarray(g1), np.trace(ga) * gb, rtol=1e-10)
  # with a Kronecker Gram, the fit is the TTM-SVD of the whitened matrix with S_k^-T folded back
  w = rng.standard_normal((12, 6))
  fit = whitened_ttm_svd(jnp.asarray(w), jnp.asarray(np.kron(ga, gb)), (4, 3), (3, 2), max_rank=2)
  s_t = np.kron(np.asarray(whitening(g0)[0]), np.asarray(whitening(g1)[0]))
  ref = tnjax.ttm_svd(jnp.asarray(s_t @ w), (4, 3), (3, 2), max_rank=2)
  np.testing.assert_allclose(s_t @ np.asarray(tnjax.to_dense(fit)), np.asarray(tnjax.to_dense(ref)), atol=1e-9)
  full = whitened_ttm_svd(jnp.asarray(w), jnp.asarray(np.kron(ga, gb)), (4, 3), (3, 2))  # full rank: exact
  np.testing.assert_allclose(np.asarray(tnjax.to_dense(full)), w, atol=1e-9)


@pytest.mark.parametrize("jit", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_data_aware_ttm_fit_has_lower_output_error_on_correlated_inputs(jit):
  rng = np.random.default_rng(3)
  mixes = {"generic": rng.standard_normal((64, 64)) * np.repeat(np.linspace(0.1, 4.0, 8), 8),
           "kronecker": np.kron(rng.standard_normal((8, 8)) * np.linspace(0.1, 4.0, 8), rng.standard_normal((8, 8)))}
  w = rng.standard_normal((64, 48))
  fn = jax.jit(whitened_ttm_svd, static_argnums=(2, 3, 4)) if jit else whitened_ttm_svd
  plain = tnjax.ttm_svd(jnp.asarray(w), (8, 8), (8, 6), max_rank=6)
  for name, gain in (("generic", 0.95), ("kronecker", 0.8)):  # measured: 0.92x and 0.72x
    x = rng.standard_normal((2000, 64)) @ mixes[name]
    fit = fn(jnp.asarray(w), jnp.asarray(x.T @ x), (8, 8), (8, 6), 6)
    err = lambda t: np.linalg.norm(x @ (w - np.asarray(tnjax.to_dense(t))))  # noqa: E731, B023
    assert err(fit) < gain * err(plain), name
    assert fit.ranks == plain.ranks
    # balanced cores (scale 1e3 on the inputs: a Gram of many tokens), for the optimizers of a later heal
    big = fn(jnp.asarray(w), jnp.asarray(1e6 * x.T @ x), (8, 8), (8, 6), 6)
    norms = [float(jnp.linalg.norm(c)) for c in big.cores]
    np.testing.assert_allclose(norms, norms[0], rtol=1e-10)
    np.testing.assert_allclose(np.asarray(tnjax.to_dense(big)), np.asarray(tnjax.to_dense(fit)), atol=1e-8)


def test_diagonal_metric_of_an_embedding_with_a_padded_vocabulary():
  """Token counts as a 1-d gram: the same fits as with the full diagonal matrix, never forming it; a vocabulary
  of 60 rows in TT-matrix dims (8, 8) is zero-padded, and unseen tokens only get the floor's weight."""
  rng = np.random.default_rng(0)
  table = rng.standard_normal((60, 12))
  counts = np.floor(1000.0 / np.arange(1, 61) ** 1.1)  # Zipf-like
  counts[50:] = 0  # never seen
  a1, b1 = whitened_svd(jnp.asarray(table), jnp.asarray(counts), 4)
  a2, b2 = whitened_svd(jnp.asarray(table), jnp.diag(jnp.asarray(counts)), 4)
  np.testing.assert_allclose(np.asarray(a1 @ b1), np.asarray(a2 @ b2), atol=1e-8)
  fit = whitened_ttm_svd(jnp.asarray(table), jnp.asarray(counts), (8, 8), (3, 4), max_rank=4)
  ref = whitened_ttm_svd(jnp.asarray(table), jnp.diag(jnp.asarray(counts)), (8, 8), (3, 4), max_rank=4)
  np.testing.assert_allclose(np.asarray(tnjax.to_dense(fit)), np.asarray(tnjax.to_dense(ref)), atol=1e-8)
  plain = tnjax.ttm_svd(jnp.asarray(table), (8, 8), (3, 4), max_rank=4)
  err = lambda t: np.sqrt(np.sum(counts[:, None] * (table - np.asarray(tnjax.to_dense(t))[:60]) ** 2))  # noqa: E731
  assert err(fit) < err(plain)


@pytest.mark.parametrize("call, match", [
    (lambda: whitened_svd(jnp.ones((4, 3)), jnp.eye(3), 2), r"whitened_svd: gram.shape=\(3, 3\) but \(4, 4\)"),
    (lambda: whitened_svd(jnp.ones((4, 3)), jnp.eye(4), 4), r"whitened_svd: rank=4 but an int in \[1, 3\]"),
    (lambda: whitened_svd(jnp.ones(4), jnp.eye(4), 1), r"whitened_svd: w.shape=\(4,\) but a 2-d matrix"),
    (lambda: whitened_svd(jnp.ones((2, 2)), -jnp.eye(2), 1), r"whitened_svd: gram has no positive eigenvalue"),
    (lambda: whitened_svd(jnp.ones((2, 2)), jnp.diag(jnp.array([1.0, -0.5])), 1),
     r"whitened_svd: gram has eigenvalue -0.5 < -floor \* 1; it is not positive semi-definite"),
    (lambda: whitened_svd(jnp.ones((2, 2)), jnp.full((2, 2), jnp.nan), 1), r"whitened_svd: gram has non-finite"),
    (lambda: whitening(jnp.eye(2), floor=0.0), r"whitening: floor=0.0 but 0 < floor < 1"),
    (lambda: whitened_ttm_svd(jnp.ones((13, 4)), jnp.eye(13), (3, 4), (2, 2)),
     r"whitened_ttm_svd: w.shape\[0\]=13 but prod\(in_dims\)=12"),
    (lambda: whitened_svd(jnp.ones((4, 3)), jnp.ones(3), 2),
     r"whitened_svd: gram.shape=\(3,\) but \(4, 4\) .* or \(4,\)"),
])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
