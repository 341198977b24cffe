"""Per-projection input Grams from one calibration pass, for GPT-2 and Llama-style models, and their use:
the whitened SVD of a real layer has lower output error on the calibration activations than plain SVD."""

import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tnjax
from tnjax.compress import heal, mpo_compress, progress_bars, projection_names, svd_compress, svdllm_compress
from tnjax.compress.calibration import calibration_pass, input_grams
from tnjax.models import GPT, Llama, preset
from tnjax.models.decoder import dense_kernel


def _inputs(model, ids):
  """Every projection's input, by the blocks' own trace, in float64 (the reference)."""
  x = model.embed(jnp.asarray(ids)).astype(jnp.float32)
  out = {}
  for i, block in enumerate(model.h):
    x, acts = block.trace(x)
    for name, inp in acts["inputs"].items():
      out[f"h.{i}.{name}"] = np.asarray(inp, np.float64).reshape(-1, inp.shape[-1])
  return out


@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_grams_equal_the_inputs_gram_summed_over_batches(name):
  cfg = preset(name)
  model = (Llama if name == "llama-tiny" else GPT)(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, cfg.vocab_size, (2, 12)).astype(np.int32) for _ in range(2)]
  cal = input_grams(model, batches)
  grams = cal.grams
  assert cal.tokens == 48 and not cal.sequential and len(cal.importance) == cfg.n_layer
  np.testing.assert_array_equal(cal.token_counts, np.bincount(np.concatenate([b.ravel() for b in batches]),
                                                              minlength=cfg.vocab_size))
  names = {f"h.{i}.{p}" for i in range(cfg.n_layer) for p in type(cfg).PROJECTIONS}
  assert set(grams) == names
  ref = [_inputs(model, b) for b in batches]
  for key, g in grams.items():
    want = sum(r[key].T @ r[key] for r in ref)
    assert g.dtype == np.float64
    np.testing.assert_allclose(g, want, rtol=2e-4, atol=1e-3 * np.abs(want).max())


@pytest.mark.slow  # test_svdllm_beats_svd_at_equal_size... covers the method by default
def test_whitened_svd_on_calibrated_grams_beats_plain_svd_on_the_layer_outputs():
  model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
  ids = np.random.default_rng(1).integers(0, 512, (4, 32)).astype(np.int32)
  grams = input_grams(model, ids).grams
  x = _inputs(model, ids)["h.1.attn.c_proj"]
  w = np.asarray(model.h[1].attn.c_proj.kernel[...], np.float64)
  a, b = tnjax.whitened_svd(jnp.asarray(w), jnp.asarray(grams["h.1.attn.c_proj"]), 16)
  u, s, vt = np.linalg.svd(w)
  plain = (u[:, :16] * s[:16]) @ vt[:16]
  assert np.linalg.norm(x @ (w - np.asarray(a @ b))) < np.linalg.norm(x @ (w - plain))


@pytest.mark.parametrize("batches", [[], np.zeros((2, 3), np.float32), [np.zeros((0, 4), np.int32)]])
def test_bad_batches(batches):
  with pytest.raises(ValueError, match=r"input_grams: batches must be one or more non-empty integer id arrays"):
    input_grams(GPT(preset("tiny"), rngs=nnx.Rngs(0)), batches)


@pytest.mark.slow  # default suite time; .ci/run runs it
def test_svdllm_beats_svd_at_equal_size():
  model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  calib = rng.integers(0, 512, (8, 64)).astype(np.int32)
  x = calib[:2]
  ref = np.asarray(model(jnp.asarray(x)))
  small, plain = svdllm_compress(model, calib, ratio=0.5), svd_compress(model, ratio=0.5)
  assert small.num_params == plain.num_params < model.num_params
  err = lambda m: np.linalg.norm(np.asarray(m(jnp.asarray(x))) - ref)  # noqa: E731
  assert err(small) < err(plain)
  with pytest.raises(ValueError, match=r"svdllm_compress: no target; give exactly one of rank, ratio, rtol"):
    svdllm_compress(model, calib)
  with pytest.raises(ValueError, match=r"svdllm_compress: calib=None but SVD-LLM needs calibration"):
    svdllm_compress(model, None, ratio=0.5)


