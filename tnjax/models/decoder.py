"""What every decoder family shares: projections of any kind, attention with a KV cache, the embedding, and the
`Decoder` base class (the model side of the seam in `tnjax.models.family`).

A family subclasses `Decoder` with its own blocks; a block is called as
``block(x, cache, pos, deterministic=...)`` and returns ``(x, cache)``. Module
paths follow `tnjax.models.names`: ``model.wte``, ``model.h[i].<projection>``,
``model.ln_f``, ``model.lm_head``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from tnjax.core import _checks
from tnjax.core.shapes import pad_last
from tnjax.models.config import DecoderConfig, LayerSpec
from tnjax.models.names import layer_key, parse_layer_key
from tnjax.nn import kinds

KVCache = list  # one (k, v) pair per block, each (batch, block_size, kv_heads, head_dim)


def dtype_of(cfg: DecoderConfig):
  return None if cfg.dtype is None else jnp.dtype(cfg.dtype)


def balance_of(cfg: DecoderConfig) -> str:
  """muP balances TT-matrix cores by their fan-ins (BTT cores always are)."""
  return "equal" if cfg.mup_base_width is None else "fan_in"


def make_linear(spec: LayerSpec, in_features: int, out_features: int, *, std: float, use_bias: bool,
                dtype, rngs: nnx.Rngs, balance: str = "equal") -> nnx.Module:
  """One projection, dense or tensorized by ``spec``, with dense-equivalent init std ``std`` (``balance``: how
  TT-matrix cores share it, see [`TTMLinear`][tnjax.nn.TTMLinear]).

  Examples:
    >>> from tnjax.models import LayerSpec
    >>> layer = make_linear(LayerSpec("lowrank", rank=4), 16, 32, std=0.02, use_bias=True, dtype=None,
    ...                     rngs=nnx.Rngs(0))
    >>> type(layer).__name__, layer.num_params
    ('LowRankLinear', 224)
  """
  return kinds.get(spec.kind).linear(spec, in_features, out_features, std=std, use_bias=use_bias, dtype=dtype,
                                     rngs=rngs, balance=balance)


def dense_kernel(layer: nnx.Module) -> jax.Array:
  """The (in, out) dense kernel of any projection (reconstructed for tensorized ones), in float32 at least:
  a model whose parameters are kept in bfloat16 is fitted and exported in float32 (decompositions have no
  bfloat16 kernels, and their rounding would compound).

  Examples:
    >>> from tnjax.nn import TTMLinear
    >>> dense_kernel(TTMLinear(12, 20, rank=2, rngs=nnx.Rngs(0))).shape
    (12, 20)
  """
  w = layer.kernel[...] if isinstance(layer, nnx.Linear) else layer.kernel
  return w.astype(jnp.float32) if jnp.issubdtype(w.dtype, jnp.floating) and jnp.finfo(w.dtype).bits < 32 else w


def linear_flops(layer: nnx.Module, rows: int) -> int:
  """Forward FLOPs (2 per multiply-add, bias excluded) of a projection of any kind on ``rows`` rows.

  Examples:
    >>> linear_flops(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), 10)
    10240
  """
  return kinds.kind_of(layer).flops(layer, rows)


def _bias(layer: nnx.Module) -> jax.Array | None:
  return None if layer.bias is None else layer.bias[...]


def attention_here(impl: str | None) -> str | None:
  """The ``jax.nn.dot_product_attention`` implementation a config's ``attention_impl`` runs on this host: cuDNN's
  fused attention exists only on GPUs, so off a GPU (a TPU, a CPU) "cudnn" runs XLA's. Chosen when the model is
  traced, from JAX's default backend (export for a TPU from a TPU or CPU host: a GPU host traces cuDNN's).

  Examples:
    >>> attention_here("xla"), attention_here(None)  # what is not "cudnn" runs as given
    ('xla', None)
  """
  return "xla" if impl == "cudnn" and jax.default_backend() != "gpu" else impl


def _attention(q, k, v, *, scale: float, impl, is_causal: bool = False, mask=None) -> jax.Array:
  """``jax.nn.dot_product_attention`` for query/key and value head widths that may differ (MoDeGPT), by
  `attention_here`'s implementation of ``impl``.

  Zero columns change neither q.k nor (sliced off) the output, so the narrower
  side is padded to the wider one, which the fused kernels require.
  """
  impl = attention_here(impl)
  width = max(q.shape[-1], v.shape[-1])
  if impl == "cudnn":
    width = -(-width // 8) * 8  # cuDNN's fused attention takes head widths in multiples of 8
  y = jax.nn.dot_product_attention(pad_last(q, width), pad_last(k, width), pad_last(v, width),
                                   mask=mask, is_causal=is_causal, scale=scale, implementation=impl)
  return y[..., : v.shape[-1]]


def cached_attention(q, k, v, cache, pos, *, scale: float, impl) -> tuple[jax.Array, tuple | None]:
  """Causal attention of q (batch, time, heads, qk) over k, v (batch, time, kv_heads, ...), kv_heads dividing
  heads; with a cache (keys, values of (batch, block_size, kv_heads, ...)), k and v are written at positions
  pos.. and the queries attend to every cached position up to their own."""
  if cache is None:
    return _attention(q, k, v, scale=scale, impl=impl, is_causal=True), None
  ck, cv = cache
  ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, pos, 0, 0))
  cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, pos, 0, 0))
  # query i sits at position pos + i and sees keys 0..pos + i
  mask = jnp.arange(ck.shape[1])[None, :] <= pos + jnp.arange(q.shape[1])[:, None]
  y = _attention(q, ck.astype(q.dtype), cv.astype(q.dtype), scale=scale, impl=impl, mask=mask[None, None])
  return y, (ck, cv)


def make_embedding(cfg: DecoderConfig, rngs: nnx.Rngs) -> nnx.Module:
  """The token embedding of ``cfg.layers["embedding"]``: dense (``padded_vocab`` rows), TT-matrix, low-rank or MPS.

  Examples:
    >>> from tnjax.models import preset
    >>> emb = make_embedding(preset("tiny", layers={"embedding": {"kind": "lowrank", "rank": 8}}), nnx.Rngs(0))
    >>> type(emb).__name__, emb.num_params  # 8 * (512 + 128)
    ('LowRankEmbedding', 5120)
  """
  emb = cfg.spec("embedding")
  return kinds.get(emb.kind, type(cfg).__name__.removesuffix("Config"), "layers['embedding']").embed(emb, cfg, rngs)


def make_head(cfg: DecoderConfig, rngs: nnx.Rngs) -> nnx.Module | None:
  """The untied LM head (None when tied to the embedding)."""
  if cfg.tie_embeddings:
    return None
  return make_linear(cfg.spec("lm_head"), cfg.d_model, cfg.vocab_size, std=cfg.init_std, use_bias=False,
                     dtype=dtype_of(cfg), rngs=rngs)


class PreNormBlock(nnx.Module):
  """``x + attn(ln_1(x))``, then ``+ mlp(ln_2(x))``: the block of every family (subclasses set ``ln_1``,
  ``attn``, ``ln_2``, ``mlp``; attention returns ``(y, cache)``)."""

  def __call__(self, x, cache=None, pos=0, *, deterministic: bool = True):
    y, cache = self.attn(self.ln_1(x), cache, pos, deterministic=deterministic)
    x = x + y
    return x + self.mlp(self.ln_2(x), deterministic=deterministic), cache


class Decoder(nnx.Module):
  """A decoder-only language model: ``wte``, blocks ``h``, a final norm ``ln_f`` and a (tied or untied) head.

  Subclasses set those attributes and implement ``embed(ids, pos, deterministic)`` (token, and for GPT-2
  position, embeddings); `layer` reaches any projection by name.
  Call ``model(ids)`` for logits of shape (batch, time, vocab_size); use `init_cache` and `step` (or
  [`generate`][tnjax.models.generate]) for KV-cached decoding.
  """

  config: DecoderConfig

  @property
  def _name(self) -> str:
    return type(self).__name__

  def _check_ids(self, ids, pos: int = 0) -> jax.Array:
    ids = jnp.asarray(ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"{self._name}: ids.shape={ids.shape}, dtype={ids.dtype} but integer ids of shape (batch, "
                       "time) are expected")
    limit = self.config.block_size
    if _checks.is_concrete(pos) and int(pos) + ids.shape[1] > limit:
      raise ValueError(f"{self._name}: {int(pos) + ids.shape[1]} positions (pos={int(pos)}, time={ids.shape[1]}) "
                       f"but block_size={limit}")
    if _checks.is_concrete(ids) and ids.size and (int(ids.max()) >= self.config.vocab_size or int(ids.min()) < 0):
      bad = int(ids.max()) if int(ids.max()) >= self.config.vocab_size else int(ids.min())
      raise ValueError(f"{self._name}: ids contain {bad} but 0 <= id < vocab_size={self.config.vocab_size} is "
                       "expected")
    return ids

  def embed(self, ids, pos=0, deterministic: bool = True) -> jax.Array:
    """The input of the first block for ids (batch, time) at positions pos.. (calibration starts here)."""
    raise NotImplementedError

  def _forward(self, ids, cache, pos, deterministic):
    x = self.embed(ids, pos, deterministic)
    new_cache = []
    for i, block in enumerate(self.h):
      x, c = block(x, None if cache is None else cache[i], pos, deterministic=deterministic)
      new_cache.append(c)
    x = self.ln_f(x)
    if self.config.output_multiplier != 1.0:
      x = x * jnp.asarray(self.config.output_multiplier, x.dtype)
    logits = self.wte.attend(x) if self.lm_head is None else self.lm_head(x)
    return logits, (None if cache is None else new_cache)

  def __call__(self, ids, *, deterministic: bool = True, padded_logits: bool = False) -> jax.Array:
    """Logits (batch, time, vocab_size) for integer ids (batch, time), time <= block_size.

    ``padded_logits=True`` returns (batch, time, padded_vocab) with the padding
    columns at -inf (what a softmax over them gives zero weight), which avoids
    slicing the largest activation in a training step.
    """
    logits = self._forward(self._check_ids(ids), None, 0, deterministic)[0]
    return self._mask_padding(logits) if padded_logits else logits[..., : self.config.vocab_size]

  def _mask_padding(self, logits: jax.Array) -> jax.Array:
    vocab = self.config.vocab_size
    if logits.shape[-1] == vocab:
      return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, jnp.asarray(-jnp.inf, logits.dtype))

  @property
  def embedding_table(self) -> jax.Array:
    """The dense (vocab_size, d_model) token-embedding table, whatever its storage, padding removed."""
    table = self.wte.embedding
    return (table[...] if isinstance(table, nnx.Variable) else table)[: self.config.vocab_size]

  def layer(self, name: str) -> nnx.Module:
    """The module of a layer name ("h.3.mlp.c_fc", "lm_head", "embedding"; see `tnjax.models.names`)."""
    if name == "embedding":
      return self.wte
    if name == "lm_head":
      return self.lm_head
    block, rest = parse_layer_key(name)
    module = self.h[block]
    for part in rest.split("."):
      module = getattr(module, part)
    return module

  def init_cache(self, batch: int, dtype=jnp.float32) -> KVCache:
    """Zeroed keys and values for every block: (batch, block_size, kv_heads, qk_dim or v_dim) each."""
    cfg = self.config
    shape = (batch, cfg.block_size, cfg.kv_heads)
    return [(jnp.zeros(shape + (cfg.block_dims(i)[1],), dtype), jnp.zeros(shape + (cfg.block_dims(i)[2],), dtype))
            for i in range(cfg.n_layer)]

  def step(self, ids, cache: KVCache, pos) -> tuple[jax.Array, KVCache]:
    """Logits for ``ids`` placed at positions pos.., reading and extending the KV cache."""
    logits, cache = self._forward(self._check_ids(ids, pos), cache, pos, True)
    return logits[..., : self.config.vocab_size], cache

  def flops_per_token(self, rows: int | None = None) -> float:
    """Forward FLOPs per token (2 per multiply-add): every projection by its kind and path, the LM head, and
    attention's two products over the full ``block_size`` context (as PaLM's 6N + 12 L H Q T count, which
    ignores the causal mask). A training step costs about 3x this per token (backward = 2x forward).

    ``rows`` is the tokens per forward call (a micro-batch), default ``block_size``: TT-matrix layers that
    rebuild W spread that cost over them, and the cost model's path choice depends on it.

    Examples:
      >>> from tnjax.models import GPT, preset
      >>> model = nnx.eval_shape(lambda: GPT(preset("gpt2", vocab_multiple=1), rngs=nnx.Rngs(0)))
      >>> round(model.flops_per_token() / 1e6, 1)  # 2 * 85M block params + 2 * 38.6M head + attention
      284.8
    """
    cfg = self.config
    rows = cfg.block_size if rows is None else _checks.check_positive_int(
        f"{self._name}.flops_per_token", "rows", rows)
    total = 0
    for i in range(cfg.n_layer):
      for name in cfg.PROJECTIONS:
        total += linear_flops(self.layer(layer_key(i, name)), rows)
      _, qk, v = cfg.block_dims(i)
      total += 2 * rows * cfg.block_size * cfg.n_head * (qk + v)
    if self.lm_head is not None:
      total += linear_flops(self.lm_head, rows)
    else:
      total += kinds.kind_of(self.wte).head_flops(self.wte, rows)
    return total / rows

  @property
  def num_params(self) -> int:
    """Parameters, not counting the embedding's padding rows (never used)."""
    cfg = self.config
    padding = (cfg.padded_vocab - cfg.vocab_size) * cfg.d_model
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nnx.state(self, nnx.Param))) - padding
