import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.hf_fixtures import hf_logits, make_hf_gpt2
from tnjax.interop import load_any, load_hf_gpt2, load_model, save_hf_gpt2, save_model
from tnjax.models import GPT, LayerSpec, preset
from tnjax.nn import LowRankEmbedding, TTMLinear

pytestmark = pytest.mark.filterwarnings("ignore")


def _ids(vocab, shape=(2, 17), seed=0):
  return np.random.default_rng(seed).integers(0, vocab, shape)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(tie_word_embeddings=False),
    pytest.param(dict(n_embd=48, n_head=3, n_layer=3, vocab_size=211, n_inner=80), marks=pytest.mark.slow),
    pytest.param(dict(n_embd=16, n_head=2, n_layer=1, n_positions=20, tie_word_embeddings=False,
                      layer_norm_epsilon=1e-3), marks=pytest.mark.slow),
])
def test_logits_match_transformers(tmp_path, overrides):
  hf = make_hf_gpt2(tmp_path, **overrides)
  model = load_hf_gpt2(tmp_path)
  ids = _ids(hf.config.vocab_size)
  np.testing.assert_allclose(model(jnp.asarray(ids)), hf_logits(hf, ids), atol=1e-4)


@pytest.mark.parametrize("tie", [True, False])
def test_save_hf_loads_in_transformers_with_same_logits(tmp_path, tie):
  from transformers import GPT2LMHeadModel

  hf = make_hf_gpt2(tmp_path / "in", tie_word_embeddings=tie)
  model = load_hf_gpt2(tmp_path / "in")
  save_hf_gpt2(model, tmp_path / "out")
  again = GPT2LMHeadModel.from_pretrained(str(tmp_path / "out")).eval()
  ids = _ids(101)
  np.testing.assert_allclose(hf_logits(again, ids), hf_logits(hf, ids), atol=1e-5)


@pytest.mark.slow  # ~7 s; .ci/run runs it
def test_tensorized_model_exports_dense_reconstruction(tmp_path):
  from transformers import GPT2LMHeadModel

  cfg = preset("tiny", vocab_size=300, block_size=32, layers={"embedding": {"kind": "ttm", "rank": 8},
                                                              "mlp.c_fc": {"kind": "ttm", "rank": 4},
                                                              "attn.c_proj": {"kind": "lowrank", "rank": 8}})
  model = GPT(cfg, rngs=nnx.Rngs(0))
  save_hf_gpt2(model, tmp_path)
  hf = GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
  ids = _ids(300)
  np.testing.assert_allclose(hf_logits(hf, ids), model(jnp.asarray(ids)), atol=1e-4)