@pytest.mark.slow  # two more compressions of the tiny GPT
def test_svdllm_is_exact_at_full_rank_and_bounds_output_error_by_rtol():
  model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
  calib = np.random.default_rng(0).integers(0, 512, (8, 64)).astype(np.int32)
  x = calib[:2]
  ref = np.asarray(model(jnp.asarray(x)))
  full = svdllm_compress(model, calib, rank=10_000, layers=["mlp.c_proj"], if_larger="allow")  # full rank: exact
  np.testing.assert_allclose(np.asarray(full(jnp.asarray(x))), ref, atol=2e-3)
  # rtol bounds each layer's output error on the calibration inputs
  bounded = svdllm_compress(model, calib, rtol=0.3, layers=["h.1.mlp.c_fc"])
  inp = _inputs(model, calib)["h.1.mlp.c_fc"]
  w = np.asarray(model.h[1].mlp.c_fc.kernel[...], np.float64)
  got = np.asarray(bounded.h[1].mlp.c_fc.kernel, np.float64)
  assert np.linalg.norm(inp @ (w - got)) <= 0.3 * np.linalg.norm(inp @ w) * (1 + 1e-3)
  assert bounded.h[1].mlp.c_fc.rank < 128


def test_compress_run_svdllm_needs_calibration_text(tmp_path):
  from tnjax.compress.report import run

  with pytest.raises(ValueError, match=r"compress: method 'svdllm' needs calibration text \(--calib FILE\)"):
    run(GPT(preset("tiny"), rngs=nnx.Rngs(0)), "svdllm", tmp_path / "o", targets=[{"ratio": 0.5}])


