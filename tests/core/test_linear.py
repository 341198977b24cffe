import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import tnjax
from tests.core.reference import ttm_full
from tnjax.core import contraction as L
from tnjax.core import ops
from tnjax.core.contraction import cost, gather

ORDERS_3 = [(0, 1, 2), (1, 0, 2), (1, 2, 0), (2, 1, 0)]


def _ttm(seed, in_dims, out_dims, rank, dtype=jnp.float64):
  return tnjax.random_ttm(jax.random.key(seed), in_dims, out_dims, rank, dtype=dtype)


def test_connected_orders():
  assert sorted(cost._connected_orders(3)) == sorted(ORDERS_3)
  assert len(set(cost._connected_orders(5))) == 16  # 2^(d-1)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("order", ORDERS_3 + [None])
def test_matvec_direct_every_order_equals_dense(rng, order, jit):
  w = _ttm(0, (2, 3, 4), (3, 2, 2), (3, 4))
  x = rng.standard_normal((2, 5, 24))
  f = (lambda w, x: L.matvec_direct(w, x, order=order))
  y = (jax.jit(f) if jit else f)(w, x)
  np.testing.assert_allclose(y, x @ ttm_full(w.cores), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("in_dims, out_dims", [((6,), (5,)), ((2, 3), (4, 2)), ((2, 2, 3, 2), (2, 3, 2, 2))])
def test_matvec_dense_and_direct_agree_in_outputs_and_gradients(rng, in_dims, out_dims):
  w = _ttm(1, in_dims, out_dims, 3)
  x = jnp.asarray(rng.standard_normal((7, w.shape[0])))
  ref = np.asarray(x) @ ttm_full(w.cores)
  g = jnp.asarray(rng.standard_normal((7, w.shape[1])))
  grads = {}
  for path in ("dense", "direct"):
    f = lambda w, x, path=path: jnp.sum(L.linear(w, x, path=path) * g)
    np.testing.assert_allclose(L.linear(w, x, path=path), ref, rtol=1e-10, atol=1e-10)
    grads[path] = jax.jit(jax.grad(f, argnums=(0, 1)))(w, x)
  for a, b in zip(jax.tree_util.tree_leaves(grads["dense"]), jax.tree_util.tree_leaves(grads["direct"])):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("split", [1, 2, None])
@pytest.mark.parametrize("order", ["prefix", "suffix", None])
def test_matvec_split_every_bond_and_order_equals_dense(rng, split, order, jit):
  w = _ttm(0, (2, 3, 4), (3, 2, 2), (3, 4))
  x = rng.standard_normal((2, 5, 24))
  f = (lambda w, x: L.matvec_split(w, x, split=split, order=order))
  y = (jax.jit(f) if jit else f)(w, x)
  assert y.shape == (2, 5, 12)
  np.testing.assert_allclose(y, x @ ttm_full(w.cores), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("in_dims, out_dims", [((6,), (5,)), ((2, 3), (4, 2)),
                                                  pytest.param((2, 2, 3, 2), (2, 3, 2, 2), marks=pytest.mark.slow)])
def test_split_gradients_equal_dense_path(rng, in_dims, out_dims):
  w = _ttm(3, in_dims, out_dims, 3)
  x = jnp.asarray(rng.standard_normal((7, w.shape[0])))
  g = jnp.asarray(rng.standard_normal((7, w.shape[1])))
  grads = {path: jax.jit(jax.grad(lambda w, x, path=path: jnp.sum(L.linear(w, x, path=path) * g),
                                  argnums=(0, 1)))(w, x) for path in ("dense", "split")}
  for a, b in zip(jax.tree_util.tree_leaves(grads["dense"]), jax.tree_util.tree_leaves(grads["split"])):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)
  if len(in_dims) > 1:
    check_grads(lambda w, x: L.matvec_split(w, x, split=1, order="prefix"), (w, x), order=2, modes=("fwd", "rev"))


def test_split_under_vmap_and_in_bfloat16(rng):
  ws = [_ttm(s, (4, 6), (8, 4), 3, jnp.float32) for s in range(3)]
  stacked = jax.tree_util.tree_map(lambda *c: jnp.stack(c), *ws)
  x = jnp.asarray(rng.standard_normal((3, 5, 24)), jnp.float32)
  out = jax.vmap(lambda w, x: L.linear(w, x, path="split"))(stacked, x)
  for i, w in enumerate(ws):
    np.testing.assert_allclose(out[i], np.asarray(x[i]) @ ttm_full(w.cores), rtol=1e-5, atol=1e-5)
  wb = jax.tree_util.tree_map(lambda c: c.astype(jnp.bfloat16), ws[0])
  yb = L.matvec_split(wb, x[0].astype(jnp.bfloat16))
  ref = np.asarray(x[0].astype(jnp.bfloat16), np.float64) @ ttm_full(
      [np.asarray(c, np.float64) for c in wb.cores])
  assert yb.dtype == jnp.bfloat16
  assert np.linalg.norm(np.asarray(yb, np.float64) - ref) / np.linalg.norm(ref) < 1e-2


def test_split_cost_model_prefers_two_core_layouts_with_small_intermediates():
  small_mid = tnjax.random_ttm(jax.random.key(0), (96, 8), (16, 192), rank=4)  # prefix: 16 x 4 x 8 per token
  big_mid = tnjax.random_ttm(jax.random.key(0), (8, 8, 12), (12, 16, 16), rank=8)
  assert L.choose_path(small_mid, 16384) == "split"
  assert cost._best_split(tuple(c.shape for c in small_mid.cores), 16384, L.H100)[1:] == (1, "prefix")
  assert L.choose_path(big_mid, 16384) == "dense"


@pytest.mark.slow  # default suite time; test_plan checks direct's gradients against float64
def test_direct_gradient_numerically(rng):
  w = _ttm(2, (2, 3, 2), (2, 2, 3), 2)
  x = jnp.asarray(rng.standard_normal((3, 12)))
  check_grads(lambda w, x: L.matvec_direct(w, x), (w, x), order=1, modes=("rev",))
  check_grads(lambda w, x: L.matvec_dense(w, x), (w, x), order=2, modes=("fwd", "rev"))


def test_direct_backward_keeps_only_input_and_cores():
  w = _ttm(0, (4, 4, 4), (4, 4, 4), 8, jnp.float32)
  x = jnp.ones((256, 64), jnp.float32)
  _, vjp = jax.vjp(lambda w, x: L.matvec_direct(w, x), w, x)
  saved = sum(leaf.size for leaf in jax.tree_util.tree_leaves(vjp))
  assert saved == x.size + w.num_params
  _, vjp_einsum = jax.vjp(tnjax.matvec, w, x)  # plain autodiff keeps intermediates too
  assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(vjp_einsum)) > saved


