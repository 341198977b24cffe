"""Llama and Qwen2 checkpoints against transformers (torch CPU): logits, greedy generation, save and load."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.hf_fixtures import hf_logits, make_hf_llama
from tnjax._io import read_checkpoint
from tnjax.interop import load_any, load_hf, load_model, save_hf, save_model
from tnjax.models import Llama, generate, preset

pytestmark = pytest.mark.filterwarnings("ignore")

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8}


def _ids(vocab=101, shape=(2, 17), seed=0):
  return np.random.default_rng(seed).integers(0, vocab, shape)


@pytest.mark.parametrize("kind", [
    dict(),  # Llama, GQA (4 heads, 2 kv heads), untied
    dict(tie_word_embeddings=True, num_key_value_heads=4),  # tied, MHA
    dict(rope_parameters=LLAMA3),  # Llama-3 rope scaling
    pytest.param(dict(rope_parameters={"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0},
                      attention_bias=True), marks=pytest.mark.slow),
    dict(qwen2=True),  # q/k/v biases, GQA, untied
    pytest.param(dict(qwen2=True, tie_word_embeddings=True, num_key_value_heads=1), marks=pytest.mark.slow),
], ids=["llama-gqa", "llama-tied-mha", "llama3-rope", "linear-rope-biases", "qwen2", "qwen2-tied-mqa"])
def test_logits_match_transformers(tmp_path, kind):
  hf = make_hf_llama(tmp_path, **kind)
  model = load_hf(tmp_path)
  assert isinstance(model, Llama)
  ids = _ids()
  np.testing.assert_allclose(model(jnp.asarray(ids)), hf_logits(hf, ids), atol=1e-4)


@pytest.mark.slow  # ragged batches against transformers (tests/models/test_generate.py) cover it by default
@pytest.mark.parametrize("qwen2", [False, True])
def test_greedy_generation_equals_transformers(tmp_path, qwen2):
  import torch

  hf = make_hf_llama(tmp_path, qwen2=qwen2)
  model = load_hf(tmp_path)
  prompt = _ids(shape=(2, 5), seed=1)
  hf.generation_config.eos_token_id = None  # no early stop, no token suppressed: plain greedy decoding
  with torch.no_grad():
    want = hf.generate(torch.tensor(prompt), max_new_tokens=12, do_sample=False).numpy()
  np.testing.assert_array_equal(np.asarray(generate(model, prompt, 12, temperature=0.0)), want)


@pytest.mark.parametrize("kind", [dict(), dict(qwen2=True, tie_word_embeddings=True)], ids=["llama", "qwen2"])
def test_save_hf_loads_in_transformers_with_same_logits(tmp_path, kind):
  from transformers import AutoModelForCausalLM

  hf = make_hf_llama(tmp_path / "in", **kind)
  save_hf(load_hf(tmp_path / "in"), tmp_path / "out")
  again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  assert type(again) is type(hf)
  ids = _ids()
  np.testing.assert_allclose(hf_logits(again, ids), hf_logits(hf, ids), atol=1e-5)


def test_sharded_checkpoint_loads(tmp_path):
  hf = make_hf_llama(tmp_path / "one")
  hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  ids = _ids()
  np.testing.assert_allclose(load_any(tmp_path / "sharded")(jnp.asarray(ids)), hf_logits(hf, ids), atol=1e-4)


def test_compressed_model_saves_sharded_and_transformers_reloads_it(tmp_path):
  """save_hf above max_shard_size: transformers' layout (shards and index), read back by transformers and load_hf
  with the compressed model's logits; a later save into the same directory leaves none of the old shards."""
  from transformers import AutoModelForCausalLM

  from tnjax.compress import svd_compress

  make_hf_llama(tmp_path / "in")
  small = svd_compress(load_hf(tmp_path / "in"), ratio=0.5)
  save_hf(small, tmp_path / "out", max_shard_size="30KB")
  files = sorted(p.name for p in (tmp_path / "out").iterdir())
  shards = [f for f in files if f.startswith("model-")]
  assert len(shards) >= 3 and files == ["config.json", *shards, "model.safetensors.index.json"], files
  index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"].values()) == set(shards)
  stored = read_checkpoint("test", tmp_path / "out")
  assert index["metadata"]["total_size"] == sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in stored.values())
  assert set(index["weight_map"]) == set(stored)
  assert len(stored) == 1 + 2 * (2 + 7) + 2  # embedding, 2 blocks (2 norms, 7 projections), final norm, head
  again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  ids = _ids()
  np.testing.assert_allclose(hf_logits(again, ids), small(jnp.asarray(ids)), atol=1e-4)
  np.testing.assert_allclose(load_hf(tmp_path / "out")(jnp.asarray(ids)), small(jnp.asarray(ids)), atol=1e-4)
  save_hf(small, tmp_path / "out", max_shard_size="60KB")
  assert len(list((tmp_path / "out").glob("model-*"))) < len(shards)
  assert all(f.name.endswith(f"-of-{len(list((tmp_path / 'out').glob('model-*'))):05d}.safetensors")
             for f in (tmp_path / "out").glob("model-*"))


