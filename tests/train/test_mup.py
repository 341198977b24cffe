import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tnjax.data import SAMPLE_DIR
from tnjax.models import GPT, build, preset
from tnjax.nn import hidden_fan_ins
from tnjax.train import TrainConfig, Trainer, make_optimizer, mup_multipliers, scale_by_multipliers

BYTES = np.frombuffer((SAMPLE_DIR / "train.txt").read_bytes(), np.uint8).astype(np.uint16)
KINDS = {"dense": {}, "ttm": {n: {"kind": "ttm", "rank": 8} for n in ("mlp.c_fc", "mlp.c_proj")},
         "btt": {n: {"kind": "btt", "rank": 4} for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}}
LLAMA_KINDS = {"dense": {}, "ttm": {n: {"kind": "ttm", "rank": 8} for n in ("mlp.gate_proj", "mlp.up_proj",
                                                                             "mlp.down_proj")},
               "btt": {"*": {"kind": "btt", "rank": 4}}}


def _model(family: str, width: int, n_layer: int) -> tuple[str, dict]:
  """A preset and overrides at ``width`` (32-wide heads; Llama: 2 query heads per key/value head, d_ff = 2 d)."""
  if family == "gpt2":
    return "tiny", {"d_model": width, "n_head": width // 32, "n_layer": n_layer}
  return "llama-tiny", {"d_model": width, "n_head": width // 32, "n_kv_head": width // 64, "d_ff": 2 * width,
                        "n_layer": n_layer, "tie_embeddings": False}


@pytest.fixture(autouse=True)
def standard_promotion():
  with jax.numpy_dtype_promotion("standard"):  # optax mixes its int step count with floats
    yield


def test_fan_ins_and_multipliers_match_hand_computed_values():
  cfg = preset("tiny", d_model=256, n_head=8, mup_base_width=128,
               layers={"mlp.c_fc": {"kind": "btt", "rank": 2}, "mlp.c_proj": {"kind": "ttm", "rank": 4},
                       "attn.c_proj": {"kind": "lowrank", "rank": 8}})
  fans = hidden_fan_ins(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
  # BTT 256 -> 1024: in (16, 16), out (32, 32): left fan-in m1 = 16, right r * m2 = 2 * 16
  assert fans["h.0.mlp.c_fc.cores.0"] == 16 and fans["h.0.mlp.c_fc.cores.1"] == 32
  # TTM 1024 -> 256 with in_dims factorize(1024, 3) = (8, 8, 16): fan-ins r[k] * n_in[k] = 8, 4 * 8, 4 * 16
  assert [fans[f"h.0.mlp.c_proj.cores.{k}"] for k in range(3)] == [8, 32, 64]
  assert fans["h.0.attn.c_proj.u"] == 256 and fans["h.0.attn.c_proj.v"] == 8
  assert fans["h.0.attn.c_attn.kernel"] == 256
  assert not any(k.startswith(("wte", "wpe", "ln")) or k.endswith("bias") for k in fans)
  m = mup_multipliers(cfg)
  # base width 128: BTT 128 -> 512 has in (16, 8), out (16, 32): left 16 -> 16, right 2 * 8 -> 2 * 16
  assert m["h.0.mlp.c_fc.cores.0"] == 1.0 and m["h.0.mlp.c_fc.cores.1"] == 0.5
  assert m["h.0.attn.c_attn.kernel"] == 0.5 and m["h.0.attn.c_proj.v"] == 1.0  # a rank is not a width
  assert cfg.output_multiplier == 0.5 and abs(cfg.projection_std - 0.02 / np.sqrt(2)) < 1e-12


def test_scale_by_multipliers_scales_adamw_updates_per_parameter():
  params = {"a": jnp.ones(3), "b": jnp.ones(3)}
  grads = {"a": jnp.full(3, 0.3), "b": jnp.full(3, 0.3)}
  tx = optax.chain(optax.adam(0.1), scale_by_multipliers({"a": 0.25, "b": 1.0}))
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["a"], 0.25 * updates["b"], rtol=1e-6)


def test_llama_fan_ins_and_multipliers_match_hand_computed_values():
  cfg = preset("llama-tiny", d_model=256, n_head=8, n_kv_head=4, d_ff=512, mup_base_width=128, tie_embeddings=False,
               layers={"mlp.gate_proj": {"kind": "btt", "rank": 2}, "attn.o_proj": {"kind": "lowrank", "rank": 8}})
  base = cfg.at_width(128)
  assert (base.n_head, base.kv_heads, base.ff_dim) == (4, 2, 256)  # the grouping and d_ff / d_model are kept
  m = mup_multipliers(cfg)
  assert m["h.0.attn.k_proj.kernel"] == 0.5 and m["h.1.mlp.down_proj.kernel"] == 0.5  # fan-ins d and d_ff double
  # BTT 256 -> 512: in (16, 16), out (16, 32); at 128 -> 256: in (16, 8), out (16, 16): left 16 -> 16, right
  # r * m2 = 2 * 8 -> 2 * 16
  assert m["h.0.mlp.gate_proj.cores.0"] == 1.0 and m["h.0.mlp.gate_proj.cores.1"] == 0.5
  assert m["h.0.attn.o_proj.u"] == 0.5 and m["h.0.attn.o_proj.v"] == 1.0
  assert not any(k.startswith(("wte", "lm_head", "ln")) or ".ln_" in k for k in m)  # the untied head keeps lr
  assert cfg.output_multiplier == 0.5 and abs(cfg.projection_std - 0.02 / np.sqrt(2)) < 1e-12
  model = build(cfg, rngs=nnx.Rngs(0))
  assert abs(float(jnp.std(model.h[0].attn.q_proj.kernel[...])) - cfg.projection_std) < 2e-3
  assert abs(float(jnp.std(model.lm_head.kernel[...])) - cfg.init_std) < 2e-3
  # a base narrower than the grouping (3 heads, groups of 2; one head) keeps fewer key/value heads, and the
  # fan-ins do not depend on them
  assert (cfg.at_width(96).n_head, cfg.at_width(96).kv_heads, cfg.at_width(32).kv_heads) == (3, 1, 1)
  wide = preset("llama-tiny", d_model=512, n_head=16, n_kv_head=4, d_ff=1024, mup_base_width=32)  # head_dim 32
  m = mup_multipliers(wide)
  assert m["h.0.attn.k_proj.kernel"] == m["h.0.attn.o_proj.kernel"] == 32 / 512


def _output_change(layers, parametrization: str, width: int, steps: int = 5, family: str = "gpt2") -> float:
  model, overrides = _model(family, width, 1)
  cfg = TrainConfig(model=model, model_overrides=overrides, layers=layers, block_size=32, batch_size=4, steps=steps,
                    warmup=0, lr=1e-2, min_lr_ratio=1.0, weight_decay=0.0, parametrization=parametrization,
                    mup_base_width=64)
  trainer = Trainer(cfg, 256)
  x = jnp.asarray(BYTES[:128].reshape(4, 32).astype(np.int32))
  logits = jax.jit(lambda params, x: trainer.model(params)(x))  # one compile, not an eager op-by-op forward
  before = logits(trainer.params, x)
  for step in range(steps):
    trainer.step(step, BYTES)
  return float(jnp.std(logits(trainer.params, x) - before))


@pytest.mark.slow  # short training runs at three widths (~20 s each)
@pytest.mark.parametrize("family, kind", [("gpt2", k) for k in sorted(KINDS)] + [("llama", k) for k in
                                                                                  sorted(LLAMA_KINDS)])
def test_coordinate_check_mup_keeps_the_update_size_as_width_grows(family, kind):
  """After a few Adam steps at one learning rate, how far the logits moved stays put from width 64 to 256
  under muP, for dense and structured layers of both families (Llama with grouped-query attention and an
  untied head); under the standard parametrization it grows with width."""
  layers = (KINDS if family == "gpt2" else LLAMA_KINDS)[kind]
  ratio = (_output_change(layers, "mup", 256, family=family) / _output_change(layers, "mup", 64, family=family))
  assert 0.75 < ratio < 1.33, ratio
  if kind == "dense":
    standard = (_output_change({}, "standard", 256, family=family)
                / _output_change({}, "standard", 64, family=family))
    assert standard > 1.6, standard


@pytest.mark.slow
def test_best_learning_rate_transfers_across_widths_under_mup(family="gpt2"):
  """The learning rate with the lowest validation loss at width 64 stays best at 2x and 4x width (dense; the
  structured families' sweeps are benchmarks/bench_mup.py, docs/mup.md).

  50 steps and three rates around the optimum (100 steps and five rates before, to save CI time) keep the
  verdicts: under muP the best of 1e-3 ... 1.6e-2 was 4e-3 at every width, its neighbours 0.12 nats or more worse;
  the standard parametrization's best went 4e-3, 2e-3, 1e-3; on these three rates 4e-3, 2e-3, 2e-3, which fails
  here (measured 2026-12-02). Llama's sweep at this size is too noisy to decide (50-100 steps of a 2-block
  llama-tiny: the best rate moved 4e-3, 8e-3, 8e-3 under muP, with non-monotone neighbours); its transfer is
  measured by benchmarks/bench_mup.py (llama-* families) and its mechanism by the coordinate check above."""
  valid = np.frombuffer((SAMPLE_DIR / "valid.txt").read_bytes(), np.uint8).astype(np.int32)
  vx, vy = jnp.asarray(valid[:2048].reshape(32, 64)), jnp.asarray(valid[1:2049].reshape(32, 64))
  lrs = [2e-3, 4e-3, 8e-3]
  best = {}
  for width in (64, 128, 256):
    losses = []
    for lr in lrs:
      model, overrides = _model(family, width, 2)
      cfg = TrainConfig(model=model, model_overrides=overrides, layers={}, block_size=64, batch_size=8, steps=50,
                        warmup=10, lr=lr, weight_decay=0.0, parametrization="mup", mup_base_width=64)
      trainer = Trainer(cfg, 256)
      for step in range(cfg.steps):
        trainer.step(step, BYTES)
      losses.append(float(trainer._eval(trainer.params, vx, vy)))
    best[width] = int(np.nanargmin(losses))
  assert best[64] == best[128] == best[256] == 1, best


def test_mup_errors_name_the_field():
  with pytest.raises(ValueError, match="parametrization='mu' but one of"):
    TrainConfig(parametrization="mu").validate()
  with pytest.raises(ValueError, match="mup_base_width=0 but a positive integer"):
    TrainConfig(mup_base_width=0).validate()
  with pytest.raises(ValueError, match="mup_base_width=-4 but a positive integer"):
    preset("tiny", mup_base_width=-4)
  with pytest.raises(ValueError, match="d_model=100 but a multiple of head_dim=32"):
    mup_multipliers(preset("tiny", mup_base_width=100))
  with pytest.raises(ValueError, match="explicit in_dims/out_dims, which do not rescale"):
    mup_multipliers(preset("tiny", mup_base_width=64, layers={"mlp.c_fc": {"kind": "btt", "rank": 2,
                                                                           "in_dims": [16, 8]}}))
  with pytest.raises(ValueError, match="multipliers name"):
    make_optimizer(TrainConfig(), {"w": jnp.ones((2, 2))}, {"nope": 0.5})