def test_vmap_and_batch_shapes(rng):
  ws = [_ttm(s, (2, 3), (3, 2), 2) for s in range(3)]
  stacked = jax.tree_util.tree_map(lambda *c: jnp.stack(c), *ws)
  x = jnp.asarray(rng.standard_normal((3, 4, 6)))
  out = jax.vmap(lambda w, x: L.linear(w, x, path="direct"))(stacked, x)
  for i, w in enumerate(ws):
    np.testing.assert_allclose(out[i], np.asarray(x[i]) @ ttm_full(w.cores), atol=1e-10)


def test_cost_model_picks_split_for_one_token_and_dense_for_16k_at_rank_64():
  # as measured on an H100 (benchmarks/results/decode_h100.jsonl): at one token the two merged factors beat
  # core-by-core absorption, and rebuilding W costs more than both
  w = tnjax.random_ttm(jax.random.key(0), (8, 8, 12), (12, 16, 16), rank=64)
  assert L.choose_path(w, 1) == "split"
  assert L.path_costs(w, 1)["dense"] > L.path_costs(w, 1)["direct"]
  assert L.choose_path(w, 16384) == "dense"
  costs = L.path_costs(w, 16384)
  assert costs["direct"] > 10 * costs["dense"]  # the intermediates are memory-bound


