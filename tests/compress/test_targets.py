"""One meaning of a target, allocations, the registry, data-aware MPO and embeddings, sequential calibration."""

import itertools
import re

import jax.numpy as jnp
import numpy as np
import pytest

from tnjax.compress import (
  REGISTRY,
  btt_compress,
  input_grams,
  mpo_compress,
  svd_compress,
  svdllm_compress,
  tensorgpt_embedding,
)
from tnjax.compress.calibration import calibration_pass
from tnjax.compress.registry import compress, methods_table
from tnjax.compress.report import summary
from tnjax.compress.targets import Target, layer_budgets, loss_ranks
from tnjax.core.btt import btt_to_dense
from tnjax.core.ops import to_dense
from tnjax.core.whitening import whitened_btt, whitened_ttm_svd
from tnjax.models.decoder import dense_kernel


def test_loss_ranks_is_within_one_step_of_the_budgeted_optimum():
  """Greedy by loss removed per parameter: within the budget, no worse than brute force with max(unit) fewer
  parameters, never better than brute force with the budget."""
  rng = np.random.default_rng(0)
  spectra = {k: np.sort(rng.gamma(0.5, size=5))[::-1] for k in "abc"}
  unit, stored = {"a": 2, "b": 3, "c": 5}, {"a": 11, "b": 16, "c": 26}
  for budget in (17, 25, 33):
    got = loss_ranks(spectra, unit, stored, budget)
    loss = lambda r: sum((spectra[k][r[k]:] ** 2).sum() / (spectra[k] ** 2).sum() for k in r)  # noqa: E731
    def best(b, loss=loss):
      return min((dict(zip("abc", rs)) for rs in itertools.product(range(1, 6), repeat=3)
                  if sum(r * unit[k] for r, k in zip(rs, "abc")) <= b
                  and all(r * unit[k] < stored[k] for r, k in zip(rs, "abc"))), key=loss)

    assert sum(got[k] * unit[k] for k in got) <= budget
    assert loss(best(budget)) - 1e-12 <= loss(got) <= loss(best(budget - 5)) + 1e-12


DEFAULT_RUN = {("svd", "importance"), ("svdllm", "loss")}  # the rest: slow run (suite time)


@pytest.mark.parametrize("method,allocation", [
    pytest.param(m, a, marks=() if (m, a) in DEFAULT_RUN else pytest.mark.slow)
    for m in ("svd", "svdllm", "mpo", "mpo-data", "btt", "btt-data") for a in ("uniform", "importance", "loss")])
def test_a_ratio_is_the_fraction_of_the_part_kept(trained, ids, method, allocation):
  calib = input_grams(trained, ids)
  small = compress(trained, method, ratio=0.5, allocation=allocation,
                   calib=None if (method in ("svd", "mpo", "btt") and allocation != "importance") else calib)
  names = [f"h.{i}.{p}" for i in range(2) for p in trained.config.PROJECTIONS]
  kept = summary(trained, small, names)["part_kept"]
  assert 0.3 < kept <= 0.5 + 0.01  # biases (kept whole) are the slack


@pytest.mark.slow  # default suite time; .ci/run runs it
def test_allocations_differ_as_documented(trained, ids):
  calib = input_grams(trained, ids)
  stored = {f"h.{i}.mlp.c_fc": 16384 for i in range(2)}
  t = Target.of("f", ratio=0.5)
  imp = layer_budgets("f", t, "importance", stored, importance=calib.importance)
  more = int(np.argmax(calib.importance))
  assert imp[f"h.{more}.mlp.c_fc"] > imp[f"h.{1 - more}.mlp.c_fc"]
  assert sum(imp.values()) == pytest.approx(0.5 * sum(stored.values()))
  # loss: a layer whose spectrum is flat gets more rank than one whose energy sits in a few directions
  spectra = {"h.0.mlp.c_fc": np.ones(64), "h.1.mlp.c_fc": np.r_[10.0, np.full(63, 0.01)]}
  loss = layer_budgets("f", t, "loss", stored, unit={k: 320 for k in stored}, spectra=spectra.get)
  assert loss["h.0.mlp.c_fc"] > loss["h.1.mlp.c_fc"] and sum(loss.values()) <= 0.5 * sum(stored.values())


