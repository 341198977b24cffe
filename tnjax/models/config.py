"""GPT configuration: sizes, presets, and which projections are dense, TT-matrix or low-rank."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from tnjax.core import _checks
from tnjax.nn.quant import QUANTS

# Names of the projections a spec can target. Per-layer keys prefix these with
# "h.{i}." (e.g. "h.3.mlp.c_fc"); "embedding" and "lm_head" are global only.
PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
GLOBAL_ONLY = ("embedding", "lm_head")
KINDS = ("dense", "ttm", "lowrank", "mps")
BLOCK_DIMS = ("d_ff", "qk_dim", "v_dim")
_LAYER_KEY = re.compile(r"^h\.(\d+)\.(.+)$")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """How one projection is stored.

  Attributes:
    kind: "dense", "ttm" (TT-matrix / MPO cores), "lowrank" (U V factors) or,
      for the embedding only, "mps" (one TT / MPS per token row: TensorGPT).
    rank: TT rank or low-rank r; required unless kind is "dense".
    num_cores: number of TT cores when dims are not given.
    in_dims, out_dims: explicit TT mode sizes (default: ``tnjax.factorize``).
    path: TTM contraction path, "auto", "dense", "direct" or "split".
    quant: None, or "int8" for weight-only per-channel int8 storage
      (projections only; see [`quantize_int8`][tnjax.compress.quantize_int8]).

  Example:
    >>> LayerSpec.coerce({"kind": "ttm", "rank": 16}, "mlp.c_fc")
    LayerSpec(kind='ttm', rank=16, num_cores=3, in_dims=None, out_dims=None, path='auto', quant=None)
  """

  kind: str = "dense"
  rank: int | None = None
  num_cores: int = 3
  in_dims: tuple[int, ...] | None = None
  out_dims: tuple[int, ...] | None = None
  path: str = "auto"
  quant: str | None = None

  def validate(self, where: str) -> LayerSpec:
    if self.kind not in KINDS:
      raise ValueError(f"GPTConfig: {where}.kind={self.kind!r} but one of {KINDS} is expected")
    if self.kind != "dense" and (not isinstance(self.rank, int) or self.rank < 1):
      raise ValueError(f"GPTConfig: {where}.rank={self.rank!r} but a positive integer is expected for "
                       f"kind={self.kind!r}")
    if self.quant not in QUANTS:
      raise ValueError(f"GPTConfig: {where}.quant={self.quant!r} but one of {QUANTS} is expected")
    return self

  @classmethod
  def coerce(cls, value, where: str) -> LayerSpec:
    if isinstance(value, LayerSpec):
      return value.validate(where)
    if isinstance(value, str):
      return cls(kind=value).validate(where)
    if isinstance(value, dict):
      unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
      if unknown:
        raise ValueError(f"GPTConfig: {where} has unknown fields {sorted(unknown)}")
      value = dict(value)
      for k in ("in_dims", "out_dims"):
        if value.get(k) is not None:
          value[k] = tuple(value[k])
      return cls(**value).validate(where)
    raise ValueError(f"GPTConfig: {where}={value!r} but a LayerSpec, a kind string or a dict is expected")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
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
      a projection name (all blocks: "mlp.c_fc") or "h.{i}.{name}" (one
      block). Values are `LayerSpec`, a kind string or a dict. The most
      specific key wins; unnamed projections are dense.
    attention_impl: passed to ``jax.nn.dot_product_attention``
      (None: XLA default; "cudnn" on GPUs for fused attention).
    dtype: computation dtype (e.g. "bfloat16"); None keeps float32.
    dims: per-block sizes that differ from the defaults, keyed "h.{i}", each a
      dict of "d_ff" (MLP width), "qk_dim" (query/key width per head) and
      "v_dim" (value width per head); what MoDeGPT compression produces.
      Attention keeps the scale 1 / sqrt(d_model / n_head).

  Example:
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

  def __post_init__(self):
    # Frozen dataclass, not a pytree: normalizing here is safe and keeps
    # equality and JSON round trips exact.
    object.__setattr__(self, "layers", {k: LayerSpec.coerce(v, f"layers[{k!r}]") for k, v in self.layers.items()})
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

  def validate(self) -> None:
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
      _checks.check_positive_int("GPTConfig", name, getattr(self, name))
    if self.d_model % self.n_head:
      raise ValueError(f"GPTConfig: d_model={self.d_model} but it must be divisible by n_head={self.n_head}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"GPTConfig: dropout={self.dropout} but 0 <= dropout < 1 is expected")
    for key in self.layers:
      m = _LAYER_KEY.match(key)
      name = m.group(2) if m else key
      if m and int(m.group(1)) >= self.n_layer:
        raise ValueError(f"GPTConfig: layers key {key!r} names block {m.group(1)} but n_layer={self.n_layer}")
      if name not in PROJECTIONS and not (name in GLOBAL_ONLY and not m):
        raise ValueError(f"GPTConfig: layers key {key!r} is unknown; expected one of "
                         f"{PROJECTIONS + GLOBAL_ONLY} or 'h.<i>.<projection>'")
    for key, value in self.dims.items():
      m = re.match(r"^h\.(\d+)$", key)
      if not m or int(m.group(1)) >= self.n_layer:
        raise ValueError(f"GPTConfig: dims key {key!r} but 'h.<i>' with i < n_layer={self.n_layer} is expected")
      unknown = set(value) - set(BLOCK_DIMS)
      if unknown:
        raise ValueError(f"GPTConfig: dims[{key!r}] has unknown fields {sorted(unknown)}; expected {BLOCK_DIMS}")
      for name, size in value.items():
        _checks.check_positive_int("GPTConfig", f"dims[{key!r}][{name!r}]", size)
    for key, spec in self.layers.items():
      if spec.kind == "mps" and key != "embedding":
        raise ValueError(f"GPTConfig: layers[{key!r}].kind='mps' but 'mps' is for the embedding only")
      if spec.quant is not None and key == "embedding":
        raise ValueError(f"GPTConfig: layers['embedding'].quant={spec.quant!r} but only projections are quantized")
    if self.tie_embeddings and "lm_head" in self.layers:
      raise ValueError("GPTConfig: layers['lm_head'] is set but tie_embeddings=True (the head is the embedding)")

  def spec(self, name: str, layer: int | None = None) -> LayerSpec:
    """The spec of projection ``name`` in block ``layer`` (most specific key wins)."""
    if layer is not None and f"h.{layer}.{name}" in self.layers:
      return self.layers[f"h.{layer}.{name}"]
    return self.layers.get(name, LayerSpec())

  def block_dims(self, layer: int) -> tuple[int, int, int]:
    """(d_ff, qk_dim, v_dim) of block ``layer``: MLP width and per-head query/key and value widths."""
    d = self.dims.get(f"h.{layer}", {})
    return d.get("d_ff", self.ff_dim), d.get("qk_dim", self.head_dim), d.get("v_dim", self.head_dim)

  def replace(self, **changes) -> GPTConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["layers"] = {k: {f: (list(x) if isinstance(x, tuple) else x) for f, x in dataclasses.asdict(v).items()}
                   for k, v in self.layers.items()}
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict) -> GPTConfig:
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"GPTConfig: unknown fields {sorted(unknown)}")
    return cls(**d)

  @classmethod
  def from_json(cls, text: str) -> GPTConfig:
    return cls.from_dict(json.loads(text))


PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, d_model=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, d_model=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, d_model=1280),
    "tiny": dict(vocab_size=512, block_size=128, n_layer=2, n_head=4, d_model=128),
}


def preset(name: str, **overrides) -> GPTConfig:
  """A named configuration ("gpt2" = 124M, "gpt2-medium", "gpt2-large", "tiny" for CPU tests), with overrides.

  Example:
    >>> cfg = preset("gpt2", n_layer=6)
    >>> cfg.n_layer, cfg.d_model, cfg.vocab_size
    (6, 768, 50257)
  """
  if name not in PRESETS:
    raise ValueError(f"preset: name={name!r} but one of {sorted(PRESETS)} is expected")
  return GPTConfig(**{**PRESETS[name], **overrides})