def test_auto_path_runs_the_chosen_path():
  w = tnjax.random_ttm(jax.random.key(0), (8, 8, 12), (12, 16, 16), rank=64)
  one = jax.make_jaxpr(lambda x: L.linear(w, x))(jnp.ones((1, 768), jnp.float32))
  many = jax.make_jaxpr(lambda x: L.linear(w, x))(jnp.ones((16384, 768), jnp.float32))
  assert "f32[768,3072]" in str(many) and "f32[768,3072]" not in str(one)  # W rebuilt only for many tokens
  assert "custom_vjp_call" not in str(one)  # the split path, not the direct one


def test_transpose_and_gather_rows(rng):
  w = _ttm(3, (3, 4, 5), (2, 3, 2), 3)
  dense = ttm_full(w.cores)
  np.testing.assert_allclose(tnjax.to_dense(ops.transpose(w)), dense.T, atol=1e-12)
  ids = jnp.asarray(rng.integers(0, 60, size=(4, 7)))
  np.testing.assert_allclose(L.gather_rows(w, ids), dense[np.asarray(ids)], atol=1e-12)
  np.testing.assert_allclose(jax.jit(L.gather_rows)(w, ids[0]), dense[np.asarray(ids[0])], atol=1e-12)
  one = _ttm(4, (9,), (4,), 1)
  np.testing.assert_allclose(L.gather_rows(one, ids[0] % 9), ttm_full(one.cores)[np.asarray(ids[0]) % 9])
  four = _ttm(5, (2, 3, 2, 2), (2, 2, 3, 2), 3)
  np.testing.assert_allclose(L.gather_rows(four, ids % 24), ttm_full(four.cores)[np.asarray(ids) % 24], atol=1e-12)


@pytest.mark.parametrize("vocab_dims", [(27, 38, 49), (54, 76, 98)])
def test_gather_rows_never_builds_the_table(vocab_dims):
  w = tnjax.random_ttm(jax.random.key(0), vocab_dims, (8, 8, 12), rank=32)
  jaxpr = jax.make_jaxpr(L.gather_rows)(w, jnp.zeros((4, 16), jnp.int32))
  largest = max(np.prod(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars)
  assert largest < w.shape[0] * w.shape[1] / 10


def test_gather_rows_split_balances_tables_and_tokens():
  shapes = ((1, 27, 8, 64), (64, 38, 8, 64), (64, 49, 12, 1))
  assert gather._gather_split(shapes, 16) == 2  # a (1026, 64, 64) prefix and the last core


def test_linear_errors():
  w = _ttm(0, (2, 3), (3, 2), 2)
  with pytest.raises(ValueError, match=r"linear: path='fast' but one of \('auto', 'dense', 'direct', 'split', 'fus"):
    L.linear(w, jnp.ones((2, 6)), path="fast")
  with pytest.raises(ValueError, match=r"matvec_direct: order=\(0, 0\) but a connected order of cores 0..1"):
    L.matvec_direct(w, jnp.ones((2, 6)), order=(0, 0))
  w3 = _ttm(0, (2, 3, 2), (3, 2, 2), 2)
  with pytest.raises(ValueError, match=r"matvec_direct: order=\(0, 2, 1\) but a connected order"):
    L.matvec_direct(w3, jnp.ones((2, 12)), order=(0, 2, 1))
  with pytest.raises(ValueError, match=r"matvec_dense: x.shape\[-1\]=5 but prod\(in_dims\)=6"):
    L.matvec_dense(w, jnp.ones((2, 5)))
  with pytest.raises(ValueError, match=r"matvec_split: split=2 but a bond 1..1 is expected"):
    L.matvec_split(w, jnp.ones((2, 6)), split=2)
  with pytest.raises(ValueError, match=r"matvec_split: split=1 but a bond 1..0 is expected \(a single-core"):
    L.matvec_split(_ttm(0, (6,), (4,), 1), jnp.ones((2, 6)), split=1)
  with pytest.raises(ValueError, match=r"matvec_split: order='middle' but one of \('prefix', 'suffix'\)"):
    L.matvec_split(w, jnp.ones((2, 6)), order="middle")
  with pytest.raises(ValueError, match=r"matvec_split: x.shape\[-1\]=5 but prod\(in_dims\)=6"):
    L.matvec_split(w, jnp.ones((2, 5)))
  with pytest.raises(ValueError, match=r"gather_rows: ids.dtype=float64 but an integer dtype"):
    L.gather_rows(w, jnp.ones(3))