@pytest.mark.slow  # default suite time
def test_tensorized_llama_exports_dense_and_keeps_cores(tmp_path):
  """(Full-rank TT-matrix and low-rank Llamas equal the dense one: tests/compress/test_llama.py.)"""
  from transformers import LlamaForCausalLM

  ids = jnp.asarray(_ids(300))
  tensorized = Llama(preset("llama-tiny", vocab_size=300, block_size=32, n_layer=1,
                            layers={"*": {"kind": "ttm", "rank": 4}, "attn.o_proj": {"kind": "btt", "rank": 2},
                                    "mlp.up_proj": {"kind": "lowrank", "rank": 8}}), rngs=nnx.Rngs(1))
  save_hf(tensorized, tmp_path)
  hf = LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
  np.testing.assert_allclose(hf_logits(hf, ids), tensorized(ids), atol=1e-4)
  again = load_model(save_model(tensorized, tmp_path / "native"))
  assert again.config == tensorized.config
  np.testing.assert_allclose(again(ids), tensorized(ids), atol=1e-6)


@pytest.mark.slow  # default suite time (GPT-2's low-rank embedding export runs by default)
def test_low_rank_embedding_llama_exports_dense_and_keeps_factors(tmp_path):
  from transformers import LlamaForCausalLM

  ids = jnp.asarray(_ids(300))
  model = Llama(preset("llama-tiny", vocab_size=300, block_size=32, n_layer=1, tie_embeddings=True,
                       layers={"embedding": {"kind": "lowrank", "rank": 8}}), rngs=nnx.Rngs(1))
  assert model.lm_head is None and model.wte.u.shape == (300, 8)
  save_hf(model, tmp_path)
  hf = LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
  np.testing.assert_allclose(hf_logits(hf, ids), model(ids), atol=1e-4)
  again = load_model(save_model(model, tmp_path / "native"))
  assert again.config == model.config
  np.testing.assert_array_equal(again(ids), model(ids))


def _edit_config(path, **changes):
  cfg = json.loads((path / "config.json").read_text())
  cfg.update(changes)
  (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, match", [
    (dict(model_type="mistral"), r"load_hf: config model_type='mistral' but one of \['gpt2', 'llama', 'qwen2'\]"),
    (dict(hidden_act="gelu"), r"load_hf: config option hidden_act='gelu' is not supported \(only 'silu'\)"),
    (dict(mlp_bias=True), r"load_hf: config option mlp_bias=True is not supported"),
    (dict(head_dim=16), r"load_hf: config option head_dim=16 is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
     r"load_hf: rope_scaling rope_type='yarn' is not implemented; expected one of"),
    (dict(num_attention_heads=5), r"load_hf: config hidden_size=32 but it must be divisible by num_attention_heads=5"),
    (dict(num_key_value_heads=3), r"LlamaConfig: n_kv_head=3 but it must divide n_head=4"),
    (dict(use_sliding_window=True, model_type="qwen2"), r"config option use_sliding_window=True is not supported"),
])
def test_unsupported_options_are_refused_by_name(tmp_path, changes, match):
  make_hf_llama(tmp_path)
  _edit_config(tmp_path, **changes)
  with pytest.raises(ValueError, match=match):
    load_hf(tmp_path)


