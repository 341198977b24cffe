"""Per-direction path plans of tnjax.matvec (tnjax.core.contraction): the cost model's choice on a GPU (asked for
from the CPU with ``gpu=True``), that "auto" never picks or warns about the fused kernels off a GPU, and that
every plan gives the dense float64 reference's values and gradients (fused products in the Pallas
interpreter)."""

import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tnjax
from tests.core.reference import ttm_full
from tnjax.core import contraction as L
from tnjax.core.contraction import fused as F

RESULTS = pathlib.Path(__file__).parents[2] / "benchmarks" / "results"
FUSED_BOTH, FUSED_FWD, DENSE = L.Plan("fused", "fused", "fused"), L.Plan("fused", "dense", "dense"), L.Plan(
    "dense", "dense", "dense")


def _gpt2_layer(rank, layout="fused_dims", m=768, n=3072):
  """A GPT-2 projection's TT-matrix as shapes only (what the cost model reads)."""
  in_dims, out_dims = F.fused_dims(m, n) if layout == "fused_dims" else (tnjax.factorize(m, 3),
                                                                           tnjax.factorize(n, 3))
  ranks = [1] + [rank] * (len(in_dims) - 1) + [1]
  return tnjax.TTMatrix(tuple(jax.ShapeDtypeStruct((ranks[k], i, o, ranks[k + 1]), jnp.bfloat16)
                              for k, (i, o) in enumerate(zip(in_dims, out_dims))))


@pytest.mark.parametrize("rank, plan", [(4, FUSED_BOTH), (8, FUSED_FWD), (16, DENSE), (32, DENSE)])
def test_auto_on_a_gpu_picks_each_direction_as_measured_at_16k_tokens(rank, plan):
  # measured on an H100 (ttm_linear_fusedfwd_h100.jsonl, ttm_linear_h100.jsonl), fwd+bwd over dense:
  # r4 "fused" 0.92x < "fused_fwd" 1.03x < rebuild-W 1.08x; r8 "fused_fwd" 1.05x < rebuild-W 1.06x < "fused"
  # 1.19x; r16 the kernel's forward alone is 1.21x; r32 is beyond the kernel's ranks
  assert L.choose_plan(_gpt2_layer(rank), 16384, gpu=True) == plan
  assert L.choose_plan(_gpt2_layer(rank, "ttm3"), 16384, gpu=True) == DENSE  # three cores: no kernel


@pytest.mark.parametrize("tokens", [1, 4, 16, 64])
def test_auto_on_a_gpu_decodes_with_the_forward_kernel(tokens):
  # measured (decode_h100.jsonl): the kernel beats split, the best XLA path, at 1-64 tokens, ranks 8 and 16
  for rank in (8, 16):
    assert L.choose_path(_gpt2_layer(rank), tokens, gpu=True) == "fused"
    assert L.choose_path(_gpt2_layer(rank, m=3072, n=768), tokens, gpu=True) == "fused"
  assert L.choose_path(_gpt2_layer(8, "ttm3"), tokens, gpu=True) == "split"


def test_fused_estimates_match_the_measured_ratios():
  """The model's fwd+bwd estimate of each plan over rebuild-W's, against the same ratio measured (+-15%)."""
  rows = [json.loads(line) for line in (RESULTS / "ttm_linear_fusedfwd_h100.jsonl").read_text().splitlines()]
  rows = [row for row in rows if row.get("mode") == "fwd+bwd"]
  assert [row["rank"] for row in rows] == [4, 8]
  for row in rows:
    ttm = _gpt2_layer(row["rank"])
    dense = L.plan_seconds(ttm, row["tokens"], DENSE)
    for name, plan in (("fused", FUSED_BOTH), ("fused_fwd", FUSED_FWD)):
      measured = row["seconds"][name] / row["seconds"]["dense"]
      assert L.plan_seconds(ttm, row["tokens"], plan) / dense == pytest.approx(measured, rel=0.15), (row, name)


