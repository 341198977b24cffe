"""Logical sharding axes and rules (tnjax.train.sharding): each parameter's logical axes from its layer kind, the
PartitionSpec each preset gives it, the fallback to replication, the config's validation, and (on 4 forced CPU
devices, in a subprocess) FSDP + tensor-parallel train steps against the same steps on one device."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tnjax.models import GPT, Llama, build, preset
from tnjax.models.config import GPTConfig
from tnjax.nn.kinds import LOGICAL_AXES
from tnjax.train import TrainConfig
from tnjax.train.sharding import PRESETS, logical_spec, mesh_layout, param_shardings, resolve_rules

ROOT = pathlib.Path(__file__).resolve().parents[2]
MIXED = {"mlp.c_fc": {"kind": "ttm", "rank": 4}, "mlp.c_proj": {"kind": "btt", "rank": 2},
         "attn.c_proj": {"kind": "lowrank", "rank": 8}}


def _abstract(family: str, **kwargs):
  """The model with shapes only (no random init): logical axes and shardings read nothing else."""
  return nnx.eval_shape(lambda: build(preset(family, **kwargs), rngs=nnx.Rngs(0)))


def _shapes(model) -> dict:
  return {".".join(map(str, k)): v.shape for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _specs(model, preset_name: str, sizes: dict) -> dict:
  rules, axes = resolve_rules(preset_name, {}), model.logical_axes()
  return {name: logical_spec(axes[name], shape, rules, sizes) for name, shape in _shapes(model).items()}


@pytest.mark.parametrize("family, layers", [
    ("tiny", {"*": {"kind": "dense"}}), ("tiny", MIXED),
    ("tiny", {"*": {"kind": "ttm", "rank": 4, "quant": "int8"}, "embedding": {"kind": "mps", "rank": 2}}),
    ("tiny", {"*": {"kind": "lowrank", "rank": 8, "quant": "int8"}, "embedding": {"kind": "lowrank", "rank": 8}}),
    ("llama-tiny", {"*": {"kind": "btt", "rank": 2, "quant": "int8"}, "embedding": {"kind": "ttm", "rank": 4},
                    "lm_head": {"kind": "dense", "quant": "int8"}}),
    ("llama-tiny", {"*": {"kind": "ttm", "rank": 4}}),
])
def test_every_parameter_gets_one_logical_axis_per_dimension(family, layers):
  overrides = {"tie_embeddings": False} if "lm_head" in layers else {}
  model = _abstract(family, layers=layers, **overrides)
  axes, shapes = model.logical_axes(), _shapes(model)
  assert set(axes) == set(shapes)
  for name, shape in shapes.items():
    assert len(axes[name]) == len(shape), name
    assert set(axes[name]) <= set(LOGICAL_AXES) | {None}, name
  # every weight matrix or core names a dimension it spans: only positions and a low-rank u's int8 scales,
  # (1, r), span none
  bare = {n for n in shapes if n == "wpe.embedding" or (n.endswith(".scales.0") and len(shapes[n]) == 2)}
  assert all(any(a is not None for a in axes[n]) for n in set(shapes) - bare)


def test_tt_and_btt_core_modes_carry_the_axis_of_the_dimension_they_factorize():
  model = _abstract("tiny", layers=MIXED)
  axes = model.logical_axes()
  up, down = model.h[0].mlp.c_fc, model.h[0].mlp.c_proj
  assert (down.in_dims, down.out_dims) == ((32, 16), (8, 16))  # (m1, m2), (n1, n2)
  assert up.in_dims == (4, 4, 8) and up.out_dims == (8, 8, 8)  # 128 -> 512: embed modes in, mlp modes out
  assert [axes[f"h.0.mlp.c_fc.cores.{k}"] for k in range(3)] == [(None, "embed", "mlp", None)] * 3
  # BTT left (m2, m1, r, n1), right (n1, r, m2, n2) of a 512 -> 128 projection: m factorizes mlp, n embed
  assert axes["h.0.mlp.c_proj.cores.0"] == ("mlp", "mlp", None, "embed")
  assert axes["h.0.mlp.c_proj.cores.1"] == ("embed", None, "mlp", "embed")
  assert axes["h.0.attn.c_proj.u"] == ("heads", None) and axes["h.0.attn.c_proj.v"] == (None, "embed")


def test_each_preset_gives_each_parameter_its_sharding():
  model = _abstract("tiny", layers=MIXED)
  data = _specs(model, "data", {"data": 4})
  assert all(all(e is None for e in spec) for spec in data.values())  # data parallel: all replicated
  fsdp, tp = _specs(model, "fsdp", {"data": 4}), _specs(model, "fsdp_tp", {"data": 2, "model": 2})
  want = {  # name: (FSDP over 4 devices, FSDP x TP over 2 x 2)
      "h.0.attn.c_attn.kernel": (P("data", None), P("data", "model")),  # (embed, heads)
      "h.0.attn.c_attn.bias": (P("data"), P("model")),
      "h.0.attn.c_proj.u": (P("data", None), P("model", None)),  # low rank: (heads, r)
      "h.0.attn.c_proj.v": (P(None, "data"), P(None, "data")),  # (r, embed)
      "h.0.mlp.c_fc.cores.1": (P(None, "data", None, None), P(None, "data", "model", None)),  # (4, 4, 8, 4)
      "h.0.mlp.c_fc.bias": (P("data"), P("model")),
      # BTT (16, 32, 2, 8) and (8, 2, 16, 16): a mesh axis splits the first dimension naming it
      "h.0.mlp.c_proj.cores.0": (P("data", None, None, None), P("model", None, None, "data")),
      "h.0.mlp.c_proj.cores.1": (P("data", None, None, None), P("data", None, "model", None)),
      "h.0.ln_1.scale": (P("data"), P("data")),
      "wte.embedding": (P("data", None), P("model", "data")),  # (vocab, embed)
      "wpe.embedding": (P(None, "data"), P(None, "data")),  # positions never split
  }
  for name, (f, t) in want.items():
    assert (fsdp[name], tp[name]) == (f, t), name
  llama = _abstract("llama-tiny")
  specs = _specs(llama, "fsdp_tp", {"data": 2, "model": 2})
  assert specs["h.0.attn.k_proj.kernel"] == P("data", "model")  # (embed, kv_heads) = (128, 64)
  assert specs["h.0.attn.o_proj.kernel"] == P("model", "data")
  assert specs["h.0.mlp.down_proj.kernel"] == P("model", "data")


def test_fsdp_flag_is_the_fsdp_preset():
  assert TrainConfig(fsdp=True).sharding_layout(4) == TrainConfig(sharding="fsdp").sharding_layout(4)
  assert TrainConfig(fsdp=True, sharding="fsdp_tp").sharding_preset == "fsdp_tp"
  assert TrainConfig().sharding_layout(4) == (("data",), (4,), resolve_rules("data", {}))


def test_a_rule_that_does_not_divide_a_dimension_falls_back_to_replication():
  rules, sizes = resolve_rules("fsdp_tp", {}), {"data": 4, "model": 2}
  assert logical_spec(("embed", "mlp"), (6, 8), rules, sizes) == P(None, "model")  # 6 % 4: replicated
  both = resolve_rules("data", {"mlp": ["data", "model"]})
  assert logical_spec(("mlp",), (16,), both, sizes) == P(("data", "model"))
  assert logical_spec(("mlp",), (4,), both, sizes) == P("data")  # 4 % 8: the trailing "model" dropped
  assert logical_spec(("mlp",), (2,), both, sizes) == P(None)
  # a mesh axis splits one dimension of an array: the first that names it and that it divides
  assert logical_spec(("embed", "embed"), (6, 8), resolve_rules("fsdp", {}), sizes) == P(None, "data")
  assert logical_spec(("embed", "mlp"), (8, 8), rules, {"data": 1, "model": 2}) == P(None, "model")  # size 1
  # the user's rules fall back the same way (a TT core's odd mode must not make a rule unusable)
  assert logical_spec(("vocab",), (6,), resolve_rules("data", {"vocab": "data"}), sizes) == P(None)


def test_param_shardings_replicates_names_without_axes():
  import jax
  import jax.numpy as jnp

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1), ("data",))
  out = param_shardings({"a": jnp.ones((4, 2)), "b": jnp.ones(3)}, mesh, resolve_rules("fsdp", {}),
                        {"a": ("embed", None)})
  assert out["a"].spec == P(None, None) and out["b"].spec == P()  # a size-1 axis splits nothing


def test_presets_name_only_known_axes():
  for rules in PRESETS.values():
    assert set(rules) <= set(LOGICAL_AXES)
  assert mesh_layout("fsdp_tp", None, None, 8) == (("data", "model"), (8, 1))
  assert mesh_layout("data", ["x", "y"], [2, -1], 8) == (("x", "y"), (2, 4))


@pytest.mark.parametrize("fields, match", [
    ({"sharding": "tp"}, r"TrainConfig: sharding='tp' but one of \('data', 'fsdp', 'fsdp_tp'\) is expected"),
    ({"sharding_rules": {"mlpp": "data"}}, r"TrainConfig: sharding_rules has logical axes \['mlpp'\] but the logical"),
    ({"sharding_rules": {"mlp": "tensor"}}, r"the rule 'mlp' -> 'tensor' .* names mesh axis 'tensor' but "
                                            r"mesh_axes=\['data'\]"),
    ({"sharding": "fsdp_tp", "mesh_axes": ["data"], "mesh_shape": [1]}, r"the rule 'mlp' -> 'model' \(sharding="
                                                                        r"'fsdp_tp'"),
    ({"sharding_rules": {"mlp": ["data", "data"]}}, r"sharding_rules\['mlp'\]=\['data', 'data'\] but a mesh axis "
                                                    r"name, a list of distinct names or None"),
    ({"sharding_rules": {"mlp": 3}}, r"TrainConfig: sharding_rules=\{'mlp': 3\} \(dict\) but"),
    ({"mesh_shape": [1], "mesh_axes": ["data", "model"]}, r"mesh_shape=\[1\] but 2 positive sizes \(one may be -1\)"),
    ({"mesh_shape": [-1, -1], "mesh_axes": ["data", "model"]}, r"mesh_shape=\[-1, -1\] but 2 positive sizes"),
    ({"mesh_shape": [0]}, r"mesh_shape=\[0\] but 1 positive sizes"),
    ({"mesh_axes": ["data", "data"]}, r"mesh_axes=\['data', 'data'\] but distinct identifier names"),
    ({"mesh_axes": []}, r"mesh_axes=\[\] but distinct identifier names \(at least one\)"),
])
def test_bad_sharding_fields_are_refused_at_validation(fields, match):
  with pytest.raises(ValueError, match=match):
    TrainConfig(**fields).validate()


@pytest.mark.parametrize("fields, match", [
    ({"mesh_shape": [2, 2], "mesh_axes": ["data", "model"]}, r"TrainConfig: mesh_shape=\[2, 2\] for mesh_axes="
                                                             r"\['data', 'model'\] but there are 1 devices"),
    ({"mesh_shape": [3, -1], "mesh_axes": ["data", "model"]}, r"mesh_shape=\[3, -1\] .* but there are 1 devices"),
])
def test_a_mesh_for_other_devices_is_refused_where_the_devices_are_known(fields, match):
  cfg = TrainConfig(**fields).validate()  # valid on a machine of 4 or 6 devices: validation does not ask JAX
  with pytest.raises(ValueError, match=match):
    cfg.sharding_layout(1)  # what Trainer calls, with jax.device_count()


def test_bad_logical_axes_are_refused(monkeypatch):
  with pytest.raises(ValueError, match=r"logical_spec: axes=\('embed',\) but shape=\(4, 4\); one logical axis per"):
    logical_spec(("embed",), (4, 4), resolve_rules("fsdp", {}), {"data": 2})
  monkeypatch.setattr(GPTConfig, "PROJECTION_AXES", {"attn.c_attn": ("embed", "heads")})
  model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"GPT.logical_axes: module h.0.attn.c_proj is a 'dense' layer but "
                                       r"GPTConfig.PROJECTION_AXES has no 'attn.c_proj'"):
    model.logical_axes()


def test_every_family_names_the_axes_of_every_projection():
  for cls in (GPT, Llama):
    cfg = type(preset("tiny" if cls is GPT else "llama-tiny"))
    assert set(cfg.PROJECTION_AXES) == set(cfg.PROJECTIONS)


# A 4-device process: for each case, a Trainer under FSDP + TP (mesh 2 x 2) takes two steps, and the same jitted
# step runs on one device from copies of the same initial state; losses, gradient norms and parameters must agree,
# and every parameter must sit where its logical axes say.
MULTI = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from tnjax.train import TrainConfig, Trainer
from tnjax.train.sharding import logical_spec
assert jax.device_count() == 4, jax.devices()
tokens = np.random.default_rng(0).integers(0, 300, 20000).astype(np.uint16)
host = lambda tree: jax.tree_util.tree_map(np.asarray, tree)
out = []
with jax.numpy_dtype_promotion("standard"):
  for model, layers in json.loads(sys.argv[1]):
    cfg = TrainConfig(model=model, layers=layers, model_overrides={"n_layer": 1}, batch_size=8, block_size=16,
                      steps=4, warmup=1, sharding="fsdp_tp", mesh_shape=[2, 2], vocab_size=300).validate()
    trainer = Trainer(cfg, 300)
    axes = trainer.model().logical_axes()
    sizes = dict(trainer.mesh.shape)
    placed = all(trainer.params[k].sharding.spec == logical_spec(axes[k.removesuffix(".value")], v.shape,
                                                                 trainer.rules, sizes)
                 for k, v in trainer.params.items())
    split = sum(any(e is not None for e in v.sharding.spec) for v in trainer.params.values())
    one = jax.devices()[0]
    params, opt = jax.device_put(host(trainer.params), one), jax.device_put(host(trainer.opt_state), one)
    step = jax.jit(trainer._train_step)
    got, want = [], []
    for s in range(2):
      x, y, key = trainer.batch(s, tokens)
      got.append([float(v) for v in trainer.step(s, tokens, (x, y, key))])
      params, opt, loss, gnorm = step(params, opt, jax.device_put(host(x), one), jax.device_put(host(y), one), key)
      want.append([float(loss), float(gnorm)])
    diff = max(float(np.abs(np.asarray(trainer.params[k]) - np.asarray(params[k])).max()) for k in params)
    out.append({"got": got, "want": want, "diff": diff, "placed": placed, "split": split,
                "total": len(trainer.params)})
print("RESULT" + json.dumps(out))
"""

