"""Llama-style decoders in Flax NNX: RMSNorm, rotary position embeddings, SwiGLU MLP, grouped-query attention.

Numerically the function of Hugging Face ``LlamaForCausalLM`` (and
``Qwen2ForCausalLM``: q/k/v biases, no output bias): pre-RMSNorm blocks,
rotary embeddings on split halves of each head (``rotate_half``, not
interleaved pairs) with ``rope_theta`` and optional Llama-3 or linear
``rope_scaling``, ``down(silu(gate(x)) * up(x))``, and ``kv_heads`` key/value
heads shared by groups of query heads. Every projection is dense,
TT-matrix, BTT or low-rank as the config's ``layers`` say, as in
[`GPT`][tnjax.models.GPT]; layer names are ``h.{i}.attn.q_proj``,
``h.{i}.mlp.gate_proj``, ... (see `tnjax.models.names`).

Blocks narrowed by MoDeGPT keep a subset of each head's rotary pairs: the
config's ``dims["h.{i}"]["rope_pairs"]`` lists the rotary frequencies kept
(one list for every head of the block), so rotary embeddings stay exact.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tnjax.core import _checks
from tnjax.models.config import DecoderConfig
from tnjax.models.decoder import (
    CausalAttention,
    Decoder,
    PreNormBlock,
    balance_of,
    dense_kernel,
    dtype_of,
    make_embedding,
    make_head,
    make_linear,
    positions,
)
from tnjax.models.names import block_key

ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_KEYS = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


@dataclasses.dataclass(frozen=True)
class LlamaConfig(DecoderConfig):
  """A Llama-style decoder (Llama 2/3, SmolLM, Qwen2 shapes).

  Attributes:
    vocab_size, block_size, n_layer, n_head, d_model, d_ff: sizes as in
      [`GPTConfig`][tnjax.models.GPTConfig] (``block_size`` is Hugging Face's
      ``max_position_embeddings``; ``d_ff`` its ``intermediate_size``, default
      ``4 * d_model``).
    n_kv_head: key/value heads (grouped-query attention); None is ``n_head``
      (multi-head attention). Must divide ``n_head``.
    rms_norm_eps: RMSNorm epsilon.
    rope_theta: base of the rotary frequencies.
    rope_scaling: None, or a dict with ``rope_type`` "linear" (``factor``) or
      "llama3" (``factor``, ``low_freq_factor``, ``high_freq_factor``,
      ``original_max_position_embeddings``), as Hugging Face's.
    attention_bias: biases on the query, key and value projections (Qwen2).
    output_bias: a bias on the attention output projection (Llama's
      ``attention_bias=True`` sets both).
    dropout, tie_embeddings, init_std, layers, attention_impl, dtype, vocab_multiple: as `GPTConfig`.
      Every projection is initialized with std ``init_std`` (Hugging Face's ``initializer_range``).
    dims: per-block sizes set by MoDeGPT, keyed "h.{i}": "d_ff", "qk_dim",
      "v_dim" and "rope_pairs" (the rotary frequency indices kept, sorted,
      ``qk_dim / 2`` of them).
    mup_base_width: None, or the muP base width, as `GPTConfig` (every projection's init std scaled by
      ``sqrt(mup_base_width / d_model)``, the head's input by ``mup_base_width / d_model``; an untied head keeps
      ``init_std`` and the base learning rate). `at_width` scales the key/value heads with the query heads, so
      the base model keeps the grouping ``n_head / n_kv_head`` where its width allows (fewer key/value heads
      where it does not; muP's fan-ins do not depend on them).

  Examples:
    >>> cfg = LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, vocab_size=100)
    >>> cfg.kv_heads, cfg.projection_shape("attn.k_proj", 0), cfg.projection_shape("mlp.down_proj", 1)
    (2, (64, 32), (128, 64))
    >>> LlamaConfig.from_json(cfg.to_json()) == cfg
    True
  """

  vocab_size: int = 49152
  block_size: int = 2048
  n_layer: int = 30
  n_head: int = 9
  n_kv_head: int | None = None
  d_model: int = 576
  d_ff: int | None = None
  dropout: float = 0.0
  tie_embeddings: bool = True
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: dict[str, Any] | None = None
  attention_bias: bool = False
  output_bias: bool = False
  init_std: float = 0.02
  layers: dict[str, Any] = dataclasses.field(default_factory=dict)
  attention_impl: str | None = None
  dtype: str | None = None
  dims: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  vocab_multiple: int = 128
  mup_base_width: int | None = None

  FAMILY = "llama"
  PROJECTIONS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj")
  PROJECTION_AXES = {"attn.q_proj": ("embed", "heads"), "attn.k_proj": ("embed", "kv_heads"),
                     "attn.v_proj": ("embed", "kv_heads"), "attn.o_proj": ("heads", "embed"),
                     "mlp.gate_proj": ("embed", "mlp"), "mlp.up_proj": ("embed", "mlp"),
                     "mlp.down_proj": ("mlp", "embed")}
  BLOCK_DIMS = ("d_ff", "qk_dim", "v_dim", "rope_pairs")
  __hash__ = DecoderConfig.__hash__  # a frozen dataclass would otherwise hash its (unhashable) dict fields

  @property
  def kv_heads(self) -> int:
    return self.n_head if self.n_kv_head is None else self.n_kv_head

  def validate(self) -> None:
    fn = "LlamaConfig"
    super().validate()
    if self.n_kv_head is not None:
      _checks.check_positive_int(fn, "n_kv_head", self.n_kv_head)
      if self.n_head % self.n_kv_head:
        raise ValueError(f"{fn}: n_kv_head={self.n_kv_head} but it must divide n_head={self.n_head}")
    if self.head_dim % 2:
      raise ValueError(f"{fn}: head_dim={self.head_dim} (d_model / n_head) but an even width is expected "
                       "(rotary embeddings rotate pairs)")
    if self.d_ff is not None:
      _checks.check_positive_int(fn, "d_ff", self.d_ff)
    if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
      raise ValueError(f"{fn}: rope_theta={self.rope_theta!r} but a positive number is expected")
    check_rope_scaling(fn, self.rope_scaling)
    for key, value in self.dims.items():
      if ("qk_dim" in value) != ("rope_pairs" in value) or 2 * len(value.get("rope_pairs", ())) != value.get(
          "qk_dim", 0):
        raise ValueError(f"{fn}: dims[{key!r}] has qk_dim={value.get('qk_dim')} and rope_pairs="
                         f"{value.get('rope_pairs')} but both or neither, with qk_dim = 2 * len(rope_pairs), are "
                         "expected")

  def _width_changes(self, n_head: int) -> dict:
    """The key/value heads scale with the query heads, keeping the group (query heads per key/value head) where
    ``n_head`` is a multiple of it; otherwise (a muP base narrower than the grouping, e.g. one 128-wide head
    against Llama-3's 4-head groups) they are the most heads, at least 1, that divide ``n_head`` in groups of at
    least that size. Fan-ins, all that muP reads of the base, do not depend on them."""
    if self.n_kv_head is None:
      return {}
    group = self.n_head // self.n_kv_head
    if n_head % group == 0:
      return {"n_kv_head": n_head // group}
    return {"n_kv_head": max((k for k in range(1, n_head + 1) if n_head % k == 0 and k * group <= n_head), default=1)}

  def _check_block_dim(self, key: str, name: str, value) -> None:
    if name != "rope_pairs":
      return super()._check_block_dim(key, name, value)
    half = self.head_dim // 2
    if (not isinstance(value, (list, tuple)) or not value or list(value) != sorted(set(value))
        or any(isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < half for p in value)):
      raise ValueError(f"LlamaConfig: dims[{key!r}]['rope_pairs']={value!r} but sorted distinct indices in "
                       f"[0, {half}) are expected")

  def _block_shapes(self, f: int, qk: int, v: int) -> dict[str, tuple[int, int]]:
    d, h, kv = self.d_model, self.n_head, self.kv_heads
    return {"attn.q_proj": (d, h * qk), "attn.k_proj": (d, kv * qk), "attn.v_proj": (d, kv * v),
            "attn.o_proj": (h * v, d), "mlp.gate_proj": (d, f), "mlp.up_proj": (d, f), "mlp.down_proj": (f, d)}

  def rope_pairs(self, layer: int) -> tuple[int, ...]:
    """The rotary frequency indices block ``layer`` keeps (all ``head_dim / 2`` unless MoDeGPT narrowed it)."""
    return tuple(self.dims.get(block_key(layer), {}).get("rope_pairs", range(self.head_dim // 2)))

  def inv_freq(self) -> np.ndarray:
    """The ``head_dim / 2`` rotary inverse frequencies (float32, as Hugging Face computes them), scaled by
    ``rope_scaling``."""
    dim = self.head_dim
    inv = (1.0 / (np.float32(self.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
    inv = inv.astype(np.float32)
    scaling = self.rope_scaling or {}
    kind = rope_type(scaling)
    if kind == "linear":
      return (inv / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
      factor, low, high = (np.float32(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
      old = np.float32(scaling["original_max_position_embeddings"])
      wavelen = np.float32(2 * math.pi) / inv
      scaled = np.where(wavelen > old / low, inv / factor, inv)
      smooth = (old / wavelen - low) / (high - low)
      smoothed = (1 - smooth) * scaled / factor + smooth * scaled
      medium = ~(wavelen < old / high) & ~(wavelen > old / low)
      return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_type(scaling: dict | None) -> str:
  """The rope type of a ``rope_scaling`` dict ("default" for None), accepting Hugging Face's old ``type`` key."""
  scaling = scaling or {}
  return scaling.get("rope_type", scaling.get("type", "default"))


def check_rope_scaling(fn: str, scaling) -> None:
  """Refuses, by name, a rope scaling type that is not implemented or a dict missing one of its keys."""
  if scaling is None:
    return
  if not isinstance(scaling, dict):
    raise ValueError(f"{fn}: rope_scaling={scaling!r} but None or a dict is expected")
  kind = rope_type(scaling)
  if kind not in ROPE_TYPES:
    raise ValueError(f"{fn}: rope_scaling rope_type={kind!r} is not implemented; expected one of {ROPE_TYPES}")
  missing = [k for k in _ROPE_KEYS[kind] if not isinstance(scaling.get(k), (int, float))]
  if missing:
    raise ValueError(f"{fn}: rope_scaling of rope_type={kind!r} lacks numeric {missing}")


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotary embedding on split halves: x (b, t, heads, 2k), cos and sin (t, k) or (b or 1, t, k)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  cos, sin = (z.reshape(-1, x.shape[1], 1, z.shape[-1]).astype(x.dtype) for z in (cos, sin))
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(CausalAttention):
  """Llama's attention: separate q/k/v projections (``n_kv`` key/value heads), rotary embeddings on queries and
  keys at the frequencies the block keeps."""

  OUTPUT = "o_proj"

  def make_projections(self, cfg: LlamaConfig, index: int, rngs: nnx.Rngs) -> None:
    d, dtype, h, kv = cfg.d_model, dtype_of(cfg), self.n_head, self.n_kv
    self.inv_freq = tuple(float(f) for f in cfg.inv_freq()[list(cfg.rope_pairs(index))])

    def proj(name, n_in, n_out, bias):
      return make_linear(cfg.spec(name, index), n_in, n_out, std=cfg.projection_std, use_bias=bias, dtype=dtype,
                         rngs=rngs, balance=balance_of(cfg))

    self.q_proj = proj("attn.q_proj", d, h * self.qk_dim, cfg.attention_bias)
    self.k_proj = proj("attn.k_proj", d, kv * self.qk_dim, cfg.attention_bias)
    self.v_proj = proj("attn.v_proj", d, kv * self.v_dim, cfg.attention_bias)
    self.o_proj = proj("attn.o_proj", h * self.v_dim, d, cfg.output_bias)

  def project(self, x):
    return self.q_proj(x), self.k_proj(x), self.v_proj(x)

  def embed_positions(self, q, k, cache):
    t = q.shape[1]
    angles = positions(cache, t).astype(jnp.float32)[..., None] * jnp.asarray(self.inv_freq, jnp.float32)[None, None]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


class MLP(nnx.Module):
  def __init__(self, cfg: LlamaConfig, index: int, rngs: nnx.Rngs):
    d, f, dtype = cfg.d_model, cfg.block_dims(index)[0], dtype_of(cfg)

    def proj(name, n_in, n_out):
      return make_linear(cfg.spec(name, index), n_in, n_out, std=cfg.projection_std, use_bias=False, dtype=dtype,
                         rngs=rngs, balance=balance_of(cfg))

    self.gate_proj, self.up_proj, self.down_proj = proj("mlp.gate_proj", d, f), proj("mlp.up_proj", d, f), \
        proj("mlp.down_proj", f, d)
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

  def hidden(self, x) -> jax.Array:
    """The activations the down projection reads: silu(gate(x)) * up(x)."""
    return jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)

  def __call__(self, x, *, deterministic: bool = True):
    return self.dropout(self.down_proj(self.hidden(x)), deterministic=deterministic)


def _rms_norm(cfg: LlamaConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
  return nnx.RMSNorm(cfg.d_model, epsilon=cfg.rms_norm_eps, dtype=dtype_of(cfg), rngs=rngs)


class Block(PreNormBlock):
  def __init__(self, cfg: LlamaConfig, index: int, rngs: nnx.Rngs):
    self.ln_1 = _rms_norm(cfg, rngs)
    self.attn = Attention(cfg, index, rngs)
    self.ln_2 = _rms_norm(cfg, rngs)
    self.mlp = MLP(cfg, index, rngs)

  def trace(self, x) -> tuple[jax.Array, dict]:
    """The block's output and what calibration reads: attention input (b, t, d), queries and keys before
    rotation (b, t, heads, qk_dim), MLP activations (b, t, d_ff), and ``"inputs"``: each projection's input
    by name."""
    a = self.ln_1(x)
    q, k, _ = self.attn.qkv(a)
    ctx = self.attn.context(a)[0]
    mid = x + self.attn.o_proj(ctx)
    m = self.ln_2(mid)
    act = self.mlp.hidden(m)
    inputs = {"attn.q_proj": a, "attn.k_proj": a, "attn.v_proj": a, "attn.o_proj": ctx, "mlp.gate_proj": m,
              "mlp.up_proj": m, "mlp.down_proj": act}
    return mid + self.mlp.down_proj(act), {"attn_in": a, "q": q, "k": k, "mlp_act": act, "inputs": inputs}

  def parts(self) -> dict:
    """Dense (kernel, bias or None) of the attention and MLP matrices: "q", "k", "v", "o", "up" (a list:
    gate and up, selected together), "down"."""
    def kb(layer):
      return np.asarray(dense_kernel(layer)), None if layer.bias is None else np.asarray(layer.bias[...])

    a, m = self.attn, self.mlp
    return {"q": kb(a.q_proj), "k": kb(a.k_proj), "v": kb(a.v_proj), "o": kb(a.o_proj),
            "up": [kb(m.gate_proj), kb(m.up_proj)], "down": kb(m.down_proj)}

  @staticmethod
  def projections(parts: dict) -> dict:
    """The inverse of `parts`: {projection name: {"kernel", "bias"}} (no bias key where there is none)."""
    names = {"attn.q_proj": parts["q"], "attn.k_proj": parts["k"], "attn.v_proj": parts["v"],
             "attn.o_proj": parts["o"], "mlp.gate_proj": parts["up"][0], "mlp.up_proj": parts["up"][1],
             "mlp.down_proj": parts["down"]}
    return {n: {"kernel": w} if b is None else {"kernel": w, "bias": b} for n, (w, b) in names.items()}


class Llama(Decoder):
  """A Llama-style language model (see the module docstring).

  Examples:
    >>> from flax import nnx
    >>> from tnjax.models import Llama, preset
    >>> model = Llama(preset("llama-tiny", layers={"mlp.up_proj": {"kind": "ttm", "rank": 8}}), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 16), jnp.int32)).shape
    (2, 16, 512)
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    cfg = config
    self.config = cfg
    self.wte = make_embedding(cfg, rngs)
    self.drop = nnx.Dropout(cfg.dropout, rngs=rngs)
    self.h = nnx.List([Block(cfg, i, rngs) for i in range(cfg.n_layer)])
    self.ln_f = _rms_norm(cfg, rngs)
    self.lm_head = make_head(cfg, rngs)

  def embed(self, ids, positions=None, deterministic: bool = True) -> jax.Array:
    return self.drop(self.wte(ids), deterministic=deterministic)
