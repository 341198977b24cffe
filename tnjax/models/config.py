"""Model configurations: sizes, presets, and which projections are dense, TT-matrix or low-rank.

`DecoderConfig` holds what every decoder family shares (layer specs, per-block
sizes, padding, JSON); `GPTConfig` is GPT-2's. Layer names follow
`tnjax.models.names`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Any

from tnjax.core import _checks
from tnjax.models.names import EVERY_PROJECTION, GLOBAL_ONLY, block_key, layer_key, parse_block_key, parse_layer_key
from tnjax.nn import kinds as _kinds
from tnjax.nn.quant import QUANTS

# GPT-2's projections a spec can target. Per-layer keys prefix these with
# "h.{i}." (e.g. "h.3.mlp.c_fc"); "embedding" and "lm_head" are global only.
PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def __getattr__(name: str):
  """``KINDS`` and ``EMBEDDING_KINDS``: the registered layer kinds (`tnjax.nn.kinds`), read when asked, so a
  kind registered later is in them."""
  if name == "KINDS":
    return _kinds.kind_names()
  if name == "EMBEDDING_KINDS":
    return _kinds.kind_names(embedding=True)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

BLOCK_DIMS = ("d_ff", "qk_dim", "v_dim")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """How one projection is stored.

  Attributes:
    kind: "dense", "ttm" (TT-matrix / MPO cores), "btt" (Block Tensor-Train,
      projections and an untied head only; Monarch at rank 1), "lowrank"
      (U V factors; for the embedding, a (vocab, r) by (r, d_model) table) or,
      for the embedding only, "mps" (one TT / MPS per token row: TensorGPT).
      The embedding takes `EMBEDDING_KINDS`.
    rank: TT, BTT or low-rank r; required unless kind is "dense".
    num_cores: number of TT cores when dims are not given (BTT has two).
    in_dims, out_dims: explicit TT mode sizes (default: ``tnjax.factorize``;
      for BTT two each, default `tnjax.core.btt.btt_dims`).
    path: TTM contraction path (`tnjax.core.contraction.PATHS`): "auto" (the
      cost model's per-direction plan, fused kernels on a GPU where the
      layout fits), "dense", "direct", "split", "fused" or "fused_fwd".
    quant: None, or "int8" for weight-only per-channel int8 storage
      (projections only; see [`quantize_int8`][tnjax.compress.quantize_int8]).
    ranks: the exact per-bond ranks (d - 1 of them) of a TT-matrix layer or a
      TT / MPS embedding, when they are not what ``rank`` gives (ranks chosen
      by a tolerance differ per bond and per layer); compression records them,
      so the config rebuilds every layer exactly and loading checks TT cores'
      shapes too.
    blocks: for BTT, b x b blocks of rank ``rank`` each: in_dims ``(ceil(m / b), b)`` and out_dims
      ``(b, ceil(n / b))`` for every projection it applies to, whatever its shape (instead of in_dims/out_dims).
      Few blocks make BTT fast: 4 x 4 blocks at rank 128 train a Llama-3.2-1B-shaped model at 1.15x dense
      tokens/s on an H200, the balanced default layout at 0.59x (`benchmarks/README.md`).

  Examples:
    >>> LayerSpec.coerce({"kind": "ttm", "rank": 16}, "mlp.c_fc")
    LayerSpec(kind='ttm', rank=16, num_cores=3, in_dims=None, out_dims=None, path='auto', quant=None, ranks=None, \
blocks=None)
  """

  kind: str = "dense"
  rank: int | None = None
  num_cores: int = 3
  in_dims: tuple[int, ...] | None = None
  out_dims: tuple[int, ...] | None = None
  path: str = "auto"
  quant: str | None = None
  ranks: tuple[int, ...] | None = None
  blocks: int | None = None

  def validate(self, where: str, owner: str = "GPTConfig") -> LayerSpec:
    kind = _kinds.get(self.kind, owner, where)
    if kind.needs_rank and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1):
      raise ValueError(f"{owner}: {where}.rank={self.rank!r} but a positive integer is expected for "
                       f"kind={self.kind!r}")
    if self.quant not in QUANTS:
      raise ValueError(f"{owner}: {where}.quant={self.quant!r} but one of {QUANTS} is expected")
    if self.blocks is not None:
      self._check_kind_takes(kind, "blocks", "takes_blocks", "blocks", owner, where)
      _checks.check_positive_int(f"{owner}: {where}", "blocks", self.blocks)
      if self.in_dims is not None or self.out_dims is not None:
        raise ValueError(f"{owner}: {where} gives blocks={self.blocks} and in_dims/out_dims but one of them is "
                         "expected (blocks sets the dims)")
    if self.ranks is not None:
      self._check_kind_takes(kind, "ranks", "per_bond_ranks", "per-bond ranks", owner, where)
      _checks.check_dims(f"{owner}: {where}", "ranks", self.ranks)
      dims = self.in_dims or self.out_dims
      bonds = (len(dims) if dims is not None else self.num_cores) - 1
      if len(self.ranks) != bonds:
        raise ValueError(f"{owner}: {where}.ranks={self.ranks!r} but {bonds} entries (one per bond) are expected")
    return self

  def _check_kind_takes(self, kind, field: str, flag: str, what: str, owner: str, where: str) -> None:
    """Refuses ``field`` set on a kind whose ``flag`` attribute says it does not take it, naming those that do."""
    if not getattr(kind, flag):
      takers = " or ".join(repr(k) for k in _kinds.kind_names() if getattr(_kinds.get(k), flag))
      raise ValueError(f"{owner}: {where}.{field}={getattr(self, field)!r} but {what} are for kind {takers}, not "
                       f"{self.kind!r}")

  @property
  def rank_arg(self):
    """What a layer's ``rank`` argument gets: the exact per-bond ``ranks`` when recorded, else ``rank``."""
    return self.rank if self.ranks is None else self.ranks

  @classmethod
  def coerce(cls, value, where: str, owner: str = "GPTConfig") -> LayerSpec:
    """A spec from a `LayerSpec`, a kind string or a dict, validated; ``owner`` names the config in errors."""
    if isinstance(value, LayerSpec):
      return value.validate(where, owner)
    if isinstance(value, str):
      return cls(kind=value).validate(where, owner)
    if isinstance(value, dict):
      unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
      if unknown:
        raise ValueError(f"{owner}: {where} has unknown fields {sorted(unknown)}")
      value = dict(value)
      for k in ("in_dims", "out_dims", "ranks"):
        if value.get(k) is not None:
          value[k] = tuple(value[k])
      return cls(**value).validate(where, owner)
    raise ValueError(f"{owner}: {where}={value!r} but a LayerSpec, a kind string or a dict is expected")


