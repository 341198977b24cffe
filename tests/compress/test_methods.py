import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tnjax.core.whitening
from tests.compress.conftest import check_error_falls, rel_err
from tnjax.compress import (
  btt_compress,
  choose_layers,
  count_bytes,
  get_layer,
  heal,
  input_grams,
  layer_sensitivity,
  modegpt_compress,
  mpo_compress,
  quantize_int8,
  resolve_layers,
  svd_compress,
  svdllm_compress,
  tensorgpt_embedding,
)
from tnjax.compress.registry import compress
from tnjax.compress.report import summary
from tnjax.core.btt import btt_dims, btt_to_dense
from tnjax.core.whitening import whitened_btt
from tnjax.eval import perplexity
from tnjax.interop import load_model, save_model
from tnjax.models import GPT, preset
from tnjax.models.decoder import dense_kernel
from tnjax.nn import Int8Linear, LowRankLinear, MPSEmbedding, TTEmbedding, TTMLinear

EXACT = [
    ("svd full rank", lambda m, ids: svd_compress(m, rank=256, if_larger="allow")),
    ("svd ratio 1", lambda m, ids: svd_compress(m, ratio=1.0)),
    ("mpo exact", lambda m, ids: mpo_compress(m, rank=10**6, if_larger="allow")),
    ("mpo ratio 1", lambda m, ids: mpo_compress(m, ratio=1)),
    ("btt exact", lambda m, ids: btt_compress(m, rank=10**6, if_larger="allow")),
    ("tensorgpt mps exact", lambda m, ids: tensorgpt_embedding(m, rank=10**6, if_larger="allow")),
    ("tensorgpt ttm exact", lambda m, ids: tensorgpt_embedding(m, rank=10**6, form="ttm", if_larger="allow")),
    ("tensorgpt ratio 1", lambda m, ids: tensorgpt_embedding(m, ratio=1.0)),
    ("modegpt ratio 1", lambda m, ids: modegpt_compress(m, ids, ratio=1.0)),
]


@pytest.mark.parametrize("name,method", EXACT, ids=[e[0] for e in EXACT])
def test_full_rank_or_ratio_1_leaves_logits_unchanged(trained, ids, name, method):
  out = method(trained, ids)
  np.testing.assert_allclose(out(ids), trained(ids), atol=1e-4)


SWEEPS = [
    # error vs rank, whatever the size: growth allowed
    ("svd", lambda m, ids, r: svd_compress(m, rank=r, if_larger="allow"), [2, 8, 32]),
    ("mpo", lambda m, ids, r: mpo_compress(m, rank=r, if_larger="allow"), [2, 8, 32]),
    pytest.param("btt", lambda m, ids, r: btt_compress(m, rank=r, if_larger="allow"), [1, 4, 16],
                 marks=pytest.mark.slow, id="btt"),
    pytest.param("btt-data", lambda m, ids, r: btt_compress(m, rank=r, fit="data", calib=ids, if_larger="allow"),
                 [1, 4, 16], marks=pytest.mark.slow, id="btt-data"),
    ("tensorgpt", lambda m, ids, r: tensorgpt_embedding(m, rank=r, if_larger="allow"), [1, 2, 4]),
    ("tensorgpt ttm", lambda m, ids, r: tensorgpt_embedding(m, rank=r, form="ttm", if_larger="allow"), [2, 8, 32]),
    pytest.param("modegpt", lambda m, ids, r: modegpt_compress(m, ids, ratio=r, allocation="uniform"),
                 [0.3, 0.6, 0.9], marks=pytest.mark.slow, id="modegpt"),
]


@pytest.mark.parametrize("name,method,ranks", SWEEPS, ids=[getattr(s, "id", None) or s[0] for s in SWEEPS])
def test_error_falls_as_rank_grows(trained, ids, name, method, ranks):
  check_error_falls(trained, ids, method, ranks)