@pytest.mark.parametrize("tie", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_low_rank_embedding_saves_natively_and_exports_dense(tmp_path, tie):
  from safetensors.numpy import load_file
  from transformers import GPT2LMHeadModel

  cfg = preset("tiny", tie_embeddings=tie, layers={"embedding": LayerSpec(kind="lowrank", rank=8)})
  model = GPT(cfg, rngs=nnx.Rngs(0))
  ids = jnp.asarray(_ids(512))
  logits = model(ids)
  # native: the factors are stored as factors and load back exactly
  again = load_model(save_model(model, tmp_path / "native"))
  assert again.config == cfg and isinstance(again.wte, LowRankEmbedding)
  np.testing.assert_array_equal(again.wte.u[...], model.wte.u[...])
  np.testing.assert_array_equal(again(ids), logits)
  stored = load_file(str(tmp_path / "native" / "model.safetensors"))
  assert {k: v.shape for k, v in stored.items() if k.startswith("wte.")} == {"wte.u": (512, 8), "wte.v": (8, 128)}
  # Hugging Face: the table u @ v written dense; a tied head stays tied to it
  save_hf_gpt2(model, tmp_path / "hf")
  hf = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
  np.testing.assert_allclose(hf_logits(hf, np.asarray(ids)), logits, atol=1e-4)
  dense = load_hf_gpt2(tmp_path / "hf")
  np.testing.assert_allclose(dense.embedding_table, model.embedding_table, atol=1e-6)
  np.testing.assert_allclose(dense(ids), logits, atol=1e-4)


def test_pytorch_bin_is_read_weights_only(tmp_path):
  import torch

  hf = make_hf_gpt2(tmp_path)
  (tmp_path / "model.safetensors").unlink()
  torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
  ids = _ids(101)
  np.testing.assert_allclose(load_hf_gpt2(tmp_path)(jnp.asarray(ids)), hf_logits(hf, ids), atol=1e-4)


@pytest.mark.parametrize("option, value", [("scale_attn_by_inverse_layer_idx", True),
                                           ("reorder_and_upcast_attn", True), ("add_cross_attention", True),
                                           ("scale_attn_weights", False), ("activation_function", "relu")])
def test_unsupported_options_are_refused_by_name(tmp_path, option, value):
  make_hf_gpt2(tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg[option] = value
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=rf"load_hf_gpt2: config option {option}=.* is not supported"):
    load_hf_gpt2(tmp_path)


def test_bad_checkpoints(tmp_path):
  from safetensors.numpy import load_file, save_file

  with pytest.raises(ValueError, match=r"load_hf_gpt2: .*config.json does not exist"):
    load_hf_gpt2(tmp_path)
  make_hf_gpt2(tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
  with pytest.raises(ValueError, match=r"load_hf_gpt2: config model_type='llama' but 'gpt2'"):
    load_hf_gpt2(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  tensors = load_file(str(tmp_path / "model.safetensors"))
  bad = dict(tensors)
  bad["transformer.h.1.mlp.c_fc.weight"] = np.zeros((32, 100), np.float32)
  save_file(bad, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"tensor h.1.mlp.c_fc.weight has shape \(32, 100\) but \(32, 128\)"):
    load_hf_gpt2(tmp_path)
  missing = {k: v for k, v in tensors.items() if "ln_f" not in k}
  save_file(missing, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"checkpoint tensors missing \['ln_f.bias', 'ln_f.weight'\]"):
    load_hf_gpt2(tmp_path)
  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(ValueError, match=r"has no model.safetensors, model.safetensors.index.json or pytorch_model"):
    load_hf_gpt2(tmp_path)


@pytest.mark.slow  # default suite time
def test_native_format_keeps_cores_and_tolerance_ranks(tmp_path):
  cfg = preset("tiny", layers={"mlp.c_fc": {"kind": "ttm", "rank": 16}, "embedding": {"kind": "ttm", "rank": 8}})
  model = GPT(cfg, rngs=nnx.Rngs(0))
  # a tolerance-chosen rank differs from the config's 16
  kernel = model.h[0].mlp.c_fc.kernel
  model.h[0].mlp.c_fc = TTMLinear.from_dense(kernel, model.h[0].mlp.c_fc.bias[...], rtol=0.3)
  assert model.h[0].mlp.c_fc.ranks != model.h[1].mlp.c_fc.ranks
  save_model(model, tmp_path / "m")
  again = load_model(tmp_path / "m")
  assert again.h[0].mlp.c_fc.ranks == model.h[0].mlp.c_fc.ranks
  ids = jnp.asarray(_ids(512))
  np.testing.assert_allclose(again(ids), model(ids), atol=1e-6)
  assert isinstance(load_any(tmp_path / "m"), GPT)
  dense_bytes = GPT(preset("tiny"), rngs=nnx.Rngs(0)).num_params * 4
  assert (tmp_path / "m" / "model.safetensors").stat().st_size < dense_bytes


def test_native_errors(tmp_path):
  with pytest.raises(ValueError, match=r"load_model: .*config.json does not exist"):
    load_model(tmp_path)
  make_hf_gpt2(tmp_path)
  with pytest.raises(ValueError, match=r"load_model: .*format=None but 'tnjax-gpt' is expected"):
    load_model(tmp_path)
