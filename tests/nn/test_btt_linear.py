import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tnjax.compress import quantize_int8
from tnjax.interop import load_model, save_hf_gpt2, save_model
from tnjax.models import GPT, preset
from tnjax.nn import BTTLinear


def _x(shape, seed=1):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("in_f, out_f, in_dims, out_dims", [
    (24, 36, None, None), pytest.param(50, 30, (8, 7), (5, 6), marks=pytest.mark.slow), (7, 5, (4, 2), (3, 2))])
def test_full_rank_reproduces_nnx_linear_with_padding(in_f, out_f, in_dims, out_dims):
  ref = nnx.Linear(in_f, out_f, rngs=nnx.Rngs(0), bias_init=nnx.initializers.normal(1.0))
  probe = BTTLinear(in_f, out_f, rank=1, in_dims=in_dims, out_dims=out_dims, rngs=nnx.Rngs(0))
  full = min(probe.in_dims[0], probe.out_dims[1])
  layer = BTTLinear.from_dense(ref.kernel[...], ref.bias[...], rank=full, in_dims=in_dims, out_dims=out_dims)
  x = _x((4, in_f))
  np.testing.assert_allclose(layer(x), ref(x), atol=1e-5)
  np.testing.assert_allclose(jax.jit(lambda m, x: m(x))(layer, x), ref(x), atol=1e-5)
  assert layer.kernel.shape == (in_f, out_f)


def test_counts_init_scale_grad_and_vmap():
  layer = BTTLinear(768, 3072, rank=4, kernel_std=0.02, rngs=nnx.Rngs(0))
  assert layer.num_params == 4 * (768 * 48 + 3072 * 24) + 3072
  assert abs(float(jnp.std(layer.kernel)) - 0.02) < 0.001
  x = _x((3, 768))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
  assert all(bool(jnp.any(g != 0)) for g in jax.tree_util.tree_leaves(grads))
  batched = jax.vmap(lambda row: layer(row))(x)
  np.testing.assert_allclose(batched, layer(x), atol=1e-5)


@pytest.mark.slow
def test_bfloat16_compute_and_int8_storage():
  layer = BTTLinear(64, 96, rank=4, rngs=nnx.Rngs(0))
  x = _x((5, 64))
  half = BTTLinear(64, 96, btt=layer.btt, dtype=jnp.bfloat16)
  assert half(x).dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half(x), np.float32), layer(x), rtol=0.05, atol=0.05)
  q = BTTLinear(64, 96, btt=layer.btt, quant="int8")
  assert q.cores[0][...].dtype == jnp.int8
  np.testing.assert_allclose(q(x), layer(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("make, match", [
    (lambda: BTTLinear(64, 96, rank=20, rngs=nnx.Rngs(0)), r"BTTLinear: rank=20 but .* min\(m1, n2\)=8"),
    (lambda: BTTLinear(64, 96, rank=2, in_dims=(4, 4), rngs=nnx.Rngs(0)), r"prod\(in_dims\)=16 but in_features=64"),
    (lambda: BTTLinear(64, 96, rank=2, in_dims=(4, 4, 4), rngs=nnx.Rngs(0)), "two factors each"),
    (lambda: BTTLinear(64, 96, rngs=nnx.Rngs(0)), "rank=None but a random init needs rank"),
    (lambda: BTTLinear(64, 96, btt=np.ones((3, 3))), "btt is a ndarray but a BlockTT is expected"),
    (lambda: BTTLinear.from_dense(np.ones(5), rank=1), r"kernel.shape=\(5,\)"),
])
def test_constructor_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_call_error():
  with pytest.raises(ValueError, match=r"BTTLinear: x.shape\[-1\]=5 but in_features=64"):
    BTTLinear(64, 96, rank=2, rngs=nnx.Rngs(0))(jnp.ones((2, 5)))


BTT_LAYERS = {"mlp.c_fc": {"kind": "btt", "rank": 4}, "mlp.c_proj": {"kind": "btt", "rank": 4},
              "h.1.attn.c_attn": {"kind": "btt", "rank": 1}}


@pytest.mark.slow  # end to end: save, load, HF export and int8
def test_gpt_with_btt_layers_saves_loads_exports_and_quantizes(tmp_path):
  from transformers import GPT2LMHeadModel

  from tests.hf_fixtures import hf_logits

  model = GPT(preset("tiny", vocab_size=300, block_size=32, layers=BTT_LAYERS), rngs=nnx.Rngs(0))
  assert isinstance(model.h[0].mlp.c_fc, BTTLinear) and model.h[1].attn.c_attn.rank == 1
  assert not isinstance(model.h[0].attn.c_attn, BTTLinear)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 17)), jnp.int32)
  save_model(model, tmp_path / "native")
  np.testing.assert_allclose(load_model(tmp_path / "native")(ids), model(ids), atol=1e-6)
  save_hf_gpt2(model, tmp_path / "hf")
  hf = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
  np.testing.assert_allclose(hf_logits(hf, np.asarray(ids)), model(ids), atol=1e-4)
  q = quantize_int8(model)
  assert isinstance(q.h[0].mlp.c_fc, BTTLinear) and q.h[0].mlp.c_fc.quant == "int8"
  assert q.config.spec("mlp.c_fc", 0).kind == "btt"
  np.testing.assert_allclose(q(ids), model(ids), atol=0.1)