CASES = {
    "gpt-ttm": ("tiny", {"*": {"kind": "ttm", "rank": 4}, "embedding": {"kind": "ttm", "rank": 4}}),
    "llama-btt": ("llama-tiny", {"*": {"kind": "btt", "rank": 2}}),
    "gpt-dense": ("tiny", {"*": {"kind": "dense"}}),
    "gpt-btt": ("tiny", {"*": {"kind": "btt", "rank": 2}}),
    "gpt-lowrank": ("tiny", {"*": {"kind": "lowrank", "rank": 8}, "embedding": {"kind": "lowrank", "rank": 8}}),
    "llama-dense": ("llama-tiny", {"*": {"kind": "dense"}}),
    "llama-ttm": ("llama-tiny", {"*": {"kind": "ttm", "rank": 4}}),
    "llama-lowrank": ("llama-tiny", {"*": {"kind": "lowrank", "rank": 8}}),
}


def _run_cases(names):
  # XLA_FLAGS keeps conftest's optimization level (most of the time here is compiling)
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"}
  r = subprocess.run([sys.executable, "-c", MULTI, json.dumps([CASES[n] for n in names])], env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  results = json.loads(r.stdout.split("RESULT", 1)[1])
  for name, res in zip(names, results):
    assert res["placed"], name
    assert res["split"] >= res["total"] // 2, (name, res)  # most parameters are split, not only replicated
    # Same math, other reduction orders across devices: float32 agreement.
    np.testing.assert_allclose(res["got"], res["want"], rtol=1e-5, err_msg=name)
    assert res["diff"] < 1e-4, name  # after two AdamW steps


@pytest.mark.slow  # eight 4-device trainers (about 80 s; the default suite keeps the sharding checks above)
def test_fsdp_tp_train_steps_match_one_device_for_every_kind():
  _run_cases(list(CASES))