def test_missing_and_misshaped_tensors_are_named(tmp_path):
  from safetensors.numpy import load_file, save_file

  make_hf_llama(tmp_path)
  tensors = load_file(str(tmp_path / "model.safetensors"))
  bad = dict(tensors)
  bad["model.layers.1.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)
  save_file(bad, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"tensor model.layers.1.self_attn.k_proj.weight has shape \(32, 32\) but "
                                       r"\(16, 32\) is expected"):
    load_hf(tmp_path)
  save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"checkpoint tensors missing \['model.norm.weight'\]"):
    load_hf(tmp_path)
  with pytest.raises(ValueError, match=r"save_hf: output_bias=True with attention_bias=False"):
    save_hf(Llama(preset("llama-tiny", output_bias=True), rngs=nnx.Rngs(0)), tmp_path / "out")


def test_bf16_checkpoint_loads_in_its_own_dtype(tmp_path):
  """param_dtype="bfloat16" keeps a bf16 checkpoint's values bit for bit (no float32 copy) and its logits."""
  import torch
  from safetensors.numpy import load_file

  hf = make_hf_llama(tmp_path / "f32")
  hf.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"), max_shard_size="20KB")
  stored = {}
  for shard in (tmp_path / "bf16").glob("*.safetensors"):
    stored.update(load_file(str(shard)))
  model = load_hf(tmp_path / "bf16", param_dtype="bfloat16")
  kernel = model.layer("h.1.mlp.down_proj").kernel[...]
  assert kernel.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(kernel), stored["model.layers.1.mlp.down_proj.weight"].T)
  full = load_hf(tmp_path / "bf16")  # default: float32 parameters, the same values
  assert full.layer("h.1.mlp.down_proj").kernel[...].dtype == jnp.float32
  ids = jnp.asarray(_ids())
  assert model.config.dtype == "float32"  # bf16 storage, float32 computation: the float32 model's logits
  np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(full(ids)), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"load_hf: param_dtype='int8' but one of \('float32', 'bfloat16', "
                                       r"'float16'\) is expected"):
    load_hf(tmp_path / "bf16", param_dtype="int8")


_RSS_SCRIPT = """
import json, resource, sys
import jax, numpy as np
from tnjax.interop import load_hf

def rss():  # resident bytes now
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * resource.getpagesize()

jax.numpy.zeros(1).block_until_ready()  # the CPU backend's own memory is not the loader's
before = rss()
model = load_hf(sys.argv[1], param_dtype="bfloat16")
jax.block_until_ready(jax.tree_util.tree_leaves(model))
with open("/proc/self/status") as f:  # this process's peak (ru_maxrss would count the parent's at fork)
  peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(json.dumps({"before": before, "peak": peak}))
"""


@pytest.mark.slow  # a 100 MB checkpoint and a subprocess
def test_lazy_loading_of_a_sharded_bf16_checkpoint_stays_near_its_size(tmp_path):
  """Tensors are read one at a time into an uninitialized model: loading a ~100 MB bf16 checkpoint in bf16 grows
  the process by less than 1.5x the checkpoint (reading it whole, or a float32 random init first, would be 2-3x)."""
  import os
  import pathlib
  import subprocess
  import sys

  make_hf_llama(tmp_path / "f32", hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                num_attention_heads=8, num_key_value_heads=4, vocab_size=8000)
  import torch
  from transformers import AutoModelForCausalLM

  AutoModelForCausalLM.from_pretrained(str(tmp_path / "f32"), dtype=torch.bfloat16).save_pretrained(
      str(tmp_path / "bf16"), max_shard_size="30MB")
  size = sum(p.stat().st_size for p in (tmp_path / "bf16").glob("*.safetensors"))
  assert len(list((tmp_path / "bf16").glob("*.safetensors"))) > 1 and 80e6 < size < 120e6
  root = pathlib.Path(__file__).resolve().parents[2]
  out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "bf16")], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  import json

  rss = json.loads(out.stdout.strip().splitlines()[-1])
  assert rss["peak"] - rss["before"] < 1.5 * size, (rss, size)


