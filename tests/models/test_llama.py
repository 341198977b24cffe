"""The Llama-style family: configs, presets, rotary embeddings, KV-cached decoding, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tnjax.models import Llama, LlamaConfig, build, family, preset


def test_presets_have_the_public_shapes():
  small = nnx.eval_shape(lambda: Llama(preset("smollm-135m"), rngs=nnx.Rngs(0)))
  assert small.num_params == 134_515_008
  medium = preset("smollm-360m")
  assert (medium.n_layer, medium.d_model, medium.n_head, medium.kv_heads, medium.ff_dim) == (32, 960, 15, 5, 2560)
  assert family(preset("llama-tiny")).name == "llama" and family(preset("tiny")).name == "gpt2"
  assert isinstance(build(preset("llama-tiny"), rngs=nnx.Rngs(0)), Llama)


def test_rotary_embedding_matches_a_float64_reference():
  """Each pair (i, i + d/2) of a head is rotated by position * inv_freq[i]: q.k depends on relative position."""
  cfg = preset("llama-tiny", n_layer=1)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  attn = model.h[0].attn
  x = jax.random.normal(jax.random.key(0), (1, 6, cfg.d_model), jnp.float32)
  q, k, _ = attn.qkv(x)
  inv = cfg.inv_freq().astype(np.float64)
  np.testing.assert_allclose(inv, 1 / 10000.0 ** (np.arange(0, 32, 2) / 32), rtol=1e-6)

  def rot(z, t):
    z = np.asarray(z, np.float64)
    a, b = z[..., :16], z[..., 16:]
    c, s = np.cos(t * inv), np.sin(t * inv)
    return np.concatenate([a * c - b * s, b * c + a * s], -1)

  from tnjax.models.llama import _rotate

  t = np.arange(6)
  angles = jnp.asarray(t[:, None] * inv[None, :], jnp.float32)
  got = _rotate(q, jnp.cos(angles), jnp.sin(angles))
  want = np.stack([rot(q[0, i], i) for i in t])[None]
  np.testing.assert_allclose(got, want, atol=1e-5)
  # relative position: q_i . k_j after rotation equals q_(i+2) . k_(j+2) for the same vectors
  qi, kj = np.asarray(q[0, 0, 0], np.float64), np.asarray(k[0, 0, 0], np.float64)
  assert rot(qi, 1) @ rot(kj, 0) == pytest.approx(rot(qi, 3) @ rot(kj, 2), rel=1e-9)


@pytest.mark.slow  # greedy decoding equal to HF generate (tests/interop) covers the cache by default
@pytest.mark.parametrize("layers", [{}, {"*": {"kind": "ttm", "rank": 4}}], ids=["dense", "ttm"])
def test_kv_cached_decoding_matches_the_full_forward(layers):
  model = Llama(preset("llama-tiny", layers=layers), rngs=nnx.Rngs(0))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 9)))
  full = model(ids)
  logits, cache = model.step(ids[:, :5], model.init_cache(2))
  assert cache[0].keys.shape == (2, 128, 2, 32)  # kv heads, not query heads
  step_logits = [logits]
  step = jax.jit(lambda m, x, c: m.step(x, c))  # the cache index traced: one compilation
  for i in range(5, 9):
    logits, cache = step(model, ids[:, i:i + 1], cache)
    step_logits.append(logits)
  np.testing.assert_allclose(jnp.concatenate(step_logits, 1), full, atol=1e-5)


@pytest.mark.parametrize("overrides, match", [
    (dict(d_model=130), r"LlamaConfig: d_model=130 but it must be divisible by n_head=4"),
    (dict(n_kv_head=3), r"LlamaConfig: n_kv_head=3 but it must divide n_head=4"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), r"rope_type='dynamic' is not implemented"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), r"rope_type='llama3' lacks numeric \['low_freq"),
    (dict(layers={"mlp.c_fc": "dense"}), r"LlamaConfig: layers key 'mlp.c_fc' is unknown"),
    (dict(layers={"*": {"kind": "ttm", "rank": 0}}), r"LlamaConfig: layers\['\*'\].rank=0 but a positive integer"),
    (dict(mup_base_width=0), r"LlamaConfig: mup_base_width=0 but a positive integer"),
    (dict(dims={"h.0": {"qk_dim": 8}}), r"dims\['h.0'\] has qk_dim=8 and rope_pairs=None but both or neither"),
    (dict(dims={"h.0": {"qk_dim": 4, "rope_pairs": [3, 1]}}), r"\['rope_pairs'\]=\[3, 1\] but sorted distinct"),
])
def test_bad_configs_are_refused_by_name(overrides, match):
  with pytest.raises(ValueError, match=match):
    preset("llama-tiny", **overrides)
  with pytest.raises(ValueError, match=r"preset: name='llama' but one of \["):
    preset("llama")


def test_config_json_round_trip_and_native_files(tmp_path):
  from tnjax.interop import load_model, save_model

  cfg = preset("llama-tiny", rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True,
               layers={"h.1.mlp.down_proj": {"kind": "lowrank", "rank": 8}})
  assert LlamaConfig.from_json(cfg.to_json()) == cfg
  model = Llama(cfg, rngs=nnx.Rngs(0))
  again = load_model(save_model(model, tmp_path))
  ids = jnp.ones((1, 4), jnp.int32)
  assert isinstance(again, Llama) and again.config == cfg
  np.testing.assert_allclose(again(ids), model(ids), atol=1e-6)


def test_train_config_for_llama_tiny_tensorizes_every_projection():
  from tnjax.train import TrainConfig

  cfg = TrainConfig(model="llama-tiny").validate().model_config(512)
  assert isinstance(cfg, LlamaConfig) and all(cfg.spec(p, 1).kind == "ttm" for p in cfg.PROJECTIONS)


@pytest.mark.slow  # a BPE tokenizer and three training steps through the CLI
def test_train_llama_tiny_from_scratch(tmp_path):
  """`tnjax train --set model=llama-tiny`: the default TT-matrix layers apply to every Llama projection."""
  from tnjax.cli import main

  out = tmp_path / "run"
  with jax.numpy_dtype_promotion("standard"):  # optax mixes its int step count with floats, as the CLI allows
    assert main(["train", "--no-progress", "--set", "model=llama-tiny", "--set", "steps=3", "--set",
                 "eval_every=3", "--set", "warmup=1",
                 "--set", "batch_size=4", "--set", "block_size=32", "--set", "vocab_size=512",
                 "--set", "model_overrides.n_layer=1", "--set", f"out_dir={out}"]) == 0
  from tnjax.interop import load_model

  model = load_model(out / "model")
  assert isinstance(model, Llama) and model.config.spec("mlp.gate_proj", 0).kind == "ttm"