def test_projections_reading_one_input_share_one_stored_gram():
  cfg = preset("llama-tiny")
  model = Llama(cfg, rngs=nnx.Rngs(0))
  grams = input_grams(model, np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)).astype(np.int32)).grams
  for i in range(cfg.n_layer):
    q, k, v, o = (grams[f"h.{i}.attn.{p}"] for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    gate, up, down = (grams[f"h.{i}.mlp.{p}"] for p in ("gate_proj", "up_proj", "down_proj"))
    assert q is k is v and gate is up and len({id(g) for g in (q, o, gate, down)}) == 4
  gpt = input_grams(GPT(preset("tiny"), rngs=nnx.Rngs(0)), np.zeros((1, 8), np.int32)).grams
  assert len({id(g) for g in gpt.values()}) == len(gpt)  # GPT-2: every projection its own input


def test_compensated_sums_do_not_grow_rounding_with_the_number_of_batches():
  from tnjax.compress.calibration import _compensated_add

  values = np.random.default_rng(0).uniform(0, 1, (4000, 8)).astype(np.float32) + np.float32(1e4)
  exact = values.astype(np.float64).sum(0)
  total = (jnp.zeros(8, jnp.float32), jnp.zeros(8, jnp.float32))
  naive = np.zeros(8, np.float32)
  add = jax.jit(_compensated_add)
  for v in values:
    total = add(total, jnp.asarray(v))
    naive += v
  assert np.abs(np.asarray(total[0], np.float64) - exact).max() <= 2 * np.spacing(np.float32(exact.max()))
  assert np.abs(naive.astype(np.float64) - exact).max() > 50 * np.spacing(np.float32(exact.max()))


def test_the_gpu_gram_algorithm_is_float32_accurate(monkeypatch):
  """The GPU's six-pass bf16 product (run here on the CPU, which implements it too) against float64: to float32's
  rounding, where a single bf16 pass is 1000x worse. Activation-like data: one outlier feature."""
  from tnjax.compress import calibration

  z = np.random.default_rng(0).standard_normal((4096, 32)).astype(np.float32) * np.r_[30.0, np.ones(31)]
  exact = z.astype(np.float64).T @ z.astype(np.float64)
  err = lambda p: np.abs(np.asarray(jnp.matmul(z.T, z, precision=p), np.float64) - exact).max() / exact.max()  # noqa: E731
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  six = err(calibration.gram_precision())
  assert six < 1e-6  # float32's own rounding over 4096 terms is of this order
  assert err(jax.lax.DotAlgorithmPreset.BF16_BF16_F32) > 1000 * six
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert calibration.gram_precision() == jax.lax.Precision.HIGHEST


SMALL = dict(d_model=64, n_head=4, vocab_size=128)  # the shapes of the trained fixture: compilations shared


def _gpt_or_llama(name):
  return (Llama if name == "llama-tiny" else GPT)(preset(name, **SMALL), rngs=nnx.Rngs(0))


STREAMED = [
    ("svdllm", lambda m, calib: svdllm_compress(m, calib, ratio=0.5)),
    pytest.param("mpo-data", lambda m, calib: mpo_compress(m, calib=calib, ratio=0.5, fit="data"),
                 marks=pytest.mark.slow),  # default suite time; svdllm streams through the same hook
]


@pytest.mark.parametrize("name", [pytest.param("tiny", marks=pytest.mark.slow), "llama-tiny"])  # GPT: slow run
@pytest.mark.parametrize("method,make", STREAMED, ids=["svdllm", "mpo-data"])
def test_fits_streamed_block_by_block_equal_the_fits_from_a_precomputed_calibration(name, method, make):
  model = _gpt_or_llama(name)
  ids = np.random.default_rng(0).integers(0, 128, (4, 64)).astype(np.int32)  # as many tokens as the widest input
  streamed, whole = make(model, ids), make(model, input_grams(model, ids))
  assert streamed.config == whole.config
  a, b = (jax.tree_util.tree_leaves(nnx.state(m, nnx.Param)) for m in (streamed, whole))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_a_streamed_fit_holds_one_blocks_grams_at_a_time(monkeypatch):
  """Every Gram the pass makes is watched by a weakref (an observer hook wrapping the method's, or standing in for
  it when the method runs the plain pass); while block i + 1 is measured, no Gram of an earlier block is alive."""
  from tnjax.compress import calibration, methods

  cfg = preset("tiny", n_layer=3, **SMALL)
  model = GPT(cfg, rngs=nnx.Rngs(0))
  ids = np.random.default_rng(0).integers(0, 128, (4, 64)).astype(np.int32)
  watched, alive, passes = [], [], []
  real_pass, real_stats = calibration.calibration_pass, calibration._block_stats

  def watching_pass(fn, model, batches, refit=None, **kw):
    def observe(i, grams):
      watched.append([weakref.ref(g) for g in grams.values()])
      return {} if refit is None else refit(i, grams)

    passes.append(real_pass(fn, model, batches, observe, **kw))
    return passes[-1]

  def counting_stats(block, x, totals):
    alive.append(sum(any(r() is not None for r in refs) for refs in watched))  # earlier blocks with a live Gram
    return real_stats(block, x, totals)

  monkeypatch.setattr(methods, "calibration_pass", watching_pass)
  monkeypatch.setattr(calibration, "_block_stats", counting_stats)
  small = svdllm_compress(model, ids, ratio=0.5)
  assert len(passes) == 1 and len(watched) == cfg.n_layer and len(alive) == cfg.n_layer  # one batch: one call a block
  assert alive == [0] * cfg.n_layer
  assert passes[0].grams == {} and len(passes[0].importance) == cfg.n_layer
  assert small.config.spec("mlp.c_fc", 2).kind == "lowrank"


def test_data_aware_fits_refuse_layers_outside_the_blocks_and_a_calibration_without_their_grams():
  model = GPT(preset("tiny", tie_embeddings=False, **SMALL), rngs=nnx.Rngs(0))
  ids = np.random.default_rng(0).integers(0, 128, (4, 64)).astype(np.int32)
  for calib in (ids, input_grams(model, ids)):  # calibration measures inputs in the blocks: no Gram for the head
    with pytest.raises(ValueError, match=r"svdllm_compress: layers \['lm_head'\] are not in a block but this fit "
                                         r"reads each layer's input Gram"):
      svdllm_compress(model, calib, rank=4, layers=["lm_head"])
  counts_only = calibration_pass("test", model, ids, keep_grams=False)
  assert counts_only.grams == {} and counts_only.tokens == 256 and len(counts_only.importance) == 2
  with pytest.raises(ValueError, match=r"svdllm_compress: calib is a Calibration without the Grams of "
                                       r"\['h.0.attn.c_attn', 'h.0.attn.c_proj', 'h.0.mlp.c_fc'\]\.\.\. \(a pass with "
                                       r"keep_grams=False"):
    svdllm_compress(model, counts_only, rank=4)


def test_a_pass_is_sequential_only_when_blocks_were_replaced():
  """A streamed one-pass fit's refit returns {}: its states are the model's own, so the pass is not sequential."""
  from tnjax.compress.calibration import calibration_pass

  model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
  ids = np.zeros((1, 8), np.int32)
  assert not calibration_pass("t", model, ids, lambda i, grams: {}).sequential
  assert calibration_pass("t", model, ids, lambda i, grams: {"attn.c_proj": model.h[i].attn.c_proj}).sequential


@pytest.mark.slow  # default suite time
def test_sequential_fits_with_the_loss_allocation_read_the_sequential_grams():
  """allocation="loss" ranks layers by spectra of a one-pass calibration; the fits of a sequential run must then
  read the Grams measured on the compressed blocks (they reused the one-pass factorization, so block 1 was fitted
  to inputs it never sees)."""
  from tnjax.compress.methods import _balanced
  from tnjax.core.whitening import whitened_basis

  model = GPT(preset("tiny", **SMALL), rngs=nnx.Rngs(0))
  ids = np.random.default_rng(1).integers(0, 128, (4, 64)).astype(np.int32)
  out = svdllm_compress(model, ids, ratio=0.5, allocation="loss", sequential=True)
  projections = model.config.PROJECTIONS
  seq = calibration_pass("test", model, ids, lambda i, grams: {p: out.layer(f"h.0.{p}") for p in projections}
                         if i == 0 else {})
  one_pass = input_grams(model, ids)
  for p in projections:
    name = f"h.1.{p}"
    w, got = dense_kernel(model.layer(name)), out.layer(name)
    u, v = _balanced(w, whitened_basis(w, jnp.asarray(seq.grams[name], w.dtype))[1], got.rank)
    np.testing.assert_allclose(np.asarray(got.u[...] @ got.v[...]), u @ v, rtol=1e-4, atol=1e-5)
    assert not np.allclose(seq.grams[name], one_pass.grams[name])  # the two Grams differ: the check can fail


@pytest.mark.parametrize("streamed", [True, pytest.param(False, marks=pytest.mark.slow)])  # default suite time
def test_projections_sharing_an_input_share_one_whitening(monkeypatch, streamed):
  """Llama's q/k/v and gate/up read one input: one Gram, so one eigendecomposition for each group (4 a block for
  7 projections), streamed or from a Calibration."""
  from tnjax.compress import methods

  model = _gpt_or_llama("llama-tiny")
  ids = np.random.default_rng(0).integers(0, 128, (4, 64)).astype(np.int32)
  calls = []
  real = methods.whitening
  monkeypatch.setattr(methods, "whitening", lambda g, **kw: calls.append(g.shape) or real(g, **kw))
  svdllm_compress(model, ids if streamed else input_grams(model, ids), ratio=0.5)
  assert len(calls) == 4 * model.config.n_layer, calls


def test_progress_bars_count_blocks_layers_and_heal_steps_only_inside_progress_bars(trained, ids, tokens, capsys):
  svd_compress(trained, ratio=0.5)
  assert capsys.readouterr().err == ""  # a library call prints nothing by default
  n = len(projection_names(trained.config))
  with progress_bars():
    svdllm_compress(trained, ids, ratio=0.5)  # streamed: the calibration pass fits block by block
    svd_compress(trained, ratio=0.5)
    heal(trained, tokens[:4000], 2, batch_size=2, block_size=16)
  err = capsys.readouterr().err
  assert "svdllm_compress: blocks" in err and f"{trained.config.n_layer}/{trained.config.n_layer}" in err
  assert "svd_compress: fit" in err and f"{n}/{n}" in err
  assert "heal" in err and "2/2" in err
  with progress_bars():
    heal(trained, tokens[:4000], 1, batch_size=2, block_size=16, progress=False)  # the argument wins
  assert capsys.readouterr().err == ""