class DecoderConfig:
  """What every decoder family's config shares; subclasses are frozen dataclasses with these fields:

  ``vocab_size, block_size, n_layer, n_head, d_model, dropout, tie_embeddings, init_std, layers,
  attention_impl, dtype, dims, vocab_multiple, mup_base_width`` (see `GPTConfig`), and class attributes
  ``FAMILY`` (the registry name, `tnjax.models.family`), ``PROJECTIONS`` (projection names of one block),
  ``PROJECTION_AXES`` (each projection's input and output logical axes, `tnjax.nn.kinds.LOGICAL_AXES`, which
  sharding rules map to mesh axes) and ``BLOCK_DIMS`` (keys of ``dims``, each a positive integer).

  The methods here are the config side of the model seam: `spec` and `projection_shape` (what a
  projection is), `block_dims`, `kv_heads`, JSON round trips.
  """

  FAMILY = ""
  PROJECTIONS: tuple[str, ...] = ()
  PROJECTION_AXES: dict[str, tuple[str, str]] = {}
  BLOCK_DIMS: tuple[str, ...] = ()

  def __post_init__(self):
    # Frozen dataclass, not a pytree: normalizing here is safe and keeps
    # equality and JSON round trips exact.
    owner = type(self).__name__
    object.__setattr__(self, "layers", {k: LayerSpec.coerce(v, f"layers[{k!r}]", owner)
                                        for k, v in self.layers.items()})
    self.validate()

  def __hash__(self) -> int:
    # Modules keep the config as static metadata, which jit hashes.
    return hash(self.to_json())

  @property
  def ff_dim(self) -> int:
    return 4 * self.d_model if self.d_ff is None else self.d_ff

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_head

  @property
  def kv_heads(self) -> int:
    """Key/value heads (GPT-2: one per query head)."""
    return self.n_head

  @property
  def padded_vocab(self) -> int:
    """Rows of the token-embedding table: ``vocab_size`` rounded up to ``vocab_multiple`` for a dense tied
    embedding, else ``vocab_size`` (TT embeddings pad their own way, low-rank and MPS ones need no padding; an
    untied head is never padded).

    Examples:
      >>> GPTConfig().padded_vocab, GPTConfig(vocab_multiple=1).padded_vocab
      (50304, 50257)
    """
    if self.spec("embedding").kind != "dense" or not self.tie_embeddings:
      return self.vocab_size
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  @property
  def projection_std(self) -> float:
    """Init std of the (non-residual) projections: ``init_std``, times ``sqrt(mup_base_width / d_model)`` under muP."""
    return self.init_std * (1.0 if self.mup_base_width is None else math.sqrt(self.mup_base_width / self.d_model))

  @property
  def output_multiplier(self) -> float:
    """Scale of the LM head's input: 1, or ``mup_base_width / d_model`` under muP."""
    return 1.0 if self.mup_base_width is None else self.mup_base_width / self.d_model

  def validate(self) -> None:
    """Checks what every family shares: sizes, layer keys and specs, per-block sizes, tying."""
    owner = type(self).__name__
    _check_scalar_fields(self)
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "vocab_multiple"):
      _checks.check_positive_int(owner, name, getattr(self, name))
    if self.d_model % self.n_head:
      raise ValueError(f"{owner}: d_model={self.d_model} but it must be divisible by n_head={self.n_head}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"{owner}: dropout={self.dropout} but 0 <= dropout < 1 is expected")
    for key in self.layers:
      layer, name = parse_layer_key(key)
      if layer is not None and layer >= self.n_layer:
        raise ValueError(f"{owner}: layers key {key!r} names block {layer} but n_layer={self.n_layer}")
      if name not in self.PROJECTIONS and not (name in GLOBAL_ONLY + (EVERY_PROJECTION,) and layer is None):
        raise ValueError(f"{owner}: layers key {key!r} is unknown; expected one of "
                         f"{self.PROJECTIONS + GLOBAL_ONLY}, 'h.<i>.<projection>' or '*' (every projection)")
    for key, value in self.dims.items():
      layer = parse_block_key(key)
      if layer is None or layer >= self.n_layer:
        raise ValueError(f"{owner}: dims key {key!r} but 'h.<i>' with i < n_layer={self.n_layer} is expected")
      unknown = set(value) - set(self.BLOCK_DIMS)
      if unknown:
        raise ValueError(f"{owner}: dims[{key!r}] has unknown fields {sorted(unknown)}; expected {self.BLOCK_DIMS}")
      for name, size in value.items():
        self._check_block_dim(key, name, size)
    for key, spec in self.layers.items():
      kind = _kinds.get(spec.kind)
      if not kind.projection and key != "embedding":
        raise ValueError(f"{owner}: layers[{key!r}].kind={spec.kind!r} but {spec.kind!r} is for the embedding only")
      if not kind.embedding and key == "embedding":
        raise ValueError(f"{owner}: layers['embedding'].kind={spec.kind!r} but {spec.kind!r} is for projections "
                         f"and an untied lm_head; use one of {_kinds.kind_names(embedding=True)} for the embedding")
      if spec.quant is not None and key == "embedding":
        raise ValueError(f"{owner}: layers['embedding'].quant={spec.quant!r} but only projections are quantized")
    for key, spec in self.layers.items():
      self._check_fit(key, spec)
    if self.mup_base_width is not None:
      _checks.check_positive_int(owner, "mup_base_width", self.mup_base_width)
    if self.tie_embeddings and "lm_head" in self.layers:
      raise ValueError(f"{owner}: layers['lm_head'] is set but tie_embeddings=True (the head is the embedding)")

  def _check_block_dim(self, key: str, name: str, value) -> None:
    _checks.check_positive_int(type(self).__name__, f"dims[{key!r}][{name!r}]", value)

  def projection_shape(self, name: str, layer: int) -> tuple[int, int]:
    """(in_features, out_features) of projection ``name`` in block ``layer`` ("lm_head": (d_model, vocab_size)).

    Examples:
      >>> GPTConfig().projection_shape("attn.c_attn", 0), GPTConfig().projection_shape("mlp.c_proj", 0)
      ((768, 2304), (3072, 768))
    """
    if name == "lm_head":
      return self.d_model, self.vocab_size
    return self.block_shapes(layer)[name]

  def block_shapes(self, layer: int, widths: tuple[int, int, int] | None = None) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every projection of block ``layer``, at its widths or at ``widths``
    (d_ff, qk_dim, v_dim as `block_dims` gives them).

    Examples:
      >>> GPTConfig().block_shapes(0, (1024, 32, 64))["attn.c_attn"]
      (768, 1536)
    """
    return self._block_shapes(*(widths or self.block_dims(layer)))

  def _block_shapes(self, f: int, qk: int, v: int) -> dict[str, tuple[int, int]]:
    raise NotImplementedError

  def _check_fit(self, key: str, spec: LayerSpec) -> None:
    """The spec's kind must store the projection (TT dims covering it, a BTT rank fitting its blocks), in every
    block it covers."""
    block, name = parse_layer_key(key)
    if name == "embedding":
      return
    where = f"{type(self).__name__}: layers[{key!r}]"
    kind = _kinds.get(spec.kind)
    names = self.PROJECTIONS if name == EVERY_PROJECTION else (name,)
    for layer, name in ((i, n) for i in ([block] if block is not None else range(self.n_layer)) for n in names):
      kind.check_shape(spec, where, *self.projection_shape(name, layer))

  def spec(self, name: str, layer: int | None = None) -> LayerSpec:
    """The spec of projection ``name`` in block ``layer`` (most specific key wins; "*" covers projections only)."""
    if layer is not None and layer_key(layer, name) in self.layers:
      return self.layers[layer_key(layer, name)]
    if name in self.layers or name in GLOBAL_ONLY:
      return self.layers.get(name, LayerSpec())
    return self.layers.get(EVERY_PROJECTION, LayerSpec())

  def spec_of(self, key: str) -> LayerSpec:
    """The spec of a full layer name ("h.{i}.{projection}", "embedding" or "lm_head")."""
    layer, name = parse_layer_key(key)
    return self.spec(name, layer)

  def block_dims(self, layer: int) -> tuple[int, int, int]:
    """(d_ff, qk_dim, v_dim) of block ``layer``: MLP width and per-head query/key and value widths."""
    d = self.dims.get(block_key(layer), {})
    return d.get("d_ff", self.ff_dim), d.get("qk_dim", self.head_dim), d.get("v_dim", self.head_dim)

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)

  def at_width(self, d_model: int):
    """This configuration widened or narrowed to ``d_model`` by heads at a fixed head width, with ``d_ff`` (and a
    Llama's key/value heads) scaled alike: the base model of muP.

    Examples:
      >>> base = GPTConfig(d_model=768, n_head=12).at_width(256)
      >>> base.d_model, base.n_head, base.ff_dim
      (256, 4, 1024)
    """
    fn = f"{type(self).__name__}.at_width"
    if (d_model * self.n_head) % self.d_model or d_model % self.head_dim:
      raise ValueError(f"{fn}: d_model={d_model} but a multiple of head_dim={self.head_dim} is expected (widths "
                       f"change by heads; d_model={self.d_model}, n_head={self.n_head})")
    if self.dims:
      raise ValueError(f"{fn}: dims={self.dims} (per-block widths) cannot be rescaled; expected no dims")
    fixed = sorted(k for k, v in self.layers.items() if v.in_dims is not None or v.out_dims is not None)
    if fixed:
      raise ValueError(f"{fn}: layers {fixed} give explicit in_dims/out_dims, which do not rescale; expected "
                       "default dims")
    d_ff = None if self.d_ff is None else self.d_ff * d_model // self.d_model
    return self.replace(d_model=d_model, n_head=d_model // self.head_dim, d_ff=d_ff,
                        **self._width_changes(d_model // self.head_dim))

  def _width_changes(self, n_head: int) -> dict:
    """Fields besides ``d_model``, ``n_head`` and ``d_ff`` that `at_width` changes for ``n_head`` heads."""
    del n_head
    return {}

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["layers"] = {k: {f: (list(x) if isinstance(x, tuple) else x) for f, x in dataclasses.asdict(v).items()}
                   for k, v in self.layers.items()}
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict):
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**{"vocab_multiple": 1, **d})  # saved before vocab padding existed: no padding

  @classmethod
  def from_json(cls, text: str):
    return cls.from_dict(json.loads(text))


def _check_scalar_fields(cfg) -> None:
  """Every scalar field of a family's config by its annotation (a config read from JSON may hold a string):
  ``float`` fields finite numbers, epsilons (``*_eps``) > 0 (a negative one made a NaN model), ``int | None``
  fields positive integers or None, ``bool`` fields booleans."""
  owner = type(cfg).__name__
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if f.type == "float":
      ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
      positive = f.name.endswith("_eps")
      if not ok or (positive and value <= 0):
        raise ValueError(f"{owner}: {f.name}={value!r} ({type(value).__name__}) but a finite number"
                         f"{' > 0' if positive else ''} is expected")
    elif f.type == "int | None" and value is not None:
      _checks.check_positive_int(owner, f.name, value)
    elif f.type == "bool" and not isinstance(value, bool):
      raise ValueError(f"{owner}: {f.name}={value!r} ({type(value).__name__}) but true or false is expected")


@dataclasses.dataclass(frozen=True)
class GPTConfig(DecoderConfig):
  """A GPT-2 style decoder.

  Attributes:
    vocab_size, block_size, n_layer, n_head, d_model: sizes.
    d_ff: MLP width (default 4 * d_model).
    dropout: one rate for embeddings, attention and residual outputs.
    tie_embeddings: the LM head reuses the token embedding (``attend``).
    layer_norm_eps: LayerNorm epsilon (GPT-2: 1e-5).
    init_std: std of weights at init (GPT-2: 0.02; residual projections
      are scaled by 1 / sqrt(2 * n_layer) as in GPT-2).
    layers: tensorization of projections, keyed by "embedding", "lm_head",
      a projection name (all blocks: "mlp.c_fc"), "h.{i}.{name}" (one
      block) or "*" (every projection). Values are `LayerSpec`, a kind string
      or a dict. The most specific key wins; unnamed projections are dense.
    attention_impl: passed to ``jax.nn.dot_product_attention``
      (None: XLA default; "cudnn" on GPUs for fused attention).
    dtype: computation dtype (e.g. "bfloat16"); None keeps float32.
    vocab_multiple: a dense tied embedding table gets ``vocab_size`` rounded
      up to a multiple of this many rows (`padded_vocab`; 50257 ->
      50304 at 128), so the LM-head matmul has tensor-core-friendly shapes.
      Padding rows are never looked up, their logits are masked out of the
      loss and sliced off ``model(ids)``; exports and tokenizer-facing shapes
      keep ``vocab_size``. Configs saved before this field existed load with 1.
    mup_base_width: None (standard parametrization), or the width at which
      this model's muP parametrization equals the standard one. Then every
      projection's init std is scaled by ``sqrt(mup_base_width / d_model)``
      (TT-matrix cores balanced by their own fan-ins, as BTT cores always
      are) and the LM head's input by ``mup_base_width / d_model``;
      `tnjax.train.mup_multipliers` gives the matching per-core
      learning rates. Widths change by heads at a fixed head width, so the
      attention scale stays ``1 / sqrt(head_dim)``.
    dims: per-block sizes that differ from the defaults, keyed "h.{i}", each a
      dict of "d_ff" (MLP width), "qk_dim" (query/key width per head) and
      "v_dim" (value width per head); what MoDeGPT compression produces.
      Attention keeps the scale 1 / sqrt(d_model / n_head).

  Examples:
    >>> cfg = GPTConfig(n_layer=2, layers={"mlp.c_fc": {"kind": "ttm", "rank": 8}, "h.0.mlp.c_fc": "dense"})
    >>> cfg.spec("mlp.c_fc", 0).kind, cfg.spec("mlp.c_fc", 1).kind, cfg.ff_dim
    ('dense', 'ttm', 3072)
    >>> GPTConfig.from_json(cfg.to_json()) == cfg
    True
  """

  vocab_size: int = 50257
  block_size: int = 1024
  n_layer: int = 12
  n_head: int = 12
  d_model: int = 768
  d_ff: int | None = None
  dropout: float = 0.0
  tie_embeddings: bool = True
  layer_norm_eps: float = 1e-5
  init_std: float = 0.02
  layers: dict[str, Any] = dataclasses.field(default_factory=dict)
  attention_impl: str | None = None
  dtype: str | None = None
  dims: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
  vocab_multiple: int = 128
  mup_base_width: int | None = None

  FAMILY = "gpt2"
  PROJECTIONS = PROJECTIONS
  # c_attn's output is queries, keys and values side by side, all of them heads
  PROJECTION_AXES = {"attn.c_attn": ("embed", "heads"), "attn.c_proj": ("heads", "embed"),
                     "mlp.c_fc": ("embed", "mlp"), "mlp.c_proj": ("mlp", "embed")}
  BLOCK_DIMS = BLOCK_DIMS
  __hash__ = DecoderConfig.__hash__  # a frozen dataclass would otherwise hash its (unhashable) dict fields

  def _block_shapes(self, f: int, qk: int, v: int) -> dict[str, tuple[int, int]]:
    d = self.d_model
    return {"attn.c_attn": (d, self.n_head * (2 * qk + v)), "attn.c_proj": (self.n_head * v, d),
            "mlp.c_fc": (d, f), "mlp.c_proj": (f, d)}


PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, d_model=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, d_model=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, d_model=1280),
    "tiny": dict(vocab_size=512, block_size=128, n_layer=2, n_head=4, d_model=128),
}