@pytest.mark.slow  # default suite time; tests/core/test_whitening.py tests the data-aware TT fit by default
def test_data_aware_mpo_has_lower_output_error_than_weight_mpo(trained, ids):
  calib = input_grams(trained, ids)
  x = trained(ids)
  plain, data = (mpo_compress(trained, ratio=0.3, fit=f, calib=calib) for f in ("weights", "data"))
  assert plain.num_params == data.num_params
  err = lambda m: float(jnp.linalg.norm(m(ids) - x))  # noqa: E731
  assert err(data) < err(plain)
  for name in ("h.0.mlp.c_fc", "h.1.attn.c_proj"):  # each layer's own output error on the calibration inputs
    w = np.asarray(dense_kernel(trained.layer(name)), np.float64)
    g = calib.grams[name]

    def out_err(kernel, w=w, g=g):
      d = w - np.asarray(kernel, np.float64)
      return np.trace(d.T @ g @ d)

    layer = data.layer(name)  # per layer: the better of the two same-size fits in the full metric
    kron = whitened_ttm_svd(jnp.asarray(w), jnp.asarray(g), layer.in_dims, layer.out_dims, max_rank=max(layer.ranks))
    kron = np.asarray(to_dense(kron))[: w.shape[0], : w.shape[1]]
    best = min(out_err(dense_kernel(plain.layer(name))), out_err(kron))
    assert out_err(dense_kernel(layer)) == pytest.approx(best, rel=1e-6)