_SAVE_RSS_SCRIPT = """
import json, math, tempfile
import jax
from flax import nnx
from tnjax.interop import save_hf, save_model
from tnjax.models import Llama, preset

def status(key):
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

model = Llama(preset("llama-tiny", vocab_size=8000, d_model=512, d_ff=1536, n_layer=12, n_head=8, n_kv_head=4,
                     block_size=64), rngs=nnx.Rngs(0))
leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
jax.block_until_ready(leaves)
out = {"size": sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)}
for name, save in (("hf", save_hf), ("native", save_model)):
  with open("/proc/self/clear_refs", "w") as f:  # VmHWM back to the RSS now: what follows is the save's own peak
    f.write("5")
  before = status("VmRSS")
  path = save(model, tempfile.mkdtemp(), max_shard_size="50MB")
  out[name] = status("VmHWM") - before
  out[name + "_shards"] = len(list(path.glob("model-*-of-*.safetensors")))
print(json.dumps(out))
"""


@pytest.mark.slow  # a 170 MB model in a subprocess
def test_saving_streams_one_tensor_at_a_time(tmp_path):
  """save_hf and save_model of a 170 MB float32 model grow the process by well under its size (each dense tensor
  is computed, written and dropped before the next; save_hf held every one, +157 MB, before)."""
  import os
  import pathlib
  import subprocess
  import sys

  root = pathlib.Path(__file__).resolve().parents[2]
  out = subprocess.run([sys.executable, "-c", _SAVE_RSS_SCRIPT], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  rss = json.loads(out.stdout.strip().splitlines()[-1])
  assert rss["hf_shards"] == rss["native_shards"] == 4, rss  # 170 MB in shards of at most 50 MB
  assert rss["hf"] < 0.25 * rss["size"] and rss["native"] < 0.25 * rss["size"], rss


def test_save_hf_in_bfloat16_or_the_parameters_dtype_and_transformers_reloads_it(tmp_path):
  """dtype="bfloat16" writes half the bytes, recorded in config.json; transformers reloads it in bf16 with the
  bf16-rounded weights; dtype=None follows the parameters' storage (a model loaded with param_dtype)."""
  import torch
  from transformers import AutoModelForCausalLM

  from tnjax._io import read_checkpoint

  make_hf_llama(tmp_path / "in")
  model = load_hf(tmp_path / "in")
  f32, bf16 = save_hf(model, tmp_path / "f32"), save_hf(model, tmp_path / "bf16", dtype="bfloat16")
  size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
  assert 0.45 < size(bf16) / size(f32) < 0.55
  assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
  tensors = read_checkpoint("test", bf16)
  name = "model.layers.1.mlp.down_proj.weight"
  assert tensors[name].dtype == jnp.bfloat16
  want = np.asarray(jnp.asarray(read_checkpoint("test", f32)[name]).astype(jnp.bfloat16))
  np.testing.assert_array_equal(np.asarray(tensors[name]), want)
  again = AutoModelForCausalLM.from_pretrained(str(bf16), dtype="auto").eval()
  assert again.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16
  np.testing.assert_array_equal(again.model.layers[1].mlp.down_proj.weight.detach().float().numpy(),
                                np.asarray(want, np.float32))
  own = save_hf(load_hf(tmp_path / "in", param_dtype="bfloat16"), tmp_path / "own", dtype=None)
  assert json.loads((own / "config.json").read_text())["torch_dtype"] == "bfloat16"
  with pytest.raises(ValueError, match=r"save_hf: dtype='int8' but one of \('float32', 'bfloat16', 'float16'\) or "
                                       r"None \(the parameters' own\) is expected"):
    save_hf(model, tmp_path / "bad", dtype="int8")
