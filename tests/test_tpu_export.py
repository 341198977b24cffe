"""TPU, checked without one: the training step, the decode step and the forward of every layer kind export for TPU
(``jax.export`` lowers them to TPU StableHLO here, on a CPU), which fails on GPU-only operations: cuDNN's fused
attention, the Triton kernels of `tnjax.core.contraction.fused`.

tnjax picks between those and XLA's when a model is traced, from JAX's default backend; the ``on`` fixture makes it
read "tpu", as on a TPU host (and "gpu" for the controls, which show that the export does catch GPU kernels).
Models are abstract (``nnx.eval_shape``): exporting needs only shapes.
"""

import traceback
import warnings

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from tnjax.core.contraction import PATHS
from tnjax.core.contraction.fused import fused_dims
from tnjax.models import build, preset
from tnjax.models.decoder import make_embedding

D = 256  # the fused kernels' layouts need widths in multiples of 256


def _fused(path, m, n):
  """A two-core TT-matrix in the fused kernels' layout: on a GPU, "auto", "fused" and "fused_fwd" run them."""
  (a, b), (p, q) = fused_dims(m, n)
  return {"kind": "ttm", "rank": 4, "num_cores": 2, "in_dims": [a, b], "out_dims": [p, q], "path": path}


# One kind per projection over three blocks: TT-matrix on every path, BTT, low rank, and int8 of every kind.
GPT_LAYERS = {
    "h.0.attn.c_attn": _fused("fused", D, 3 * D), "h.0.attn.c_proj": _fused("fused_fwd", D, D),
    "h.0.mlp.c_fc": _fused("auto", D, 4 * D), "h.0.mlp.c_proj": _fused("dense", 4 * D, D),
    "h.1.attn.c_attn": _fused("direct", D, 3 * D), "h.1.attn.c_proj": _fused("split", D, D),
    "h.1.mlp.c_fc": {"kind": "ttm", "rank": 4, "quant": "int8"}, "h.1.mlp.c_proj": {"kind": "btt", "rank": 2},
    "h.2.attn.c_attn": {"kind": "btt", "rank": 2, "quant": "int8"},
    "h.2.attn.c_proj": {"kind": "lowrank", "rank": 8},
    "h.2.mlp.c_fc": {"kind": "lowrank", "rank": 8, "quant": "int8"},
    "h.2.mlp.c_proj": {"kind": "dense", "quant": "int8"},
}
# Llama: grouped-query attention (k/v at half width: not a fused layout), SwiGLU, an untied BTT head.
LLAMA_LAYERS = {"attn.q_proj": _fused("auto", D, D), "attn.k_proj": {"kind": "ttm", "rank": 4},
                "attn.o_proj": _fused("fused", D, D), "mlp.gate_proj": _fused("fused_fwd", D, 2 * D),
                "mlp.up_proj": {"kind": "lowrank", "rank": 8}, "mlp.down_proj": {"kind": "btt", "rank": 2},
                "lm_head": {"kind": "btt", "rank": 2}}
MODELS = {
    "gpt2": lambda: preset("tiny", n_layer=3, d_model=D, n_head=4, vocab_size=512, block_size=32,
                           layers={**GPT_LAYERS, "embedding": {"kind": "ttm", "rank": 4}}, attention_impl="cudnn"),
    "llama": lambda: preset("llama-tiny", n_layer=1, d_model=D, n_head=4, n_kv_head=2, d_ff=2 * D, vocab_size=512,
                            block_size=32, tie_embeddings=False, layers=LLAMA_LAYERS, attention_impl="cudnn"),
}


@pytest.fixture
def on(monkeypatch):
  """``on("tpu")``: trace as on a host whose default backend is that platform."""
  def use(platform):
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
  return use


def _export(f, *args):
  """``f`` exported for TPU (fails on GPU-only operations); arguments may be ShapeDtypeStructs."""
  with warnings.catch_warnings():  # path="fused" off a GPU says it falls back to "auto"
    warnings.filterwarnings("ignore", message=".*falls back to 'auto'")
    return jax.export.export(f if hasattr(f, "trace") else jax.jit(f), platforms=("tpu",))(*args)


def _abstract(cfg):
  model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
  return model, *nnx.split(model)


def test_the_layers_cover_every_kind_and_path():
  specs = [*GPT_LAYERS.values(), *LLAMA_LAYERS.values()]
  assert {s["path"] for s in specs if "path" in s} == set(PATHS)
  assert {(s["kind"], s.get("quant")) for s in specs} >= {(k, q) for k in ("dense", "ttm", "btt", "lowrank")
                                                           for q in (None, "int8")} - {("dense", None)}


FAMILIES = ["gpt2", pytest.param("llama", marks=pytest.mark.slow)]