@pytest.mark.slow  # default suite time (tests/core/test_whitened_btt.py tests the fit itself by default)
def test_data_aware_btt_has_lower_output_error_than_weight_btt(trained, ids):
  """Same sizes; each layer is `whitened_btt` of its kernel in its input Gram, and the model's logits move less."""
  calib = input_grams(trained, ids)
  names = ["h.0.mlp.c_fc", "h.1.attn.c_proj"]
  plain, data = (btt_compress(trained, ratio=0.3, layers=names, fit=f, calib=calib) for f in ("weights", "data"))
  assert plain.num_params == data.num_params < trained.num_params
  x = trained(ids)
  err = lambda m: float(jnp.linalg.norm(m(ids) - x))  # noqa: E731
  assert err(data) < err(plain)
  for name in names:
    w, layer = dense_kernel(trained.layer(name)), data.layer(name)
    want = btt_to_dense(whitened_btt(w, jnp.asarray(calib.grams[name], w.dtype), layer.in_dims, layer.out_dims,
                                     layer.rank))
    np.testing.assert_allclose(np.asarray(dense_kernel(layer)), np.asarray(want)[: w.shape[0], : w.shape[1]],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # default suite time; .ci/run runs it
def test_sequential_calibration_measures_each_block_on_the_compressed_blocks(trained, ids):
  one_pass = input_grams(trained, ids)
  first = svdllm_compress(trained, one_pass, rank=4, layers=["h.0.attn.c_proj", "h.0.mlp.c_fc"])

  def refit(i, grams):  # block 0 replaced by first's layers, nothing after
    return {p: first.layer(f"h.0.{p}") for p in ("attn.c_proj", "mlp.c_fc")} if i == 0 else {}

  seq = calibration_pass("test", trained, ids, refit)
  want = input_grams(first, ids)
  assert seq.sequential
  for name in want.grams:
    ref = one_pass if name.startswith("h.0.") else want  # block 0 is measured before its compression
    np.testing.assert_allclose(seq.grams[name], ref.grams[name], rtol=1e-5, atol=1e-6 * np.abs(ref.grams[name]).max())
  assert not np.allclose(seq.grams["h.1.mlp.c_fc"], one_pass.grams["h.1.mlp.c_fc"])
  # the method: block 0 is fitted on the model's own states, block 1 on those of the compressed block 0
  small = svdllm_compress(trained, ids, rank=4, sequential=True)
  block = lambda i: [f"h.{i}.{p}" for p in trained.config.PROJECTIONS]  # noqa: E731
  zero = svdllm_compress(trained, one_pass, rank=4, layers=block(0))
  again = svdllm_compress(zero, input_grams(zero, ids), rank=4, layers=block(1))
  for p in trained.config.PROJECTIONS:
    np.testing.assert_allclose(dense_kernel(small.layer(f"h.1.{p}")), dense_kernel(again.layer(f"h.1.{p}")),
                               rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match=r"svdllm_compress: sequential=True but calib is a Calibration"):
    svdllm_compress(trained, one_pass, rank=4, sequential=True)


def test_frequency_weighted_embedding_fits_frequent_tokens_better(trained, ids):
  table = np.asarray(trained.embedding_table, np.float64)
  counts = input_grams(trained, ids).token_counts + 1.0
  plain = tensorgpt_embedding(trained, rank=8, form="lowrank")
  weighted = tensorgpt_embedding(trained, rank=8, form="lowrank", calib=ids)
  assert plain.wte.num_params == weighted.wte.num_params == 8 * (128 + 64)
  err = lambda m, c: float(np.sum(c[:, None] * (np.asarray(m.embedding_table, np.float64) - table) ** 2))  # noqa
  assert err(weighted, counts) < err(plain, counts)
  assert err(plain, np.ones_like(counts)) < err(weighted, np.ones_like(counts))  # each is best in its own metric
  # the exact weighted optimum: the rank-8 truncation of D^1/2 E, unweighted
  u, s, vt = np.linalg.svd(np.sqrt(counts)[:, None] * table, full_matrices=False)
  best = ((u[:, :8] * s[:8]) @ vt[:8]) / np.sqrt(counts)[:, None]
  np.testing.assert_allclose(np.asarray(weighted.embedding_table, np.float64), best, atol=1e-4)
  tied = np.asarray(weighted(ids))  # a tied head reads the compressed table
  assert np.isfinite(tied).all() and weighted.lm_head is None


def test_registry_drives_the_cli_and_the_docs():
  from tnjax.cli import _parser

  parser = _parser()
  sub = next(a for a in parser._actions if a.dest == "command").choices["compress"]
  method = next(a for a in sub._actions if a.dest == "method")
  assert list(method.choices) == list(REGISTRY)
  page = (__import__("pathlib").Path(__file__).parents[2] / "docs" / "tutorials" / "compress.md").read_text()
  assert methods_table() in page, "docs/tutorials/compress.md must hold methods_table() verbatim"
  with pytest.raises(ValueError, match=re.escape(f"compress: method='pca' but one of {tuple(REGISTRY)}")):
    compress(None, "pca", ratio=0.5)


@pytest.mark.slow  # default suite time; .ci/run runs it
def test_keep_leaves_layers_that_cannot_shrink_and_allow_writes_them(trained):
  base = svd_compress(trained, rank=1, layers=["mlp.c_fc"])  # rank 1 has nothing to halve
  kept = svd_compress(base, ratio=0.5, if_larger="keep")
  assert kept.h[0].mlp.c_fc.rank == 1 and kept.h[0].attn.c_attn.rank < 64 and kept.num_params < base.num_params
  grown = svd_compress(trained, rank=64, layers=["h.0.attn.c_proj"], if_larger="allow")
  assert grown.num_params > trained.num_params


@pytest.mark.slow  # default suite time; .ci/run runs it
def test_an_untied_head_keeps_the_dense_table(trained, ids):
  small = tensorgpt_embedding(trained, rank=2, form="lowrank", head="dense")
  assert not small.config.tie_embeddings and small.lm_head is not None
  np.testing.assert_array_equal(np.asarray(small.lm_head.kernel[...]).T, np.asarray(trained.embedding_table))
  x = trained.embed(ids)  # the same hidden states read by both heads give the same logits
  np.testing.assert_allclose(small.lm_head(x), trained.wte.attend(x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"tensorgpt_embedding: head='none' but one of \('tied', 'dense'\)"):
    tensorgpt_embedding(trained, rank=2, head="none")
