"""Generation: greedy tokens equal to transformers (batched, ragged, stop tokens), batched equal to one at a time,
every layer kind decoding as a full recompute, on-device sampling, bfloat16 parameters cast once, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.hf_fixtures import make_hf_gpt2, make_hf_llama
from tnjax.compress import modegpt_compress, quantize_int8
from tnjax.interop import load_hf
from tnjax.models import GPT, Llama, generate, preset
from tnjax.models.generate import _decode, sample

pytestmark = pytest.mark.filterwarnings("ignore")

ROWS = [[5, 17, 3, 88, 41], [9, 60], [22, 7, 13, 70, 2, 31, 54]]  # ragged: 5, 2 and 7 tokens


def _left_padded(rows, pad=0):
  width = max(map(len, rows))
  ids, mask = np.full((len(rows), width), pad), np.zeros((len(rows), width), np.int64)
  for i, r in enumerate(rows):
    ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
  return ids, mask


def _hf_greedy(hf, rows, new, stop=None):
  import torch

  ids, mask = _left_padded(rows)
  hf.generation_config.eos_token_id = stop  # None: no early stop and no token suppressed
  with torch.no_grad():
    return hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new, do_sample=False,
                       pad_token_id=0).numpy()


def _full_recompute_greedy(model, rows, new):
  """Greedy tokens of each row from the uncached forward pass over its whole sequence at every step (right
  padding changes no earlier logit of a causal model: one compilation)."""
  forward = nnx.jit(lambda m, x: m(x))
  ids = np.zeros((len(rows), max(map(len, rows)) + new), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
  for step in range(new):
    logits = np.asarray(forward(model, jnp.asarray(ids)))
    for i, r in enumerate(rows):
      ids[i, len(r) + step] = np.argmax(logits[i, len(r) + step - 1])
  return [ids[i, len(r):len(r) + new] for i, r in enumerate(rows)]


@pytest.mark.parametrize("make", [make_hf_gpt2, make_hf_llama], ids=["gpt2", "llama"])
def test_ragged_batch_equals_transformers(tmp_path, make):
  hf = make(tmp_path, initializer_range=0.2)  # a wider init than the default: continuations that vary
  model = load_hf(tmp_path)
  want = _hf_greedy(hf, ROWS, 10)
  got = np.asarray(generate(model, ROWS, 10, temperature=0.0))
  np.testing.assert_array_equal(got, want)
  assert len({tuple(r) for r in got[:, 7:].tolist()}) == 3 and len(set(got[0, 7:].tolist())) > 3  # not degenerate
  # a stop token ends its row (the rest padding), the others go on; as transformers' eos
  stop = int(got[0, 7 + 3])
  stopped = np.asarray(generate(model, ROWS, 10, temperature=0.0, stop_tokens=[stop]))
  np.testing.assert_array_equal(stopped, _hf_greedy(hf, ROWS, 10, stop=stop))
  first = list(got[0, 7:]).index(stop)
  assert (stopped[0, 7 + first + 1:] == 0).all() and stopped[0, 7 + first] == stop


@pytest.mark.parametrize("family", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_batched_equals_one_at_a_time(family):
  model = _model(family, "dense", init_std=0.2)
  got = np.asarray(generate(model, ROWS, 8, temperature=0.0))
  for row, out in zip(ROWS, got):  # each prompt alone: no padding
    np.testing.assert_array_equal(np.asarray(generate(model, row, 8, temperature=0.0))[len(row):], out[7:])


def test_the_loop_ends_when_every_row_has_finished():
  model = GPT(preset("tiny", n_layer=1, init_std=0.2), rngs=nnx.Rngs(0))
  out = np.asarray(generate(model, [[1, 2, 3], [4, 5]], 12, temperature=0.0))
  stops = [int(out[0, 3]), int(out[1, 3])]  # each row's first new token
  stopped = np.asarray(generate(model, [[1, 2, 3], [4, 5]], 12, temperature=0.0, stop_tokens=stops, pad_id=7))
  np.testing.assert_array_equal(stopped[:, 3], out[:, 3])
  assert (stopped[:, 4:] == 7).all()


def _layers(family, kind):
  gpt = family == "gpt2"
  kinds = {"ttm": {"mlp.c_fc": {"kind": "ttm", "rank": 4}, "embedding": {"kind": "ttm", "rank": 8}} if gpt
           else {"*": {"kind": "ttm", "rank": 4}},
           "btt": {"mlp.c_proj" if gpt else "mlp.up_proj": {"kind": "btt", "rank": 2}},
           "lowrank": {"attn.c_attn" if gpt else "attn.k_proj": {"kind": "lowrank", "rank": 8},
                       "embedding": {"kind": "lowrank", "rank": 16}}}
  kinds["mixed"] = {**kinds["ttm"], **kinds["btt"], **kinds["lowrank"]}
  return kinds.get(kind, {})


def _model(family, kind, init_std=0.1):
  cls, name = (GPT, "tiny") if family == "gpt2" else (Llama, "llama-tiny")
  model = cls(preset(name, n_layer=1, init_std=init_std, block_size=32, layers=_layers(family, kind)),
              rngs=nnx.Rngs(1))
  if kind in ("int8", "mixed"):  # mixed: int8 on top of TT-matrix, BTT and low-rank layers
    return quantize_int8(model)
  if kind == "modegpt":
    return modegpt_compress(model, [np.random.default_rng(0).integers(0, 512, (4, 32))], ratio=0.5,
                            allocation="uniform")
  return model


DEFAULT_KINDS = (("llama", "modegpt"),)  # default suite time; every kind (and the mixed models) runs with -m slow
KINDS = [pytest.param(f, k, marks=() if (f, k) in DEFAULT_KINDS else pytest.mark.slow)
         for f in ("gpt2", "llama") for k in ("dense", "ttm", "btt", "lowrank", "int8", "modegpt", "mixed")]


@pytest.mark.parametrize("family, kind", KINDS)
def test_every_layer_kind_decodes_as_the_full_recompute(family, kind):
  model = _model(family, kind)
  if kind == "modegpt":
    assert model.config.block_dims(0)[1] < model.config.head_dim  # narrowed queries and keys
  rows = [[3, 1, 4, 1, 5], [9, 2]]
  got = np.asarray(generate(model, rows, 6, temperature=0.0))
  np.testing.assert_array_equal(got[:, 5:], np.stack(_full_recompute_greedy(model, rows, 6)))


def test_sample_on_fixed_logits():
  logits = jnp.log(jnp.tile(jnp.array([[0.05, 0.5, 0.3, 0.15]], jnp.float32), (4000, 1)))
  draw = lambda **kw: np.asarray(sample(logits, jax.random.key(3), temperature=1.0, **kw))  # noqa: E731
  assert set(draw(top_k=2).tolist()) == {1, 2}
  assert set(draw(top_p=0.5).tolist()) == {1}  # 0.5 reaches 0.5
  assert set(draw(top_p=0.75).tolist()) == {1, 2}  # 0.5 + 0.3 reaches 0.75
  assert set(draw(top_p=0.81, top_k=2).tolist()) == {1, 2}
  counts = np.bincount(draw(), minlength=4) / 4000  # the softmax itself
  np.testing.assert_allclose(counts, [0.05, 0.5, 0.3, 0.15], atol=0.03)
  assert np.mean(draw() != np.asarray(sample(logits, jax.random.key(3), temperature=0.5))) > 0.1  # sharper
  assert (np.asarray(sample(logits, None, temperature=0.0)) == 1).all()


def test_top_k_1_and_a_tiny_top_p_are_greedy_and_seeds_reproduce():
  model = GPT(preset("tiny", n_layer=1, init_std=0.2), rngs=nnx.Rngs(0))
  rows = [[1, 2, 3], [4, 5, 6, 7]]
  greedy = np.asarray(generate(model, rows, 8, temperature=0.0))
  key = jax.random.key(5)
  np.testing.assert_array_equal(generate(model, rows, 8, temperature=1.0, top_k=1, rng=key), greedy)
  np.testing.assert_array_equal(generate(model, rows, 8, temperature=1.0, top_p=1e-6, rng=key), greedy)
  a, b = (np.asarray(generate(model, rows, 8, temperature=1.0, rng=key)) for _ in range(2))
  np.testing.assert_array_equal(a, b)
  assert (np.asarray(generate(model, rows, 8, temperature=1.0, rng=jax.random.key(6))) != a).any()


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax.extend.core.Jaxpr):
        yield v


def _weight_casts(model, rows, new):
  """Conversions of floating parameter-shaped arrays inside the decode loop (no stop token: a scan)."""
  shapes = {x.shape for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)) if x.ndim >= 2}
  graphdef, state = nnx.split(model)
  traced = _decode.trace(graphdef, state, jnp.asarray(rows, jnp.int32), jnp.zeros(len(rows), jnp.int32),
                                         jax.random.key(0), jnp.zeros(0, jnp.int32), new, 0.0, None, None,
                                         jnp.int32(0))

  def walk(jaxpr, in_loop):
    for e in jaxpr.eqns:
      if (in_loop and e.primitive.name == "convert_element_type" and tuple(e.invars[0].aval.shape) in shapes
          and jnp.issubdtype(e.invars[0].aval.dtype, jnp.floating)):  # int8 weights convert inside their matmul
        yield e
      for sub in _sub_jaxprs(e):
        yield from walk(sub, in_loop or e.primitive.name in ("while", "scan"))

  loops = [e for e in traced.jaxpr.jaxpr.eqns if e.primitive.name in ("while", "scan")]
  assert len(loops) == 1
  return list(walk(traced.jaxpr.jaxpr, False))


def test_bfloat16_parameters_are_cast_once_not_per_step():
  model = quantize_int8(GPT(preset("tiny", n_layer=1), rngs=nnx.Rngs(0)), layers=["h.0.mlp.c_fc"])
  half = model.astype("bfloat16")
  assert half.config.dtype == "bfloat16" and half.astype("bfloat16") is half
  assert half.h[0].attn.c_attn.kernel.dtype == jnp.bfloat16 and half.wte.embedding.dtype == jnp.bfloat16
  assert half.h[0].mlp.c_fc.q.dtype == jnp.int8  # int8 weights stay int8
  with jax.numpy_dtype_promotion("standard"):
    assert _weight_casts(half, [[1, 2]], 3) == []
    # computing in bfloat16 from float32 parameters casts every weight in every step
    assert len(_weight_casts(GPT(preset("tiny", n_layer=1, dtype="bfloat16"), rngs=nnx.Rngs(0)), [[1, 2]], 3)) >= 4
    np.testing.assert_array_equal(generate(model, [1, 2, 3], 5, temperature=0.0, dtype="bfloat16"),
                                  generate(half, [1, 2, 3], 5, temperature=0.0))
  cache = half.init_cache(1, 8)
  assert cache[0].keys.dtype == jnp.bfloat16 and cache[0].length == 8  # the cache in the computation dtype


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_ids=[[1, 2], []]), r"generate: prompt_ids\[1\] is empty but every prompt needs at least one"),
    (dict(prompt_ids=[[1, 2], [1.5]]), r"generate: prompt_ids\[1\] has shape \(1,\), dtype float64 but a sequence"),
    (dict(prompt_ids=np.zeros((2, 0), np.int32)), r"generate: prompt_ids.shape=\(2, 0\) but \(time,\) or"),
    (dict(prompt_ids=[[1] * 100, [2]], max_new_tokens=40), r"generate: prompt length 100 \+ max_new_tokens 40 = "
                                                           r"140 but block_size=128"),
    (dict(top_p=0.0), r"generate: top_p=0.0 but 0 < top_p <= 1"),
    (dict(top_p=1.5), r"generate: top_p=1.5 but 0 < top_p <= 1"),
    (dict(top_p=float("nan")), r"generate: top_p=nan but 0 < top_p <= 1"),
    (dict(temperature=float("nan")), r"generate: temperature=nan but a number >= 0"),
    (dict(temperature=-0.5), r"generate: temperature=-0.5 but a number >= 0"),
    (dict(temperature=float("inf")), r"generate: temperature=inf but a number >= 0 \(finite"),
    (dict(top_k=0), r"generate: top_k=0 but 1 <= top_k <= vocab_size=512"),
    (dict(top_k=2.0), r"generate: top_k=2.0 but 1 <= top_k"),
    (dict(stop_tokens=[3, 512]), r"generate: stop_tokens contain 512 but 0 <= id < vocab_size=512"),
    (dict(pad_id=-1), r"generate: pad_id=-1 but an id in \[0, vocab_size=512\)"),
    (dict(dtype="int8"), r"generate: dtype='int8' but None or one of \('float32', 'bfloat16', 'float16'\)"),
    (dict(temperature=0.7), r"generate: rng=None but sampling \(temperature=0.7\) needs a jax.random key"),
])
def test_bad_input_is_refused_before_anything_compiles(kwargs, match):
  model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
  kwargs = {"prompt_ids": [[1, 2, 3], [4]], "max_new_tokens": 4, "temperature": 0.0, **kwargs}
  if "top_p" in kwargs or "top_k" in kwargs:
    kwargs.update(temperature=1.0, rng=jax.random.key(0))
  compiled = _decode._cache_size()
  with pytest.raises(ValueError, match=match):
    generate(model, **kwargs)
  assert _decode._cache_size() == compiled


def test_cache_and_step_refuse_what_does_not_fit():
  model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"GPT.init_cache: length=129 but at most block_size=128 slots"):
    model.init_cache(1, 129)
  with pytest.raises(ValueError, match=r"GPT.init_cache: start.shape=\(3,\) but \(2,\) \(one slot per row\)"):
    model.init_cache(2, 8, start=[0, 1, 2])
  with pytest.raises(ValueError, match=r"GPT.step: 5 tokens at slot 0 but the cache has 4 slots"):
    model.step(jnp.ones((1, 5), jnp.int32), model.init_cache(1, 4))