def _no_gpu_ops(exported):
  text = exported.mlir_module()
  assert exported.platforms == ("tpu",) and "triton" not in text and "cudnn" not in text


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_of_every_layer_kind_exports_for_tpu(family, on):
  on("tpu")
  _, graphdef, state = _abstract(MODELS[family]())
  forward = _export(lambda s, ids: nnx.merge(graphdef, s)(ids), state, jax.ShapeDtypeStruct((2, 32), jnp.int32))
  assert forward.out_avals[0].shape == (2, 32, 512)
  _no_gpu_ops(forward)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_step_exports_for_tpu(family, on):
  """One KV-cached step of `tnjax.models.generate` (a token per row, at the cache's traced slot index)."""
  on("tpu")
  model, graphdef, state = _abstract(MODELS[family]())
  cache = jax.eval_shape(lambda: model.init_cache(2))
  step = _export(lambda s, token, cache: nnx.merge(graphdef, s).step(token, cache), state,
                 jax.ShapeDtypeStruct((2, 1), jnp.int32), cache)
  assert step.out_avals[0].shape == (2, 1, 512)
  _no_gpu_ops(step)


@pytest.mark.parametrize("spec", [{"kind": "dense"}, {"kind": "lowrank", "rank": 8}, {"kind": "mps", "rank": 4},
                                  *({"kind": "ttm", "rank": 4, "path": p} for p in ("auto", "dense", "direct",
                                                                                      "split"))],
                         ids=lambda s: "-".join(str(v) for k, v in s.items() if k != "rank"))
def test_embeddings_and_their_tied_heads_export_for_tpu(spec, on):
  on("tpu")
  cfg = preset("tiny", d_model=D, vocab_size=512, layers={"embedding": spec})
  graphdef, state = nnx.split(nnx.eval_shape(lambda: make_embedding(cfg, nnx.Rngs(0))))
  rows = _export(lambda s, ids: nnx.merge(graphdef, s)(ids), state, jax.ShapeDtypeStruct((2, 8), jnp.int32))
  logits = _export(lambda s, x: nnx.merge(graphdef, s).attend(x), state, jax.ShapeDtypeStruct((2, 8, D), jnp.float32))
  assert rows.out_avals[0].shape == (2, 8, D) and logits.out_avals[0].shape[:2] == (2, 8)


# What the training steps train: one block, TT-matrices on the fused layout (and the Llama layers), dropout on.
TRAINED = {"gpt2": ("tiny", {"attn.c_attn": _fused("fused", D, 3 * D), "attn.c_proj": _fused("fused_fwd", D, D),
                             "mlp.c_fc": _fused("auto", D, 4 * D), "mlp.c_proj": {"kind": "btt", "rank": 2}}, {}),
           "llama": ("llama-tiny", LLAMA_LAYERS, {"n_kv_head": 2, "d_ff": 2 * D, "tie_embeddings": False})}


def _trainer(family):
  from tnjax.train import TrainConfig, Trainer

  model, layers, extra = TRAINED[family]
  overrides = {"n_layer": 1, "d_model": D, "n_head": 4, "attention_impl": "cudnn", "dropout": 0.1, **extra}
  return Trainer(TrainConfig(model=model, model_overrides=overrides, layers=layers, block_size=32, batch_size=4,
                             steps=2), vocab_size=512)


@pytest.mark.slow  # a real Trainer: its first model init compiles each eager op (~10 s on the 2-core CPU)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_step_exports_for_tpu(family, on):
  """The jitted step `tnjax train` runs (AdamW, clipping, dropout keys), on fused-layout TT-matrices with cuDNN
  attention asked for."""
  on("tpu")
  with jax.numpy_dtype_promotion("standard"):
    trainer = _trainer(family)
    batch = jax.ShapeDtypeStruct((1, 4, 32), jnp.int32, sharding=trainer.batch_sharding)
    exported = _export(trainer._step, trainer.params, trainer.opt_state, batch, batch, jax.random.key(0))
  assert exported.out_avals[-2].shape == ()  # the loss
  _no_gpu_ops(exported)


@pytest.mark.parametrize("what", ["fused kernels", "cudnn attention"])
def test_controls_a_gpu_host_traces_gpu_kernels_which_do_not_export_for_tpu(what, on):
  """The same model traced as on a GPU host runs the Triton kernels (path "fused") or cuDNN's attention, and the
  TPU export refuses them (cuDNN's is refused while tracing here: this CPU has no cuDNN)."""
  on("gpu")
  layers = {"attn.c_attn": _fused("fused", D, 3 * D)} if what == "fused kernels" else {}
  cfg = preset("tiny", n_layer=1, d_model=D, vocab_size=512, block_size=32, layers=layers,
               attention_impl="cudnn" if what == "cudnn attention" else None)
  _, graphdef, state = _abstract(cfg)
  with pytest.raises(Exception) as caught:  # noqa: B017 - raised inside Pallas's TPU lowering or cuDNN's, their types
    _export(lambda s, ids: nnx.merge(graphdef, s)(ids), state, jax.ShapeDtypeStruct((2, 32), jnp.int32))
  where = " ".join(frame.filename for frame in traceback.extract_tb(caught.tb))
  assert ("pallas" if what == "fused kernels" else "cudnn") in where, where
