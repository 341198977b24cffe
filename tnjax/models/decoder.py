"""What every decoder family shares: projections of any kind, attention with a KV cache (`CausalAttention`), the
embedding, and the `Decoder` base class (the model side of the seam in `tnjax.models.family`).

A family subclasses `Decoder` with its own blocks; a block is called as
``block(x, cache, deterministic=...)`` (``cache`` its `KVCache` or None) and returns ``(x, cache)``. Module
paths follow `tnjax.models.names`: ``model.wte``, ``model.h[i].<projection>``,
``model.ln_f``, ``model.lm_head``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from tnjax.core import _checks
from tnjax.core.shapes import pad_last
from tnjax.models.config import DecoderConfig, LayerSpec
from tnjax.models.names import layer_key, parse_layer_key
from tnjax.nn import kinds


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


def _causal_attention(q, k, v, *, scale: float, impl) -> jax.Array:
  """Causal ``jax.nn.dot_product_attention`` for query/key and value head widths that may differ (MoDeGPT), by
  `attention_here`'s implementation of ``impl``.

  Zero columns change neither q.k nor (sliced off) the output, so the narrower
  side is padded to the wider one, which the fused kernels require.
  """
  impl = attention_here(impl)
  width = max(q.shape[-1], v.shape[-1])
  if impl == "cudnn":
    width = -(-width // 8) * 8  # cuDNN's fused attention takes head widths in multiples of 8
  y = jax.nn.dot_product_attention(pad_last(q, width), pad_last(k, width), pad_last(v, width),
                                   is_causal=True, scale=scale, implementation=impl)
  return y[..., : v.shape[-1]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """One block's keys and values in ``length`` slots, and which slots hold what.

  Row r's tokens sit in slots ``start[r]..`` (the slots before are left padding, never attended to); the
  next tokens are written at slot ``index``, the same for every row, so a token's position in its own
  sequence is ``slot - start[r]``. A model's cache is a tuple of these, one per block (`Decoder.init_cache`).

  Attributes:
    keys: (batch, length, kv_heads, qk_dim).
    values: (batch, length, kv_heads, v_dim).
    start: (batch,) int32, each row's first real slot.
    index: () int32, the slot the next token goes to.
  """

  keys: jax.Array
  values: jax.Array
  start: jax.Array
  index: jax.Array

  @property
  def length(self) -> int:
    return self.keys.shape[1]

  def positions(self, time: int) -> jax.Array:
    """(batch, time) int32 positions of ``time`` tokens written at ``index``.. (padding slots get 0)."""
    slots = self.index + jnp.arange(time, dtype=jnp.int32)
    return jnp.maximum(slots[None, :] - self.start[:, None], 0)

  def attend(self, q, k, v, *, scale: float) -> tuple[jax.Array, KVCache]:
    """Writes k, v (batch, time, kv_heads, ...) at ``index``.. and lets each query (batch, time, heads, qk)
    attend to the slots of its row from ``start`` up to its own; returns (batch, time, heads, v_dim) and the
    cache advanced by ``time``.

    The keys are read once per group of query heads (no repeat to ``heads``), and query and value widths may
    differ (MoDeGPT): one decoded token is a matrix-vector product per key/value head over the cache.
    """
    b, t, h, width = q.shape
    kv = self.keys.shape[2]
    at = (jnp.int32(0), self.index, jnp.int32(0), jnp.int32(0))
    keys = jax.lax.dynamic_update_slice(self.keys, k.astype(self.keys.dtype), at)
    values = jax.lax.dynamic_update_slice(self.values, v.astype(self.values.dtype), at)
    slot = jnp.arange(self.length, dtype=jnp.int32)
    query_slot = self.index + jnp.arange(t, dtype=jnp.int32)
    visible = (slot[None, None, :] >= self.start[:, None, None]) & (slot[None, None, :] <= query_slot[None, :, None])
    scores = jnp.einsum("btkgd,bskd->bkgts", q.reshape(b, t, kv, h // kv, width), keys.astype(q.dtype),
                        preferred_element_type=jnp.float32) * jnp.float32(scale)
    # A finite floor, not -inf: a padding slot's query sees no key and gets a uniform average instead of NaN.
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    y = jnp.einsum("bkgts,bskd->btkgd", probs, values.astype(q.dtype))
    return y.reshape(b, t, h, -1), dataclasses.replace(self, keys=keys, values=values, index=self.index + t)


def positions(cache: KVCache | None, time: int) -> jax.Array:
  """Positions of ``time`` tokens: (batch, time) from a cache, else (1, time) counting from 0."""
  return jnp.arange(time, dtype=jnp.int32)[None] if cache is None else cache.positions(time)


def cached_attention(q, k, v, cache: KVCache | None, *, scale: float, impl) -> tuple[jax.Array, KVCache | None]:
  """Causal attention of q (batch, time, heads, qk) over k, v (batch, time, kv_heads, ...), kv_heads dividing
  heads: without a cache by ``jax.nn.dot_product_attention`` (``impl``: its implementation), with one by
  `KVCache.attend`."""
  if cache is None:
    return _causal_attention(q, k, v, scale=scale, impl=impl), None
  return cache.attend(q, k, v, scale=scale)


class CausalAttention(nnx.Module):
  """Causal self-attention with an optional `KVCache`, the part every family shares: the heads, grouped-query
  keys and values, the attention call (``attention_impl``), the cache, the output projection and dropout.

  Queries have ``n_head`` heads of ``qk_dim``; keys and values ``n_kv`` heads (``kv_heads``, dividing n_head:
  fewer is grouped-query attention) of ``qk_dim`` and ``v_dim``. A family's subclass says only what differs:
  `make_projections` builds its projections, `project` maps x to flat queries, keys and values, `embed_positions`
  puts positions into queries and keys (default none: GPT-2 adds them to the input) and ``OUTPUT`` names the
  output projection.
  """

  OUTPUT: str

  def __init__(self, cfg: DecoderConfig, index: int, rngs: nnx.Rngs):
    _, self.qk_dim, self.v_dim = cfg.block_dims(index)
    self.n_head, self.n_kv, self.impl = cfg.n_head, cfg.kv_heads, cfg.attention_impl
    # The scale of the uncompressed model: MoDeGPT keeps q.k, only narrower.
    self.scale = 1.0 / math.sqrt(cfg.head_dim)
    self.make_projections(cfg, index, rngs)
    # After the projections: it forks the rng stream their initializers draw from, so the order sets the weights.
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

  def make_projections(self, cfg: DecoderConfig, index: int, rngs: nnx.Rngs) -> None:
    """Sets the projections of block ``index`` as attributes (their names are the config's projection names)."""
    raise NotImplementedError

  def project(self, x) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries (b, t, n_head * qk_dim), keys (b, t, n_kv * qk_dim) and values (b, t, n_kv * v_dim) of x."""
    raise NotImplementedError

  def embed_positions(self, q, k, cache: KVCache | None) -> tuple[jax.Array, jax.Array]:
    """Queries and keys (b, t, heads, qk_dim) of tokens written at the cache's next slots (from 0 without one),
    their positions put in (default: unchanged)."""
    return q, k

  @property
  def output(self) -> nnx.Module:
    return getattr(self, self.OUTPUT)

  def qkv(self, x) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries and keys before `embed_positions`, and values: (b, t, n_head or n_kv, width)."""
    b, t, _ = x.shape
    q, k, v = self.project(x)
    return q.reshape(b, t, self.n_head, -1), k.reshape(b, t, self.n_kv, -1), v.reshape(b, t, self.n_kv, -1)

  def context(self, x, cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """The heads' outputs before the output projection, (b, t, n_head * v_dim), and the new cache."""
    b, t, _ = x.shape
    q, k, v = self.qkv(x)
    q, k = self.embed_positions(q, k, cache)
    y, new_cache = cached_attention(q, k, v, cache, scale=self.scale, impl=self.impl)
    return y.reshape(b, t, self.n_head * self.v_dim), new_cache

  def __call__(self, x, cache: KVCache | None = None, *, deterministic: bool = True):
    y, new_cache = self.context(x, cache)
    return self.dropout(self.output(y), deterministic=deterministic), new_cache


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

  def __call__(self, x, cache=None, *, deterministic: bool = True):
    y, cache = self.attn(self.ln_1(x), cache, deterministic=deterministic)
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
  # The logical axes (rows, columns) of the matrices of modules outside the blocks, by attribute name.
  MODULE_AXES = {"wte": ("vocab", "embed"), "lm_head": ("embed", "vocab")}

  @property
  def _name(self) -> str:
    return type(self).__name__

  def _check_ids(self, ids) -> jax.Array:
    ids = jnp.asarray(ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"{self._name}: ids.shape={ids.shape}, dtype={ids.dtype} but integer ids of shape (batch, "
                       "time) are expected")
    limit = self.config.block_size
    if ids.shape[1] > limit:
      raise ValueError(f"{self._name}: {ids.shape[1]} positions (ids.shape={ids.shape}) but block_size={limit}")
    if _checks.is_concrete(ids) and ids.size and (int(ids.max()) >= self.config.vocab_size or int(ids.min()) < 0):
      bad = int(ids.max()) if int(ids.max()) >= self.config.vocab_size else int(ids.min())
      raise ValueError(f"{self._name}: ids contain {bad} but 0 <= id < vocab_size={self.config.vocab_size} is "
                       "expected")
    return ids

  def embed(self, ids, positions=None, deterministic: bool = True) -> jax.Array:
    """The input of the first block for ids (batch, time) at ``positions`` (batch or 1, time), default 0..
    (calibration starts here)."""
    raise NotImplementedError

  def _forward(self, ids, cache, deterministic, last_only: bool = False):
    x = self.embed(ids, None if cache is None else positions(cache[0], ids.shape[1]), deterministic)
    new_cache = []
    for i, block in enumerate(self.h):
      x, c = block(x, None if cache is None else cache[i], deterministic=deterministic)
      new_cache.append(c)
    x = self.ln_f(x[:, -1:] if last_only else x)
    if self.config.output_multiplier != 1.0:
      x = x * jnp.asarray(self.config.output_multiplier, x.dtype)
    logits = self.wte.attend(x) if self.lm_head is None else self.lm_head(x)
    return logits, (None if cache is None else tuple(new_cache))

  def __call__(self, ids, *, deterministic: bool = True, padded_logits: bool = False) -> jax.Array:
    """Logits (batch, time, vocab_size) for integer ids (batch, time), time <= block_size.

    ``padded_logits=True`` returns (batch, time, padded_vocab) with the padding
    columns at -inf (what a softmax over them gives zero weight), which avoids
    slicing the largest activation in a training step.
    """
    logits = self._forward(self._check_ids(ids), None, deterministic)[0]
    return self._mask_padding(logits) if padded_logits else logits[..., : self.config.vocab_size]

  def _mask_padding(self, logits: jax.Array) -> jax.Array:
    vocab = self.config.vocab_size
    if logits.shape[-1] == vocab:
      return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, jnp.asarray(-jnp.inf, logits.dtype))

  def logical_axes(self) -> dict[str, tuple[str | None, ...]]:
    """The logical axes (`tnjax.nn.kinds.LOGICAL_AXES` names, None where no rule shards) of every parameter, by
    dotted name (as ``nnx.to_flat_state``), one per dimension: what `tnjax.train.sharding` maps to mesh axes.

    A projection's are its kind's (`tnjax.nn.LayerKind.axes`) for the input and output axes of the config's
    ``PROJECTION_AXES``; the embedding's and an untied head's for ``MODULE_AXES``; a norm's scale and bias
    are "embed". A parameter of a module none of these covers (a kind without ``axes``) is absent: replicated.

    Raises:
      ValueError: for a projection the config's ``PROJECTION_AXES`` does not name.

    Examples:
      >>> from tnjax.models import GPT, preset
      >>> axes = GPT(preset("tiny"), rngs=nnx.Rngs(0)).logical_axes()
      >>> axes["h.0.mlp.c_fc.kernel"], axes["h.0.mlp.c_fc.bias"], axes["wte.embedding"], axes["ln_f.scale"]
      (('embed', 'mlp'), ('mlp',), ('vocab', 'embed'), ('embed',))
    """
    out = {}
    for path, node in nnx.iter_graph(self):
      prefix = "".join(f"{p}." for p in path)
      if isinstance(node, (nnx.LayerNorm, nnx.RMSNorm)):
        out.update({prefix + k: ("embed",) for k in ("scale", "bias") if getattr(node, k, None) is not None})
        continue
      kind = kinds.kind_of(node)
      if kind is None:
        continue
      if len(path) == 1 and path[0] in self.MODULE_AXES:
        sides = self.MODULE_AXES[path[0]]
      else:
        name = ".".join(str(p) for p in path[2:])
        if path[:1] != ("h",) or name not in self.config.PROJECTION_AXES:
          raise ValueError(f"{self._name}.logical_axes: module {'.'.join(map(str, path))} is a {kind.name!r} layer "
                           f"but {type(self.config).__name__}.PROJECTION_AXES has no {name!r} (it names "
                           f"{sorted(self.config.PROJECTION_AXES)})")
        sides = self.config.PROJECTION_AXES[name]
      out.update({prefix + k: v for k, v in kind.axes(node, *sides).items()})
    return out

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

  def init_cache(self, batch: int, length: int | None = None, *, start=None, dtype=None) -> tuple[KVCache, ...]:
    """An empty `KVCache` per block, each of ``length`` slots (default ``block_size``): keys (batch, length,
    kv_heads, qk_dim) and values (..., v_dim) of ``dtype`` (default the model's computation dtype, float32
    when it has none); ``start`` (batch,) the first real slot of each row (default 0: no left padding).

    Examples:
      >>> from tnjax.models import Llama, preset
      >>> model = Llama(preset("llama-tiny"), rngs=nnx.Rngs(0))
      >>> cache = model.init_cache(2, 24)
      >>> len(cache), cache[0].keys.shape  # 2 blocks; 2 rows, 24 slots, 2 kv heads of width 32
      (2, (2, 24, 2, 32))
    """
    fn, cfg = f"{self._name}.init_cache", self.config
    _checks.check_positive_int(fn, "batch", batch)
    length = cfg.block_size if length is None else _checks.check_positive_int(fn, "length", length)
    if length > cfg.block_size:
      raise ValueError(f"{fn}: length={length} but at most block_size={cfg.block_size} slots are expected")
    start = jnp.zeros(batch, jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    if start.shape != (batch,):
      raise ValueError(f"{fn}: start.shape={start.shape} but ({batch},) (one slot per row) is expected")
    dtype = dtype or dtype_of(cfg) or jnp.float32
    shape = (batch, length, cfg.kv_heads)
    return tuple(KVCache(jnp.zeros(shape + (cfg.block_dims(i)[1],), dtype),
                         jnp.zeros(shape + (cfg.block_dims(i)[2],), dtype), start, jnp.zeros((), jnp.int32))
                 for i in range(cfg.n_layer))

  def step(self, ids, cache: tuple[KVCache, ...], *, last_only: bool = False
           ) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """Logits (batch, time or 1 with ``last_only``, vocab_size) for ``ids`` (batch, time) written at the
    cache's next slots, and the cache holding them.

    Raises:
      ValueError: bad ids, or (with a concrete cache index) more tokens than the cache has free slots.
    """
    ids = self._check_ids(ids)
    head = cache[0]
    if _checks.is_concrete(head.index) and int(head.index) + ids.shape[1] > head.length:
      raise ValueError(f"{self._name}.step: {ids.shape[1]} tokens at slot {int(head.index)} but the cache has "
                       f"{head.length} slots")
    logits, cache = self._forward(ids, cache, True, last_only)
    return logits[..., : self.config.vocab_size], cache

  def astype(self, dtype) -> Decoder:
    """This model computing in ``dtype`` with its floating parameters stored in it (int8 weights stay int8),
    rebuilt from its config: for inference, where a per-step cast would read every weight twice. Returns
    the model itself when nothing changes.

    Examples:
      >>> from tnjax.models import GPT, preset
      >>> half = GPT(preset("tiny"), rngs=nnx.Rngs(0)).astype("bfloat16")
      >>> half.config.dtype, half.h[0].mlp.c_fc.kernel.dtype
      ('bfloat16', dtype(bfloat16))
    """
    dtype = jnp.dtype(dtype)
    graphdef, params, rest = nnx.split(self, nnx.Param, ...)

    def cast(x):
      return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    if dtype_of(self.config) == dtype and all(cast(x).dtype == x.dtype for x in jax.tree_util.tree_leaves(params)):
      return self
    cfg = self.config.replace(dtype=dtype.name)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: type(self)(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.tree_util.tree_map(cast, params), rest)

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