def test_gpt_config_refuses_btt_specs_that_do_not_fit():
  with pytest.raises(ValueError, match=r"layers\['mlp.c_fc'\]: rank=100 but"):
    preset("tiny", layers={"mlp.c_fc": {"kind": "btt", "rank": 100}})
  with pytest.raises(ValueError, match=r"layers\['h.1.mlp.c_proj'\]: prod\(out_dims\)=64 but the projection has 128"):
    preset("tiny", layers={"h.1.mlp.c_proj": {"kind": "btt", "rank": 2, "out_dims": [8, 8]}})
  with pytest.raises(ValueError, match=r"layers\['embedding'\].kind='btt' but 'btt' is for projections"):
    preset("tiny", layers={"embedding": {"kind": "btt", "rank": 2}})


def test_blocks_give_every_projection_b_by_b_blocks_and_the_config_round_trips():
  """blocks=b: in_dims (ceil(m / b), b) and out_dims (b, ceil(n / b)) per projection, whatever its shape (a size b
  does not divide is padded), and the model computes x @ W of its dense-equivalent kernels."""
  from tnjax.models import Llama

  cfg = preset("llama-tiny", d_model=64, n_head=4, n_kv_head=2, d_ff=96, vocab_size=300, block_size=32,
               layers={"*": {"kind": "btt", "rank": 4, "blocks": 4}, "mlp.down_proj": {"kind": "btt", "rank": 2,
                                                                                         "blocks": 5}})
  model = Llama(cfg, rngs=nnx.Rngs(0))
  for name in cfg.PROJECTIONS:
    layer = model.h[0]
    for part in name.split("."):
      layer = getattr(layer, part)
    m, n = cfg.projection_shape(name, 0)
    b = 5 if name == "mlp.down_proj" else 4
    assert (layer.in_dims, layer.out_dims) == (((m + b - 1) // b, b), (b, (n + b - 1) // b)), name
    x = np.random.default_rng(1).standard_normal((3, m))
    np.testing.assert_allclose(layer(jnp.asarray(x, jnp.float32)), x @ np.asarray(layer.kernel, np.float64)
                               + (0 if layer.bias is None else np.asarray(layer.bias)), rtol=1e-4, atol=1e-4)
  back = type(cfg).from_json(cfg.to_json())  # what save_model writes and load_model builds from
  assert back == cfg and back.spec("mlp.up_proj", 0).blocks == 4


@pytest.mark.slow  # the config round trip above runs by default; this saves and loads the weights too
def test_a_model_with_blocks_saves_and_loads_with_the_same_logits(tmp_path):
  from tnjax.models import Llama

  cfg = preset("llama-tiny", d_model=64, n_head=4, n_kv_head=2, d_ff=96, vocab_size=300, block_size=32,
               layers={"*": {"kind": "btt", "rank": 4, "blocks": 4}})
  model = Llama(cfg, rngs=nnx.Rngs(0))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 9)), jnp.int32)
  save_model(model, tmp_path / "native")
  loaded = load_model(tmp_path / "native")
  assert loaded.config.spec("mlp.up_proj", 0).blocks == 4
  np.testing.assert_allclose(loaded(ids), model(ids), atol=1e-6)


@pytest.mark.parametrize("spec,match", [
    ({"kind": "ttm", "rank": 2, "blocks": 4}, r"layers\['mlp.c_fc'\].blocks=4 but blocks are for kind 'btt', not "
                                              r"'ttm'"),
    ({"kind": "btt", "rank": 2, "blocks": 0}, r"blocks=0 but a positive integer"),
    ({"kind": "btt", "rank": 2, "blocks": 4, "in_dims": [32, 4]}, r"gives blocks=4 and in_dims/out_dims but one"),
    ({"kind": "btt", "rank": 64, "blocks": 4}, r"layers\['mlp.c_fc'\]: rank=64 but each \(m1 x n2\) block has "
                                               r"rank at most min\(m1, n2\)=32"),
])
def test_bad_blocks_are_refused_by_name(spec, match):
  with pytest.raises(ValueError, match=match):
    preset("tiny", layers={"mlp.c_fc": spec})