def test_auto_never_picks_fused_off_a_gpu_and_never_warns(rng):
  assert jax.default_backend() != "gpu"
  w = tnjax.random_ttm(jax.random.key(0), (4, 16), (16, 4), rank=4, dtype=jnp.float32)
  x = jnp.asarray(rng.standard_normal((5, 64)), jnp.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for tokens in (1, 64, 16384):
      assert "fused" not in L.choose_plan(w, tokens)
      assert "fused" not in L.choose_plan(_gpt2_layer(4), tokens)
      assert "fused" not in L.product_costs(_gpt2_layer(4), tokens)["forward"]
    assert "fused" not in L.choose_plan(w, 5, gpu=False)
    jax.grad(lambda w: jnp.sum(tnjax.matvec(w, x) ** 2))(w)
  assert L.choose_plan(w, 5, gpu=True) == FUSED_BOTH  # the same layout would run the kernels on a GPU


# the fused products run in the Pallas interpreter: float32 there, float64 for the XLA-only plans
PLANS = [FUSED_BOTH, FUSED_FWD, ("split", "dense", "direct"), "auto-gpu"]
MORE_PLANS = [("fused", "split", "direct"), ("dense", "fused", "fused"), ("direct", "split", "dense"),
              ("dense", "direct", "split")]
CASES = ([pytest.param(p, jit, id=f"{p}-{'jit' if jit else 'eager'}") for p in PLANS for jit in (False, True)]
         + [pytest.param(p, False, id=f"{p}-eager") for p in MORE_PLANS]
         + [pytest.param(p, True, id=f"{p}-jit", marks=pytest.mark.slow) for p in MORE_PLANS])


@pytest.mark.parametrize("plan, jit", CASES)
def test_every_plan_equals_the_float64_reference(rng, plan, jit):
  tokens = 6
  w = tnjax.random_ttm(jax.random.key(1), (4, 16), (16, 4), rank=3, dtype=jnp.float64)
  if plan == "auto-gpu":
    plan = L.choose_plan(w, tokens, gpu=True)
    assert "fused" in plan
  dtype = jnp.float32 if "fused" in plan else jnp.float64
  w = jax.tree_util.tree_map(lambda c: c.astype(dtype), w)
  x = rng.standard_normal((2, tokens // 2, 64))
  g = rng.standard_normal((2, tokens // 2, 64))
  full = ttm_full(w.cores)
  tol = dict(rtol=1e-4, atol=1e-4) if dtype == jnp.float32 else dict(rtol=1e-10, atol=1e-10)

  def loss(w, x):
    return jnp.sum(tnjax.matvec(w, x, path=plan, interpret=True) * g.astype(dtype))

  run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))) if jit else jax.value_and_grad(loss, argnums=(0, 1))
  value, (dw, dx) = run(w, jnp.asarray(x, dtype))
  np.testing.assert_allclose(value, np.sum((x @ full) * g), **tol)
  np.testing.assert_allclose(dx, g @ full.T, **tol)
  w64 = jax.tree_util.tree_map(lambda c: jnp.asarray(c, jnp.float64), w)
  _, project = jax.vjp(tnjax.to_dense, w64)
  (ref,) = project(jnp.asarray(x.reshape(-1, 64).T @ g.reshape(-1, 64)))
  for got, want in zip(dw.cores, ref.cores):
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, **tol)


def test_a_mixed_plan_keeps_only_input_and_cores():
  w = tnjax.random_ttm(jax.random.key(0), (4, 4, 4), (4, 4, 4), rank=8, dtype=jnp.float32)
  x = jnp.ones((256, 64), jnp.float32)
  _, vjp = jax.vjp(lambda w, x: tnjax.matvec(w, x, path=("split", "dense", "direct")), w, x)
  assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(vjp)) == x.size + w.num_params