@pytest.mark.slow  # default suite time
def test_parameter_accounting_is_exact(trained):
  cfg = trained.config
  d, f = cfg.d_model, cfg.ff_dim
  svd = svd_compress(trained, rank=4, layers=["h.0.mlp.c_fc"])
  assert isinstance(svd.h[0].mlp.c_fc, LowRankLinear)
  assert trained.num_params - svd.num_params == d * f - 4 * (d + f)
  r = 0.5
  svd = svd_compress(trained, ratio=r, layers="mlp.c_proj")
  rank = int(r * d * f // (d + f))
  assert svd.h[1].mlp.c_proj.rank == rank
  mpo = mpo_compress(trained, rank=3, layers=["h.1.attn.c_proj"])
  layer = mpo.h[1].attn.c_proj
  assert isinstance(layer, TTMLinear) and max(layer.ranks) == 3
  assert trained.num_params - mpo.num_params == d * d - sum(c.size for c in layer.ttm.cores)
  # TensorGPT: rank 1 rows cost sum(feature_dims); the ratio is vocab * d / stored.
  tg = tensorgpt_embedding(trained, rank=1, feature_dims=(4, 4, 4))
  assert isinstance(tg.wte, MPSEmbedding) and tg.wte.num_params == 128 * 12
  assert summary(trained, tg, ["embedding"])["part_compression"] == pytest.approx(64 / 12)
  # Ratios keep at most the requested fraction of each layer's weights.
  for method in (svd_compress, mpo_compress):
    out = method(trained, ratio=0.4)
    s = summary(trained, out, [f"h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "mlp.c_fc")])
    for row in s["layers"]:
      assert row["kept"] <= 0.4 + 0.02  # the bias (kept whole) is the slack


def test_config_records_per_bond_ranks_and_loading_checks_tt_cores(trained, tmp_path):
  """The config is the truth: tolerance-chosen ranks are in the layer spec, a model built from the config alone
  has the same core shapes, and a file whose cores disagree with it is refused by name."""
  from safetensors.numpy import load_file, save_file

  from tnjax.models import GPT

  small = tensorgpt_embedding(mpo_compress(trained, rtol=0.3, layers=["mlp.c_fc"], if_larger="allow"), rtol=0.3,
                              if_larger="allow")
  for name, layer in (("h.0.mlp.c_fc", small.h[0].mlp.c_fc), ("h.1.mlp.c_fc", small.h[1].mlp.c_fc),
                      ("embedding", small.wte)):
    assert small.config.spec_of(name).ranks == layer.ranks[1:-1]
  rebuilt = nnx.eval_shape(lambda: GPT(small.config, rngs=nnx.Rngs(0)))
  for a, b in ((rebuilt.h[1].mlp.c_fc, small.h[1].mlp.c_fc), (rebuilt.wte, small.wte)):
    assert [c.shape for c in a.cores] == [c.shape for c in b.cores]
  path = save_model(small, tmp_path / "m") / "model.safetensors"
  tensors = load_file(str(path))
  core = tensors["h.1.mlp.c_fc.cores.0"]
  tensors["h.1.mlp.c_fc.cores.0"] = np.concatenate([core, core[..., :1]], axis=-1)
  save_file(tensors, str(path))
  with pytest.raises(ValueError, match=r"load_model: parameter h.1.mlp.c_fc.cores.0 has shape \(1, 4, 4, \d+\) "
                                       r"but \(1, 4, 4, \d+\) is expected"):
    load_model(tmp_path / "m")


def test_tensorgpt_ratio_and_rtol(trained):
  table = trained.wte.embedding[...]
  tg = tensorgpt_embedding(trained, ratio=0.3)
  assert tg.wte.num_params <= 0.3 * table.size
  tg = tensorgpt_embedding(trained, rtol=0.3, if_larger="allow")
  rows = tg.wte.embedding
  per_row = jnp.linalg.norm(rows - table, axis=1) / jnp.linalg.norm(table, axis=1)
  assert float(per_row.max()) <= 0.3 + 1e-9
  ttm = tensorgpt_embedding(trained, rank=4, form="ttm")
  assert isinstance(ttm.wte, TTEmbedding) and ttm.lm_head is None  # the head stays tied


def test_int8_round_trip_and_bytes(trained, ids):
  q = quantize_int8(trained)
  assert isinstance(q.h[0].mlp.c_fc, Int8Linear)
  for i in range(2):
    for name in ("c_fc", "c_proj"):
      w, layer = getattr(trained.h[i].mlp, name).kernel[...], getattr(q.h[i].mlp, name)
      bound = layer.scale[...] / 2
      assert bool(jnp.all(jnp.abs(w - layer.kernel) <= bound * (1 + 1e-6)))
  # int8 weights: one byte each, plus a float32 scale per output column.
  d, f = trained.config.d_model, trained.config.ff_dim
  w8 = 2 * (d * 3 * d + d * d + 2 * d * f)
  scales = 2 * (3 * d + d + f + d)
  assert count_bytes(trained) - count_bytes(q) == 4 * w8 - (w8 + 4 * scales)
  assert rel_err(q, trained(ids), ids) < 0.02


@pytest.mark.slow  # two compressions, then int8 on each
def test_int8_on_top_of_mpo_and_svd(trained, ids):
  """Cores and factors quantized, logits close to the float model."""
  for base in (mpo_compress(trained, rank=8), svd_compress(trained, rank=8)):
    assert rel_err(quantize_int8(base), base(ids), ids) < 0.02


@pytest.mark.parametrize("make", [
    lambda m, ids: svd_compress(m, ratio=0.5),
    pytest.param(lambda m, ids: quantize_int8(mpo_compress(m, rtol=0.5)), marks=pytest.mark.slow),
    lambda m, ids: tensorgpt_embedding(m, rtol=0.2, if_larger="allow"),
    lambda m, ids: quantize_int8(svd_compress(m, rank=4)),
    pytest.param(lambda m, ids: modegpt_compress(m, ids, ratio=0.5), marks=pytest.mark.slow),  # suite time
], ids=["svd", "mpo-rtol-int8", "tensorgpt-rtol", "svd-int8", "modegpt"])
def test_save_load_round_trip(trained, ids, tmp_path, make):
  small = make(trained, ids)
  loaded = load_model(save_model(small, tmp_path / "m"))
  assert loaded.config == small.config
  np.testing.assert_allclose(loaded(ids), small(ids), atol=1e-6)


@pytest.mark.parametrize("make", [functools.partial(svd_compress, rank=3), functools.partial(mpo_compress, rank=2),
                                  lambda m, layers: quantize_int8(svd_compress(m, rank=3, layers=layers))],
                         ids=["svd", "mpo", "svd-int8"])
def test_sensitivity_is_each_compressed_models_perplexity(trained, tokens, make):
  """The one-graph probe (reconstructed kernel in a copy of the model) scores what the compressed model scores."""
  valid = tokens[16000:16600]
  before = trained(tokens[None, :64])
  sens = layer_sensitivity(trained, valid, make, layers=["h.1.attn.c_attn", "h.0.mlp.c_proj"])
  for name, v in sens["layers"].items():
    own = perplexity(make(trained, layers=[name]), valid)["perplexity"]
    # rel 1e-3: int8's probe multiplies by the dequantized kernel, the layer scales after the product
    assert v["perplexity"] == pytest.approx(own, rel=1e-3) and v["perplexity"] != sens["base"]
  np.testing.assert_array_equal(trained(tokens[None, :64]), before)  # the model is left as it was


@pytest.mark.slow  # default suite time; .ci/run runs it
def test_sensitivity_choose_and_heal(trained, tokens):
  valid = tokens[16000:17000]
  sens = layer_sensitivity(trained, valid, functools.partial(mpo_compress, rank=2), layers=["mlp.c_fc"])
  assert set(sens["layers"]) == {"h.0.mlp.c_fc", "h.1.mlp.c_fc"}
  for v in sens["layers"].values():
    assert v["params_saved"] > 0 and v["perplexity"] == pytest.approx(sens["base"] * (1 + v["increase"]))
  one = choose_layers(sens, 1)
  assert len(one) == 1 and sens["layers"][one[0]]["increase"] == min(v["increase"] for v in sens["layers"].values())
  with pytest.raises(ValueError, match="removes only"):
    choose_layers(sens, 10**9)
  small = svd_compress(trained, rank=2)
  before = perplexity(small, valid)["perplexity"]
  healed = heal(small, tokens[:16000], 30, lr=2e-3, batch_size=8)  # under strict promotion, as the suite runs
  assert healed.config == small.config
  assert perplexity(healed, valid)["perplexity"] < before


@pytest.mark.parametrize("call,match", [
    (lambda m, ids: svd_compress(m, ratio=0.0), r"svd_compress: ratio=0.0 but 0 < ratio <= 1"),
    (lambda m, ids: mpo_compress(m, ratio=1.5), r"mpo_compress: ratio=1.5 but 0 < ratio <= 1"),
    (lambda m, ids: svd_compress(m, rank=0), r"svd_compress: rank=0"),
    (lambda m, ids: mpo_compress(m, rank=0), r"mpo_compress: rank=0 but a positive integer"),
    (lambda m, ids: mpo_compress(m, rank=True), r"mpo_compress: rank=True but a positive integer"),
    (lambda m, ids: svd_compress(m), r"svd_compress: no target; give exactly one of rank, ratio, rtol"),
    (lambda m, ids: svd_compress(m, rtol=-1.0), r"svd_compress: rtol=-1.0 but a finite number >= 0"),
    (lambda m, ids: svd_compress(m, rank=10**5), r"svd_compress: rank=100000 would give layer 'h.0.attn.c_attn' "
                                                 r"16,384 parameters but it stores 12,288 now"),
    (lambda m, ids: tensorgpt_embedding(m, rank=10**5), r"tensorgpt_embedding: rank=100000 would give the "
                                                        r"embedding"),
    (lambda m, ids: svd_compress(m, rank=2, if_larger="grow"), r"svd_compress: if_larger='grow' but one of"),
    (lambda m, ids: svd_compress(m, rank=2, allocation="loss"), r"svd_compress: allocation='loss' with rank=2 but "
                                                                r"an allocation spreads a ratio"),
    (lambda m, ids: svd_compress(m, ratio=0.5, allocation="importance"), r"svd_compress: calib=None but "
                                                                         r"allocation=importance needs"),
    (lambda m, ids: svd_compress(m, ratio=0.01, allocation="loss"), r"allocation='loss' needs 2,048 parameters "
                                                                    r"for rank 1 in every layer"),
    (lambda m, ids: svd_compress(m, ratio=0.5, allocation="greedy"), r"svd_compress: allocation='greedy'"),
    (lambda m, ids: svdllm_compress(m, ids[:2], ratio=0.5), r"svdllm_compress: calib has 128 tokens but layer "
                                                            r"'h.0.mlp.c_proj' reads 256 features"),
    (lambda m, ids: svdllm_compress(m, None, ratio=0.5), r"svdllm_compress: calib=None but SVD-LLM needs"),
    (lambda m, ids: mpo_compress(m, ratio=0.5, fit="data"), r"mpo_compress: calib=None but this fit needs"),
    (lambda m, ids: mpo_compress(m, ratio=0.5, fit="output"), r"mpo_compress: fit='output' but one of"),
    (lambda m, ids: mpo_compress(m, ratio=0.5, sequential=True), r"mpo_compress: sequential=True but this fit "
                                                                 r"does not read calibration"),
    (lambda m, ids: tensorgpt_embedding(m, rank=2, calib=ids),
     r"tensorgpt_embedding: calib given with form='mps' but only form='lowrank'"),
    (lambda m, ids: compress(m, "svd", ratio=0.5, form="ttm"), r"compress: form='ttm' but svd takes no other"),
    (lambda m, ids: compress(m, "tensorgpt", rank=2, layers=["mlp.c_fc"]), r"compress: layers=\['mlp.c_fc'\] but "
                                                                           r"tensorgpt compresses the embedding only"),
    (lambda m, ids: compress(m, "svdllm", ratio=0.5), r"compress: method='svdllm' needs calibration text"),
    (lambda m, ids: compress(m, "svd", ratio=0.5, sequential=True, calib=ids), r"compress: sequential=True but "
                                                                               r"svd does not calibrate"),
    (lambda m, ids: compress(m, "tensorgpt", ratio=0.5, allocation="loss"), r"compress: allocation='loss' but one "
                                                                            r"of \('uniform',\)"),
    (lambda m, ids: tensorgpt_embedding(m, rank=0), r"tensorgpt_embedding: rank=0"),
    (lambda m, ids: mpo_compress(m, rank=2, ratio=0.5), r"mpo_compress: rank=2 and ratio=0.5 but exactly one"),
    (lambda m, ids: svd_compress(m, rank=2, layers=["h.7.mlp.c_fc"]), r"svd_compress: unknown layer name 'h.7"),
    (lambda m, ids: mpo_compress(m, rank=2, layers=["mlp.fc"]), r"mpo_compress: unknown layer name 'mlp.fc'"),
    (lambda m, ids: svd_compress(m, rank=2, layers=["lm_head"]), r"unknown layer name 'lm_head'.*untied head"),
    (lambda m, ids: modegpt_compress(m, None, ratio=0.5), r"modegpt_compress: calib=None but MoDeGPT needs"),
    (lambda m, ids: modegpt_compress(m, ids, ratio=0.0), r"modegpt_compress: ratio=0.0"),
    (lambda m, ids: modegpt_compress(m, ids, ratio=0.5, allocation="even"), r"allocation='even'"),
    (lambda m, ids: tensorgpt_embedding(m, rank=2, form="mpo"), r"form='mpo' but one of \('mps', 'ttm', 'lowrank'\)"),
    (lambda m, ids: quantize_int8(quantize_int8(m)), r"quantize_int8: layer 'h.0.attn.c_attn' is already"),
    (lambda m, ids: heal(quantize_int8(m), np.arange(200) % 128, 2), r"heal: layers .* are int8"),
    (lambda m, ids: compress(m, "modegpt", rank=4, calib=ids), r"compress: rank=4 but this method takes only ratio"),
    (lambda m, ids: compress(m, "pca", rank=4), r"compress: method='pca' but one of"),
])
def test_bad_arguments(trained, ids, call, match):
  with pytest.raises(ValueError, match=match):
    call(trained, ids)


@pytest.mark.slow  # three compressions, jit and grad each
def test_compressed_models_jit_and_grad(trained, ids):
  """A compressed model is an ordinary NNX model: jit, and gradients reach the cores and factors."""
  for small in (mpo_compress(trained, rank=4), tensorgpt_embedding(trained, rank=2),
                modegpt_compress(trained, ids, ratio=0.5)):
    graphdef, params, rest = nnx.split(small, nnx.Param, ...)

    def loss(p, graphdef=graphdef, rest=rest):
      return jnp.mean(nnx.merge(graphdef, p, rest)(ids) ** 2)

    np.testing.assert_allclose(jax.jit(loss)(params), loss(params), rtol=1e-6)
    grads = jax.jit(jax.grad(loss))(params)  # jitted: an eager grad took most of this test's time
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))


def test_mpo_gram_method_matches_svd(trained, ids):
  ref = trained(ids)
  errs = [rel_err(mpo_compress(trained, rank=8, method=m), ref, ids) for m in ("svd", "gram")]
  assert errs[1] == pytest.approx(errs[0], rel=0.01)
  with pytest.raises(ValueError, match=r"ttm_svd: method='fast' but one of"):
    mpo_compress(trained, rank=8, method="fast")


@pytest.mark.slow  # nine compressions
def test_ratio_counts_stored_weights_so_recompressing_never_grows(trained):
  """A ratio is a fraction of what a layer stores now: an MPO or low-rank model compressed again gets smaller
  (or stays), never back toward dense size."""
  for base in (mpo_compress(trained, rank=4), svd_compress(trained, rank=4), tensorgpt_embedding(trained, rank=2)):
    for method in (svd_compress, mpo_compress, tensorgpt_embedding):
      out = method(base, ratio=0.5, if_larger="keep")
      assert out.num_params <= base.num_params, (method.__name__, base.num_params, out.num_params)
  with pytest.raises(ValueError, match=r"svd_compress: ratio=0.5 would give layer 'h.0.attn.c_attn' no smaller form"):
    svd_compress(svd_compress(trained, rank=1), ratio=0.5)  # rank 1 has nothing to halve
  small = mpo_compress(trained, rank=8, layers=["h.0.mlp.c_fc"])
  again = mpo_compress(small, ratio=0.5, layers=["h.0.mlp.c_fc"])
  before = sum(c.size for c in small.h[0].mlp.c_fc.ttm.cores)
  assert sum(c.size for c in again.h[0].mlp.c_fc.ttm.cores) <= 0.5 * before


@pytest.mark.slow  # a d_model=256 model, several compressions
def test_mpo_fused_layout_uses_the_kernel_layout_and_keeps_it_through_save(tmp_path):
  from tnjax.models import GPT, preset

  model = GPT(preset("tiny", d_model=256), rngs=nnx.Rngs(0))
  ids = jnp.arange(24).reshape(2, 12)
  ref = model(ids)
  errs = []
  for chi in (4, 16):
    small = mpo_compress(model, rank=chi, layout="fused", layers=["mlp.c_fc", "mlp.c_proj"])
    errs.append(rel_err(small, ref, ids))
  up, down = small.h[1].mlp.c_fc, small.h[1].mlp.c_proj
  assert (up.in_dims, up.out_dims, up.ranks, up.path) == ((16, 16), (64, 16), (1, 16, 1), "fused")
  assert (down.in_dims, down.out_dims) == ((16, 64), (16, 16))
  assert errs[1] < errs[0]
  # off a GPU the fused path falls back to the cost model's pure-JAX path
  np.testing.assert_allclose(small(ids), jax.jit(lambda m, i: m(i))(small, ids), rtol=1e-5, atol=1e-5)
  save_model(small, tmp_path / "m")
  again = load_model(tmp_path / "m")
  assert again.h[1].mlp.c_fc.path == "fused"
  np.testing.assert_allclose(again(ids), small(ids), rtol=1e-5, atol=1e-6)
  by_name = compress(model, "mpo", rank=4, layout="fused", layers=["mlp.c_fc"])
  assert by_name.h[0].mlp.c_fc.path == "fused" and by_name.config.spec("mlp.c_fc", 0).in_dims == (16, 16)
  fitted = mpo_compress(model, ratio=0.5, layout="fused", layers=["mlp.c_fc"])
  assert max(fitted.h[0].mlp.c_fc.ranks) == 16  # ratio 0.5 would allow more; the kernel takes at most 16
  with pytest.raises(ValueError, match=r"mpo_compress: layout='wide' but one of \('balanced', 'fused'\) is expected"):
    mpo_compress(model, rank=4, layout="wide")
  with pytest.raises(ValueError, match=r"mpo_compress: rank=32 but the fused layout takes at most 16"):
    mpo_compress(model, rank=32, layout="fused")
  with pytest.raises(ValueError, match=r"mpo_compress: layer h.0.attn.c_attn is 128 x 384: fused_dims: in_features"):
    mpo_compress(GPT(preset("tiny"), rngs=nnx.Rngs(0)), rank=4, layout="fused")


def test_a_bf16_model_is_fitted_in_float32_and_keeps_its_dtype_and_heal_refuses_it():
  """Fits read float32 kernels (dense_kernel), and the new factors are stored like the layer they replace: a
  bf16 model's compressed layers do not double in bytes. Healing a bf16 model would lose Adam's updates."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from tnjax.compress import heal, svd_compress
  from tnjax.interop import model_tensors
  from tnjax.models import Llama, preset

  model = Llama(preset("llama-tiny"), rngs=nnx.Rngs(0))
  f32 = svd_compress(model, ratio=0.5)
  graphdef, state = nnx.split(model)
  bf16 = nnx.merge(graphdef, jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16)
                                                    if jnp.issubdtype(x.dtype, jnp.floating) else x, state))
  small = svd_compress(bf16, ratio=0.5)
  got, ref = model_tensors(small), model_tensors(f32)
  assert got["h.0.mlp.up_proj.u"].dtype == jnp.bfloat16 and got["h.0.attn.q_proj.v"].dtype == jnp.bfloat16
  # the same fit as the float32 model's, up to the inputs' bf16 rounding
  w = lambda t, k: np.asarray(t[f"{k}.u"], np.float32) @ np.asarray(t[f"{k}.v"], np.float32)  # noqa: E731
  k = "h.1.mlp.down_proj"
  assert np.linalg.norm(w(got, k) - w(ref, k)) < 0.05 * np.linalg.norm(w(ref, k))
  with pytest.raises(ValueError, match=r"heal: the model's parameters are \['bfloat16'\] but float32 is "
                                       r"expected to heal"):
    heal(bf16, np.arange(400) % 512, 1)


def _slow(*args):
  return pytest.param(*args, marks=pytest.mark.slow)  # default suite time: the fastest case of three runs by default


@pytest.mark.parametrize("name, options", [
    ("svd", {}), _slow("svd", {"allocation": "importance"}), _slow("svdllm", {}), _slow("mpo", {}),
    _slow("mpo-data", {}), _slow("btt", {}), _slow("btt-data", {}), _slow("modegpt", {"allocation": "importance"}),
    ("modegpt", {"allocation": "uniform"}),
    ("tensorgpt", {"form": "mps"}), _slow("tensorgpt", {"form": "lowrank"}), _slow("tensorgpt", {"form": "ttm"}),
])
def test_least_weights_from_shapes_equal_a_compression_at_the_smallest_ratio(trained, ids, name, options):
  """A method's ``least`` (shapes only, no fit) is what it keeps at ratio 1e-12, where every layer is at its
  smallest (layers with no smaller form kept as they are): the floor a ratio is refused below."""
  from tnjax.compress.registry import method
  from tnjax.compress.report import _part_weights, compressed_part

  m = method(name)
  model = trained
  if name == "svd":  # one layer already at rank 1: nothing smaller, so it stays as it is
    model = svd_compress(trained, rank=1, layers=["h.0.mlp.c_fc"])
  names = compressed_part(model, name)
  calib = ids if m.calibration == "required" or options.get("allocation") == "importance" else None
  small = compress(model, name, ratio=1e-12, calib=calib, if_larger="keep", **options)
  allocation = options.pop("allocation", "uniform")
  assert m.least(model, names, allocation=allocation, **options) == _part_weights(small, names)
  assert _part_weights(small, names) < _part_weights(model, names)


def _small_random_gpt():
  """An untrained d_model=32 GPT and 192 calibration tokens (at least every layer's width)."""
  cfg = preset("tiny", vocab_size=64, block_size=16, d_model=32, n_head=2)
  return GPT(cfg, rngs=nnx.Rngs(0)), np.random.default_rng(0).integers(0, 64, (12, 16))


@pytest.mark.parametrize("target", [{"rtol": 0.6}, {"ratio": 0.5, "allocation": "loss"}], ids=["rtol", "loss"])
def test_btt_data_fit_eighs_each_layers_blocks_once(monkeypatch, target):
  """The spectrum (of an rtol or of allocation="loss") and the fit read one eigendecomposition of each layer's
  block matrices; they computed it twice."""
  calls = []
  blocks = tnjax.core.whitening._btt_blocks
  monkeypatch.setattr(tnjax.core.whitening, "_btt_blocks", lambda *a: calls.append(1) or blocks(*a))
  model, ids = _small_random_gpt()
  btt_compress(model, fit="data", calib=ids, layers=["h.0.mlp.c_fc"], if_larger="allow", **target)
  assert len(calls) == 1


# (rank, ||W||_F, sum(W)) of each layer of btt_compress(fit="data") on `_small_random_gpt`, from the code before
# the spectrum and the fit shared their eigendecomposition (commit ccff23a, under these tests' XLA flags: the
# new code gives the same kernels bit for bit there).
BTT_DATA_BEFORE = {
    "rtol": [(3, 0.9672320690391416, 0.695149224193301), (2, 0.2661894272510801, -0.3634239946724449),
             (3, 1.0444439934962122, 0.4204074986628257), (3, 0.6885622421870078, 0.7089427572842624),
             (3, 0.938504031507662, 0.030339088873006403), (2, 0.2831545808290214, 0.37746063318422785),
             (3, 1.0592520738953455, 1.3081576666954788), (3, 0.7265682441475504, -0.41178352450094735)],
    "loss": [(3, 0.9672320690391416, 0.695149224193301), (3, 0.2952125311223839, -0.6237106367188971),
             (3, 1.0444439934962122, 0.4204074986628257), (2, 0.5735182213935808, 0.499109440203938),
             (3, 0.938504031507662, 0.030339088873006403), (3, 0.3109304886034307, 0.5399804081607726),
             (2, 0.920585485680859, 0.41911694080954476), (2, 0.640535742843694, 0.4626314444857371)],
}


@pytest.mark.slow  # 36 s; by default the eigh-once test and tests/core/test_whitened_btt.py cover the fit
@pytest.mark.parametrize("key, target", [("rtol", {"rtol": 0.6}), ("loss", {"ratio": 0.5, "allocation": "loss"})])
def test_btt_data_fit_is_unchanged_and_equals_the_float64_fit(key, target):
  model, ids = _small_random_gpt()
  small = btt_compress(model, fit="data", calib=ids, if_larger="allow", **target)
  grams = input_grams(model, ids).grams
  names = resolve_layers("test", model.config, None)
  for name, (rank, norm, total) in zip(names, BTT_DATA_BEFORE[key], strict=True):
    layer = get_layer(small, name)
    w = np.asarray(dense_kernel(layer), np.float64)
    assert layer.rank == rank, name
    np.testing.assert_allclose([np.linalg.norm(w), w.sum()], [norm, total], rtol=1e-5, atol=1e-5, err_msg=name)
    w0 = np.asarray(dense_kernel(get_layer(model, name)), np.float64)
    ref = btt_to_dense(whitened_btt(w0, grams[name], *btt_dims(*w0.shape), rank))[: w0.shape[0], : w0.shape[1]]
    np.testing.assert_allclose(w, np.asarray(ref), atol=1e-4 * np.abs(ref).max(), err_msg=name)
