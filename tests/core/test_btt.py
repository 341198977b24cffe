import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import tnjax
from tests.core.reference import rel_err
from tnjax.core import btt as B


def btt_full(left, right):
  """W[(i1, i2), (j1, j2)] = sum_a left[i2, i1, a, j1] right[j1, a, i2, j2], entry by entry in float64."""
  left, right = np.asarray(left, np.float64), np.asarray(right, np.float64)
  m2, m1, r, n1 = left.shape
  n2 = right.shape[3]
  w = np.zeros((m1 * m2, n1 * n2))
  for i1, i2, j1, j2 in np.ndindex(m1, m2, n1, n2):
    w[i1 * m2 + i2, j1 * n2 + j2] = left[i2, i1, :, j1] @ right[j1, :, i2, j2]
  return w


def _btt(seed=0, in_dims=(4, 3), out_dims=(2, 5), rank=2, dtype=jnp.float64):
  return tnjax.random_btt(jax.random.key(seed), in_dims, out_dims, rank, dtype=dtype)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_to_dense_and_matvec_match_the_reference(rng, jit):
  btt = _btt()
  ref = btt_full(*btt.cores)
  to_dense = jax.jit(tnjax.to_dense) if jit else tnjax.to_dense
  np.testing.assert_allclose(to_dense(btt), ref, rtol=1e-12, atol=1e-12)
  x = rng.standard_normal((2, 3, 12))
  matvec = jax.jit(tnjax.matvec) if jit else tnjax.matvec
  np.testing.assert_allclose(matvec(btt, x), x @ ref, rtol=1e-12, atol=1e-12)


def test_monarch_is_rank_one_and_counts_match_hand_computed_values():
  btt = _btt(in_dims=(4, 3), out_dims=(2, 5), rank=1)
  # left (m2, m1, r, n1) = (3, 4, 1, 2): 24; right (n1, r, m2, n2) = (2, 1, 3, 5): 30
  assert btt.num_params == 24 + 30 == 1 * (12 * 2 + 10 * 3)
  assert B.btt_flops(btt, 7) == 2 * 7 * 54
  assert (btt.in_dims, btt.out_dims, btt.rank, btt.shape) == ((4, 3), (2, 5), 1, (12, 10))
  full = _btt(in_dims=(4, 3), out_dims=(2, 5), rank=4)
  assert full.num_params == 4 * 54 and B.btt_flops(full, 1) == 2 * 216