def test_one_front_door():
  w = tnjax.random_ttm(jax.random.key(0), (2, 3, 2), (3, 2, 2), rank=3, dtype=jnp.float64)
  x = jnp.ones((4, 12))
  assert tnjax.matvec is L.matvec is tnjax.core.ops.matvec
  for path in ("auto", "einsum", ("split", "dense", "direct")):
    np.testing.assert_allclose(L.linear(w, x, path=path), tnjax.matvec(w, x, path=path), rtol=1e-12)
  one = tnjax.random_ttm(jax.random.key(0), (6,), (5,), rank=1, dtype=jnp.float64)
  y = tnjax.matvec(one, jnp.ones((2, 6)), path=("split", "direct", "split"))
  np.testing.assert_allclose(y, jnp.ones((2, 6)) @ ttm_full(one.cores), rtol=1e-12)
  btt = tnjax.random_btt(jax.random.key(0), (3, 4), (4, 3), rank=2, dtype=jnp.float64)
  np.testing.assert_allclose(tnjax.matvec(btt, x), x @ tnjax.to_dense(btt), rtol=1e-10, atol=1e-12)


def test_explicit_fused_off_a_gpu_warns_with_the_reason_and_runs_auto(rng):
  w = tnjax.random_ttm(jax.random.key(0), (4, 16), (16, 4), rank=4, dtype=jnp.float32)
  x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
  want = tnjax.matvec(w, x)
  for path in ("fused", "fused_fwd", ("fused", "dense", "dense"), L.Plan("split", "fused", "fused")):
    with pytest.warns(UserWarning, match=r"matvec: path=.* falls back to 'auto': the default backend is 'cpu'"):
      np.testing.assert_allclose(tnjax.matvec(w, x, path=path), want, rtol=1e-6)
  with pytest.warns(UserWarning, match=r"path='fused' falls back to 'auto': x.dtype=float64 but the kernels take one "
                                      r"of \('float32', 'bfloat16'\)"):
    w64 = jax.tree_util.tree_map(lambda c: c.astype(jnp.float64), w)
    np.testing.assert_allclose(tnjax.matvec(w64, x.astype(jnp.float64), path="fused", interpret=True), want,
                               rtol=1e-5)
  with pytest.warns(UserWarning, match=r"falls back to 'auto': rank 32 but at most 16 is supported"):
    tnjax.matvec(tnjax.random_ttm(jax.random.key(0), (4, 16), (16, 4), rank=32), jnp.ones((2, 64), jnp.float32),
                 path="fused", interpret=True)


@pytest.mark.parametrize("path, match", [
    ("fast", r"matvec: path='fast' but one of \('auto', 'dense', 'direct', 'split', 'fused', 'fused_fwd', "
             r"'einsum'\) is expected \(or a Plan\)"),
    (("dense", "dense"), r"matvec: path=\('dense', 'dense'\) but a name in .* or a Plan of 3 paths "
                         r"\('forward', 'input_grad', 'core_grad'\) is expected"),
    (("dense", "auto", "einsum"), r"matvec: path has input_grad='auto', core_grad='einsum' but each product "
                                  r"takes one of \('dense', 'direct', 'split', 'fused'\)"),
    (("fused", "fused", "dense"), r"matvec: path=\('fused', 'fused', 'dense'\) but input_grad and core_grad are "
                                  r"'fused' together or not at all"),
])
def test_errors(path, match):
  w = tnjax.random_ttm(jax.random.key(0), (2, 3), (3, 2), rank=2)
  with pytest.raises(ValueError, match=match):
    tnjax.matvec(w, jnp.ones((2, 6)), path=path)


def test_block_tt_takes_only_auto():
  btt = tnjax.random_btt(jax.random.key(0), (3, 4), (4, 3), rank=2, dtype=jnp.float64)
  with pytest.raises(ValueError, match=r"matvec: path='split' but a BlockTT has one path \(two batched matmuls\)"):
    tnjax.matvec(btt, jnp.ones((2, 12)), path="split")


def test_on_a_gpu_auto_keeps_float64_on_the_xla_paths(rng, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # what "auto" sees on a GPU; nothing compiles for it
  w = tnjax.random_ttm(jax.random.key(0), (4, 16), (16, 4), rank=4, dtype=jnp.float64)
  x = rng.standard_normal((5, 64))
  assert L.choose_plan(w, 5) == FUSED_BOTH  # the kernels are candidates for float32 and bfloat16 inputs
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    np.testing.assert_allclose(tnjax.matvec(w, x), x @ ttm_full(w.cores), rtol=1e-10, atol=1e-10)
