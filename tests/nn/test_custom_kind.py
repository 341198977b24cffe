"""A layer kind defined here, outside the package, works end to end with no edit to tnjax: configs of both
families, the forward pass against a float64 reference, muP fan-ins, FLOP counts, a training step, native
save/load, int8, Hugging Face export as dense, and compression."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tnjax.compress import quantize_int8, svd_compress
from tnjax.core.shapes import factorize
from tnjax.interop import load_hf, load_model, save_hf, save_model
from tnjax.models import build, config, preset
from tnjax.models.decoder import dense_kernel
from tnjax.nn import LayerKind, hidden_fan_ins, kind_names, kinds, register


class KronLinear(nnx.Module):
  """``W = sum_r A_r (x) B_r``: a sum of ``rank`` Kronecker products, (in, out) = (a_in * b_in, a_out * b_out)."""

  def __init__(self, in_features, out_features, *, rank, use_bias, dtype, std, rngs):
    self.in_features, self.out_features, self.rank = in_features, out_features, rank
    (self.a_in, self.b_in), (self.a_out, self.b_out) = factorize(in_features, 2), factorize(out_features, 2)
    scale = math.sqrt(std / math.sqrt(rank))  # each entry of W sums rank products of two entries
    self.a = nnx.Param(jax.random.normal(rngs.params(), (rank, self.a_in, self.a_out), jnp.float32) * scale)
    self.b = nnx.Param(jax.random.normal(rngs.params(), (rank, self.b_in, self.b_out), jnp.float32) * scale)
    self.bias = nnx.Param(jnp.zeros(out_features, jnp.float32)) if use_bias else None
    self.dtype = dtype

  @property
  def kernel(self):
    a, b = self.a[...], self.b[...]
    return jnp.einsum("rik,rjl->ijkl", a, b).reshape(self.a_in * self.b_in, self.a_out * self.b_out)

  @property
  def num_params(self):
    return self.a.size + self.b.size + (0 if self.bias is None else self.bias.size)

  def flops(self, rows):
    return 2 * rows * self.rank * (self.a_in * self.b_in * self.a_out + self.b_in * self.a_out * self.b_out)

  def __call__(self, x):
    x4 = x.reshape(x.shape[:-1] + (self.a_in, self.b_in))
    y = jnp.einsum("...ij,rik,rjl->...kl", x4, self.a[...].astype(x.dtype), self.b[...].astype(x.dtype))
    y = y.reshape(x.shape[:-1] + (self.out_features,))
    return y if self.bias is None else y + self.bias[...].astype(y.dtype).reshape((1,) * (y.ndim - 1) + (-1,))


class Kron(LayerKind):
  name, summary, layers = "kron", "kron (rank)", (KronLinear,)

  def check_shape(self, spec, where, n_in, n_out):
    if spec.quant is not None:
      raise ValueError(f"{where}: quant={spec.quant!r} but kind 'kron' stores float factors")

  def linear(self, spec, n_in, n_out, *, std, use_bias, dtype, rngs, balance="equal"):
    return KronLinear(n_in, n_out, rank=spec.rank, use_bias=use_bias, dtype=dtype, std=std, rngs=rngs)

  def fan_ins(self, layer):
    return {"a": layer.rank * layer.a_in, "b": layer.rank * layer.b_in}


@pytest.fixture()
def kron():
  register(Kron())
  yield
  kinds.unregister("kron")


GPT_LAYERS = {"mlp.c_fc": {"kind": "kron", "rank": 2}, "h.1.attn.c_proj": {"kind": "kron", "rank": 1}}
LLAMA_LAYERS = {"mlp.up_proj": {"kind": "kron", "rank": 2}}


def _model(name, layers):
  return build(preset(name, d_model=64, n_head=4, vocab_size=128, layers=layers), rngs=nnx.Rngs(0))


def test_the_kind_is_registered_and_leaves_when_unregistered(kron):
  assert "kron" in config.KINDS and "kron" in kind_names(projection=True) and "kron" not in kind_names(embedding=True)
  with pytest.raises(ValueError, match=r"register: layer kind 'kron' is already registered"):
    register(Kron())
  with pytest.raises(ValueError, match=r"layers\['embedding'\].kind='kron' but 'kron' is for projections"):
    preset("tiny", layers={"embedding": {"kind": "kron", "rank": 2}})
  with pytest.raises(ValueError, match=r"layers\['mlp.c_fc'\].rank=None but a positive integer is expected"):
    preset("tiny", layers={"mlp.c_fc": {"kind": "kron"}})
  with pytest.raises(ValueError, match=r"quant='int8' but kind 'kron' stores float factors"):
    preset("tiny", layers={"mlp.c_fc": {"kind": "kron", "rank": 2, "quant": "int8"}})
  kinds.unregister("kron")
  with pytest.raises(ValueError, match=r"layers\['mlp.c_fc'\].kind='kron' but one of \('dense', 'ttm'"):
    preset("tiny", layers={"mlp.c_fc": {"kind": "kron", "rank": 2}})
  register(Kron())


def test_bad_registrations():
  with pytest.raises(ValueError, match=r"register: kind=3 but a LayerKind instance is expected"):
    register(3)

  class Nameless(LayerKind):
    pass

  with pytest.raises(ValueError, match=r"register: kind.name='' but a non-empty identifier string is expected"):
    register(Nameless())

  class Nothing(LayerKind):
    name, projection = "nothing", False

  with pytest.raises(ValueError, match=r"register: kind 'nothing' has projection=False and embedding=False"):
    register(Nothing())
  with pytest.raises(ValueError, match=r"unregister: 'ttm' is a built-in layer kind"):
    kinds.unregister("ttm")


@pytest.mark.parametrize("name, layers, path", [("tiny", GPT_LAYERS, "h.0.mlp.c_fc"),
                                                ("llama-tiny", LLAMA_LAYERS, "h.0.mlp.up_proj")])
def test_a_custom_kind_builds_in_both_families_and_matches_its_dense_kernel(kron, name, layers, path):
  model = _model(name, layers)
  layer = model.layer(path)
  assert isinstance(layer, KronLinear)
  a, b = np.asarray(layer.a[...], np.float64), np.asarray(layer.b[...], np.float64)
  w = sum(np.kron(a[r], b[r]) for r in range(layer.rank))  # float64 reference of the kernel
  np.testing.assert_allclose(np.asarray(dense_kernel(layer), np.float64), w, rtol=1e-5, atol=1e-7)
  x = np.random.default_rng(0).standard_normal((3, layer.in_features))
  np.testing.assert_allclose(np.asarray(jax.jit(lambda m, v: m(v))(layer, jnp.asarray(x, jnp.float32))),
                             x @ w + np.asarray(layer.bias[...] if layer.bias is not None else 0.0),
                             rtol=1e-4, atol=1e-5)
  fans = hidden_fan_ins(model)
  assert fans[f"{path}.a"] == layer.rank * layer.a_in and fans[f"{path}.b"] == layer.rank * layer.b_in
  # the FLOP count reads the kind's own cost: what it saves against dense, over every Kronecker layer
  krons = [node for _, node in nnx.iter_graph(model) if isinstance(node, KronLinear)]
  saved = sum(2 * k.in_features * k.out_features - k.flops(1) for k in krons)
  assert len(krons) == (3 if name == "tiny" else 2) and saved > 0
  assert _model(name, {}).flops_per_token() - model.flops_per_token() == pytest.approx(saved)


@pytest.mark.slow  # a minute: a training step, and a compilation per format
def test_a_custom_kind_trains_saves_loads_quantizes_exports_and_compresses(kron, tmp_path):
  from tnjax.train import Trainer
  from tnjax.train.config import resolve

  cfg = resolve(None, ['model_overrides={"n_layer": 2, "d_model": 64, "n_head": 4}', "block_size=16", "batch_size=4",
                       "steps=3", "warmup=1", "lr=0.01", "eval_batches=1", 'layers={"mlp.c_fc": {"kind": "kron", '
                       '"rank": 2}}', f"out_dir={tmp_path / 'run'}"])
  with jax.numpy_dtype_promotion("standard"):  # optax mixes its int step count with floats
    trainer = Trainer(cfg, 128)
    before = {k: np.asarray(v) for k, v in trainer.params.items() if ".a." in k or k.endswith(".a.value")}
    tokens = np.random.default_rng(0).integers(0, 128, 4000).astype(np.uint16)
    losses = [float(trainer.step(s, tokens)[0]) for s in range(3)]
  assert all(np.isfinite(losses))
  after = {k: np.asarray(v) for k, v in trainer.params.items() if k in before}
  assert before and any(not np.array_equal(before[k], after[k]) for k in before)  # the factors train
  model = trainer.model()
  assert isinstance(model.h[0].mlp.c_fc, KronLinear)
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 16)))
  logits = np.asarray(model(ids))

  save_model(model, tmp_path / "native")
  np.testing.assert_array_equal(np.asarray(load_model(tmp_path / "native")(ids)), logits)

  q = quantize_int8(model)
  assert q.config.spec("mlp.c_fc", 0).quant == "int8" and q.config.spec("mlp.c_fc", 0).kind == "dense"
  np.testing.assert_allclose(np.asarray(q(ids)), logits, atol=0.05 * np.abs(logits).max())

  save_hf(model, tmp_path / "hf")  # as dense
  np.testing.assert_allclose(np.asarray(load_hf(tmp_path / "hf")(ids)), logits, rtol=1e-4, atol=1e-4)

  names = [f"h.{i}.mlp.c_fc" for i in range(model.config.n_layer)]
  full = svd_compress(model, rank=64, layers=names, if_larger="allow")  # full rank: the kernel itself
  assert full.config.spec("mlp.c_fc", 0).kind == "lowrank"
  np.testing.assert_allclose(np.asarray(full(ids)), logits, rtol=1e-4, atol=1e-4)
  assert svd_compress(model, rank=1, layers=names).num_params < model.num_params