def test_matvec_gradients_and_vmap(rng):
  btt = _btt(rank=3)
  x = jnp.asarray(rng.standard_normal((4, 12)))
  check_grads(lambda b, x: tnjax.matvec(b, x), (btt, x), order=1, modes=("rev",))
  # gradient with respect to the cores equals the dense reference's chain rule
  g = rng.standard_normal((4, 10))
  dleft, dright = jax.grad(lambda b: jnp.sum(tnjax.matvec(b, x) * g))(btt).cores
  dw = np.asarray(x).T @ g  # dL/dW
  left, right = (np.asarray(c) for c in btt.cores)
  ref_left = np.einsum("ibjk,jabk->biaj", dw.reshape(4, 3, 2, 5), right)
  ref_right = np.einsum("ibjk,biaj->jabk", dw.reshape(4, 3, 2, 5), left)
  np.testing.assert_allclose(dleft, ref_left, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(dright, ref_right, rtol=1e-10, atol=1e-12)
  stacked = jax.vmap(lambda k: tnjax.random_btt(k, (4, 3), (2, 5), 2, dtype=jnp.float64))(
      jax.random.split(jax.random.key(1), 3))
  ys = jax.vmap(tnjax.matvec, in_axes=(0, None))(stacked, x)
  for i in range(3):
    np.testing.assert_allclose(ys[i], np.asarray(x) @ btt_full(stacked.cores[0][i], stacked.cores[1][i]),
                               rtol=1e-12, atol=1e-12)


def test_remat_gives_the_same_gradients_and_does_not_keep_the_intermediate(rng):
  """The default recomputes the (rows, m2, r, n1) intermediate in the backward pass: identical gradients, and
  the forward pass's residuals (what the backward keeps) shrink by the intermediate's size (rows * m2 * r * n1
  floats): without remat they hold it, with remat little more than x."""
  btt = _btt(in_dims=(16, 16), out_dims=(16, 16), rank=16, dtype=jnp.float32)  # intermediate 16x the output
  x = jnp.asarray(rng.standard_normal((2048, 256)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((2048, 256)), jnp.float32)

  def grads(remat):
    return jax.jit(jax.grad(lambda b, x: jnp.sum(B.btt_matvec(b, x, remat=remat) * g), argnums=(0, 1)))

  for a, b in zip(jax.tree.leaves(grads(True)(btt, x)), jax.tree.leaves(grads(False)(btt, x))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  def residual_bytes(remat):  # the vjp closure's arrays are the forward's residuals
    fwd = jax.jit(lambda b, x: jax.vjp(lambda b: B.btt_matvec(b, x, remat=remat), b)[1])
    return fwd.lower(btt, x).compile().memory_analysis().output_size_in_bytes

  intermediate, x_bytes = 2048 * 16 * 16 * 16 * 4, 2048 * 256 * 4
  assert residual_bytes(False) >= intermediate
  assert residual_bytes(True) <= 2 * x_bytes


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_from_dense_is_exact_at_full_rank_and_the_optimal_projection_below(rng, jit):
  w = rng.standard_normal((12, 10))
  f = jax.jit(tnjax.btt_from_dense, static_argnums=(1, 2, 3)) if jit else tnjax.btt_from_dense
  np.testing.assert_allclose(tnjax.to_dense(f(w, (4, 3), (2, 5), 4)), w, rtol=1e-10, atol=1e-10)
  errors = [rel_err(tnjax.to_dense(f(w, (4, 3), (2, 5), r)), w) for r in (1, 2, 3, 4)]
  assert all(a > b for a, b in zip(errors, errors[1:]))
  # the error is exactly the discarded singular values of every (m1 x n2) block
  blocks = w.reshape(4, 3, 2, 5).transpose(1, 2, 0, 3)
  s = np.linalg.svd(blocks, compute_uv=False)
  np.testing.assert_allclose(errors[1], np.sqrt((s[..., 2:] ** 2).sum()) / np.linalg.norm(w), rtol=1e-8)


def test_from_dense_pads_matrices_that_do_not_fill_the_dims(rng):
  w = rng.standard_normal((11, 9))
  btt = tnjax.btt_from_dense(w, (4, 3), (2, 5), 4)
  np.testing.assert_allclose(tnjax.to_dense(btt)[:11, :9], w, rtol=1e-10, atol=1e-10)


def test_random_init_has_the_requested_dense_std_and_fan_in_balanced_cores():
  btt = tnjax.random_btt(jax.random.key(0), (32, 24), (48, 64), 4, std=0.02)
  assert abs(float(jnp.std(tnjax.to_dense(btt))) - 0.02) < 0.001
  s_left, s_right = (float(jnp.std(c)) for c in btt.cores)
  # stds proportional to 1/sqrt(fan-in): m1 = 32 for left, r * m2 = 96 for right
  assert abs(s_left / s_right - np.sqrt(96 / 32)) < 0.05


def test_default_dims_minimize_parameters():
  (m1, m2), (n1, n2) = B.btt_dims(768, 3072)
  assert m1 * m2 == 768 and n1 * n2 == 3072 and m1 >= m2 and n1 <= n2


def test_bf16_matvec_is_close_to_float32(rng):
  btt = _btt(dtype=jnp.float32)
  x = jnp.asarray(rng.standard_normal((5, 12)), jnp.float32)
  y16 = tnjax.matvec(jax.tree_util.tree_map(lambda c: c.astype(jnp.bfloat16), btt), x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), tnjax.matvec(btt, x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("call, match", [
    (lambda: tnjax.random_btt(jax.random.key(0), (4, 3), (2, 5), 5), r"rank=5 but .* min\(m1, n2\)=4"),
    (lambda: tnjax.random_btt(jax.random.key(0), (4, 3, 2), (2, 5), 1), "two factors each"),
    (lambda: tnjax.random_btt(jax.random.key(0), (4, 3), (2, 5), 0), "rank=0 but a positive integer"),
    (lambda: tnjax.random_btt(jax.random.key(0), (4, 3), (2, 5), 1, std=-1.0), "std=-1.0"),
    (lambda: tnjax.btt_from_dense(np.ones((13, 10)), (4, 3), (2, 5), 2), r"w.shape=\(13, 10\)"),
    (lambda: tnjax.btt_from_dense(np.full((12, 10), np.nan), (4, 3), (2, 5), 2), "non-finite"),
    (lambda: tnjax.matvec(_btt(), jnp.ones((2, 11))), r"x.shape\[-1\]=11 but prod\(in_dims\)=12"),
    (lambda: tnjax.btt_to_dense(np.ones((3, 3))), "but a BlockTT is expected"),
    (lambda: tnjax.BlockTT.from_cores(np.ones((3, 4, 2, 2)), np.ones((2, 1, 3, 5))), r"right.shape=\(2, 1, 3, 5\)"),
    (lambda: tnjax.BlockTT.from_cores(np.ones((3, 4, 2)), np.ones((2, 2, 3, 5))), "are expected"),
])
def test_bad_input_is_refused_by_name(call, match):
  with pytest.raises(ValueError, match=match):
    call()
