import jax.numpy as jnp
import numpy as np
import pytest

from tests.hf_fixtures import hf_logits
from tnjax.compress import allocate, calibrate, cr_select, modegpt_compress, nystrom_select, whitened_vo_svd


def test_nystrom_is_the_least_squares_refit(rng):
  h = rng.normal(size=(300, 20)) * rng.uniform(0.1, 3, size=20)
  w_down = rng.normal(size=(20, 5))
  keep, w = nystrom_select(h.T @ h, w_down, 7, ridge=0.0, refit_ridge=0.0)
  assert len(keep) == 7 and list(keep) == sorted(keep)
  np.testing.assert_allclose(w, np.linalg.lstsq(h[:, keep], h @ w_down, rcond=None)[0], atol=1e-8)
  # Ridge leverage scores with lambda -> 0 are 1 for every column of a full-rank C: with a ridge the
  # high-energy columns win.
  keep, _ = nystrom_select(h.T @ h, w_down, 3, ridge=10.0)
  energy = np.sum(h * h, axis=0)
  assert set(keep) == set(np.argsort(-energy)[:3])
  keep, w = nystrom_select(h.T @ h, w_down, 20, ridge=1e-3, refit_ridge=0.0)  # all kept: exact
  np.testing.assert_allclose(h[:, keep] @ w, h @ w_down, atol=1e-6)


def test_nystrom_refit_ridge_is_ridge_regression_and_bounds_weights(rng):
  base = rng.normal(size=(400, 6))  # 3 near-duplicate neurons, and a weak one that the selection drops
  h = np.concatenate([base, base[:, :3] + 1e-5 * rng.normal(size=(400, 3)), 0.3 * rng.normal(size=(400, 1))], 1)
  w_down = rng.normal(size=(10, 4))
  c = h.T @ h
  keep, exact = nystrom_select(c, w_down, 9, ridge=10.0, refit_ridge=1e-10)
  assert list(keep) == list(range(9))
  _, w = nystrom_select(c, w_down, 9, ridge=10.0, refit_ridge=1e-2)
  eps = 1e-2 * np.trace(c) / 10
  np.testing.assert_allclose(w, np.linalg.solve(c[:9, :9] + eps * np.eye(9), c[:9] @ w_down), rtol=1e-8)
  # The exact refit spends weights ~100x the originals on the duplicates' noise direction; the ridge does not,
  # and fits almost as well.
  assert np.abs(exact).max() > 100 * np.abs(w_down).max() > 100 * np.abs(w).max() / 2
  fit = lambda v: np.linalg.norm(h[:, keep] @ v - h @ w_down) / np.linalg.norm(h @ w_down)  # noqa: E731
  assert fit(exact) <= fit(w) < 1.01 * fit(exact)


def test_cr_keeps_the_largest_column_products(rng):
  q, k = rng.normal(size=(50, 2, 6)), rng.normal(size=(50, 2, 6)) * rng.uniform(0.1, 2, size=6)
  cols = cr_select(np.sum(q * q, 0), np.sum(k * k, 0), 3)
  for head in range(2):
    prod = np.linalg.norm(q[:, head], axis=0) * np.linalg.norm(k[:, head], axis=0)
    assert set(cols[head]) == set(np.argsort(-prod)[:3])
    # The CR approximation of Q K^T is the sum of the kept outer products.
    approx = q[:, head, cols[head]] @ k[:, head, cols[head]].T
    expected = sum(np.outer(q[:, head, i], k[:, head, i]) for i in cols[head])
    np.testing.assert_allclose(approx, expected, atol=1e-10)
  full = cr_select(np.sum(q * q, 0), np.sum(k * k, 0), 6)
  assert full.tolist() == [list(range(6))] * 2


def test_whitened_vo_svd_is_optimal_in_the_data_norm(rng):
  x = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16))
  w_v, w_o = rng.normal(size=(16, 4)), rng.normal(size=(4, 16))
  s = np.linalg.svd(x @ w_v @ w_o, compute_uv=False)
  for k in (1, 2, 3, 4):
    a, b = whitened_vo_svd(x.T @ x, w_v, w_o, k, ridge=0.0)
    assert a.shape == (16, k) and b.shape == (k, 16)
    err2 = np.linalg.norm(x @ (w_v @ w_o - a @ b)) ** 2
    assert err2 == pytest.approx(np.sum(s[k:] ** 2), rel=1e-6, abs=1e-8 * np.sum(s**2))


def test_allocate_averages_the_ratio_and_favours_important_blocks():
  ratios = allocate([0.5, 0.1, 0.2, 0.1], 0.6)
  assert np.mean(ratios) == pytest.approx(0.6)
  assert ratios[0] > ratios[2] > ratios[1] == pytest.approx(ratios[3])
  assert all(0.05 - 1e-12 <= r <= 1 for r in allocate([1.0, 0.0, 0.0], 0.1))
  assert allocate([0.3, 0.1], 1.0) == [1.0, 1.0]


def test_calibration_and_block_dims(trained, ids):
  stats = calibrate(trained, ids)
  assert len(stats) == 2 and all(0 < s["importance"] < 2 for s in stats)
  d, f = trained.config.d_model, trained.config.ff_dim
  assert stats[0]["attn_in"].shape == (d, d) and stats[0]["mlp_act"].shape == (f, f)
  small = modegpt_compress(trained, stats, ratio=0.5, allocation="uniform")
  assert small.config.block_dims(0) == (f // 2, 8, 8)
  assert small.h[0].mlp.c_fc.kernel.shape == (d, f // 2)
  assert small.h[0].attn.c_attn.kernel.shape == (d, 4 * (8 + 8 + 8))
  cache = small.init_cache(1)
  assert cache[0].keys.shape[-1] == 8 and cache[0].values.shape[-1] == 8
  # KV-cached decoding agrees with the full forward pass on the narrowed model.
  logits, _ = small.step(jnp.asarray(ids[:1]), small.init_cache(1))
  np.testing.assert_allclose(logits, small(ids[:1]), atol=1e-5)


@pytest.mark.slow  # HF export and torch reference
def test_modegpt_exports_to_hugging_face_as_dense(trained, ids, tmp_path):
  """Narrowed blocks are zero-padded back to GPT-2 widths: transformers computes the same logits."""
  from transformers import GPT2LMHeadModel

  from tnjax.interop import save_hf_gpt2

  small = modegpt_compress(trained, ids, ratio=0.6)
  save_hf_gpt2(small, tmp_path / "hf")
  hf = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
  np.testing.assert_allclose(hf_logits(hf, ids), small(ids), atol=1e-4)


def test_the_old_name_of_whitened_vo_svd_still_works_with_a_deprecation_warning():
  import tnjax.compress

  with pytest.warns(DeprecationWarning, match=r"tnjax.compress.whitened_svd is deprecated: it is "
                                               r"tnjax.compress.whitened_vo_svd"):
    assert tnjax.compress.whitened_svd is whitened_vo_svd
  with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
    tnjax.compress.no_such_name  # noqa: B018
