"""Layer kinds: one object per way of storing a projection or an embedding, registered once.

A kind (``LayerSpec.kind`` in a model config) is a `LayerKind`: it checks its
spec against a projection's shape, builds the NNX layer, and gives its
hidden matrices' fan-ins for muP. Config validation
([`DecoderConfig`][tnjax.models.config.DecoderConfig]), the model builders
([`make_linear`][tnjax.models.decoder.make_linear],
[`make_embedding`][tnjax.models.decoder.make_embedding]),
[`hidden_fan_ins`][tnjax.nn.hidden_fan_ins] and the CLI's help read this
registry, so a new kind is one subclass and one `register` call, in or out
of the package:

    class Kron(LayerKind):
      name, layers = "kron", (KronLinear,)
      def linear(self, spec, n_in, n_out, *, std, use_bias, dtype, rngs, balance):
        return KronLinear(n_in, n_out, rank=spec.rank, ...)
    register(Kron())

The built-in kinds are "dense", "ttm" (TT-matrix / MPO), "btt" (Block-TT),
"lowrank" and "mps" (TensorGPT's embedding). Each kind also names the logical axes of
its parameters (`LayerKind.axes`), which training's sharding rules map to
mesh axes (`tnjax.train.sharding`). A layer a kind builds needs a
``kernel`` property (its dense (in, out) matrix, for export and
compression), ``num_params`` and, where its cost is not a dense matmul's, a
``flops(rows)`` method. Saving and loading need nothing more: a model is
rebuilt from its config and the saved arrays are checked against it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from tnjax.core.btt import btt_dims, check_btt_dims
from tnjax.core.contraction import path_flops
from tnjax.core.tensor_train import TTMatrix
from tnjax.nn.layers import BTTLinear, LowRankEmbedding, LowRankLinear, MPSEmbedding, TTEmbedding, TTMLinear
from tnjax.nn.quant import Int8Linear

# Logical axes of parameters and activations: what a sharding rule maps to a mesh axis (`tnjax.train.sharding`).
# "batch" is the activations' leading axis; the others are the model dimensions a parameter axis spans (a TT or
# BTT core's mode: the dimension it factorizes). Bond (rank) axes have none and are never sharded.
LOGICAL_AXES = ("batch", "embed", "mlp", "heads", "kv_heads", "vocab")


class LayerKind:
  """One layer kind (module docstring): subclass it, set the class attributes, override what applies.

  Attributes:
    name: the ``LayerSpec.kind`` string.
    projection: whether it builds projections (and an untied LM head).
    embedding: whether it builds the token embedding.
    needs_rank: whether ``LayerSpec.rank`` must be a positive integer.
    per_bond_ranks: whether ``LayerSpec.ranks`` (exact per-bond ranks) applies.
    takes_blocks: whether ``LayerSpec.blocks`` applies.
    layers: the NNX projection classes it builds (`kind_of` and `hidden_fan_ins` find a layer's kind by them).
    embeddings: the NNX embedding classes it builds.
    summary: one line for the CLI's help.
  """

  name = ""
  projection = True
  embedding = False
  needs_rank = True
  per_bond_ranks = False
  takes_blocks = False
  layers: tuple[type, ...] = ()
  embeddings: tuple[type, ...] = ()
  summary = ""

  def check_shape(self, spec, where: str, n_in: int, n_out: int) -> None:
    """Raises ValueError (prefixed by ``where``) when ``spec`` cannot store an (n_in, n_out) projection."""

  def linear(self, spec, n_in: int, n_out: int, *, std: float, use_bias: bool, dtype, rngs: nnx.Rngs,
             balance: str = "equal") -> nnx.Module:
    """The projection, with dense-equivalent init std ``std``."""
    raise ValueError(f"layer kind {self.name!r} builds no projections")

  def embed(self, spec, cfg, rngs: nnx.Rngs) -> nnx.Module:
    """The token embedding of config ``cfg`` (its ``vocab_size``, ``padded_vocab``, ``d_model``, ``init_std``)."""
    raise ValueError(f"layer kind {self.name!r} builds no embedding")

  def fan_ins(self, layer: nnx.Module) -> dict[str, int]:
    """The fan-in of each hidden matrix of projection ``layer``, by parameter name relative to it (muP); {} for
    none."""
    return {}

  def axes(self, layer: nnx.Module, rows: str | None, cols: str | None) -> dict[str, tuple[str | None, ...]]:
    """The logical axes (`LOGICAL_AXES` names, None for an axis no rule shards) of each parameter of ``layer``,
    by parameter name relative to it (as `fan_ins`), one per dimension. ``rows`` and ``cols`` are the logical
    axes of the matrix the layer stores: a projection's input and output (``("embed", "mlp")`` for an MLP's up
    projection), an embedding's vocabulary and features (``("vocab", "embed")``). A TT or BTT core's mode
    gets the axis of the dimension it factorizes. Default {}: every parameter replicated."""
    return {}

  def quantize(self, layer: nnx.Module):
    """Projection ``layer`` with weight-only int8 storage in this kind (its bias not copied), or None when the
    kind has no int8 form of its own: then `tnjax.compress.quantize_int8` stores its dense kernel as an
    `Int8Linear` (kind "dense")."""
    return None

  def flops(self, layer: nnx.Module, rows: int) -> int:
    """Forward FLOPs (2 per multiply-add, bias excluded) of projection ``layer`` on ``rows`` rows: the layer's
    own ``flops(rows)`` where it has one, else a dense matmul's."""
    if hasattr(layer, "flops"):
      return layer.flops(rows)
    return 2 * rows * layer.in_features * layer.out_features

  def head_flops(self, table: nnx.Module, rows: int) -> int:
    """Forward FLOPs of the tied LM head ``x @ E.T`` of embedding ``table`` on ``rows`` rows (default: a dense
    table's, which an MPS table is rebuilt to)."""
    return 2 * rows * table.features * table.num_embeddings


_REGISTRY: dict[str, LayerKind] = {}


def register(kind: LayerKind, *, replace: bool = False) -> LayerKind:
  """Adds ``kind`` to the registry under ``kind.name``; returns it.

  Raises:
    ValueError: for a name that is empty or not a string, a kind that builds neither projections nor
      embeddings, or a name already registered (unless ``replace``).

  Examples:
    >>> class Dense2(Dense):
    ...   name = "dense2"
    >>> register(Dense2()).name in kind_names()
    True
    >>> unregister("dense2")
  """
  if not isinstance(kind, LayerKind):
    raise ValueError(f"register: kind={kind!r} but a LayerKind instance is expected")
  if not isinstance(kind.name, str) or not kind.name.isidentifier():
    raise ValueError(f"register: kind.name={kind.name!r} but a non-empty identifier string is expected")
  if not (kind.projection or kind.embedding):
    raise ValueError(f"register: kind {kind.name!r} has projection=False and embedding=False; it must build one")
  if kind.name in _REGISTRY and not replace:
    raise ValueError(f"register: layer kind {kind.name!r} is already registered; pass replace=True to replace it")
  _REGISTRY[kind.name] = kind
  return kind


def unregister(name: str) -> None:
  """Removes a kind registered outside the package (a built-in kind cannot be removed)."""
  if name in BUILTIN:
    raise ValueError(f"unregister: {name!r} is a built-in layer kind")
  _REGISTRY.pop(name, None)


def kind_names(*, projection: bool | None = None, embedding: bool | None = None) -> tuple[str, ...]:
  """Registered kind names, in registration order, optionally only those that build projections/embeddings.

  Examples:
    >>> kind_names(embedding=True)
    ('dense', 'ttm', 'lowrank', 'mps')
  """
  return tuple(k.name for k in _REGISTRY.values() if (projection is None or k.projection == projection)
               and (embedding is None or k.embedding == embedding))


def get(name: str, owner: str = "LayerSpec", where: str = "kind") -> LayerKind:
  """The registered kind ``name``; a ValueError naming ``owner`` and ``where`` for an unknown one."""
  if name not in _REGISTRY:
    raise ValueError(f"{owner}: {where}.kind={name!r} but one of {kind_names()} is expected")
  return _REGISTRY[name]


def kind_of(layer: nnx.Module) -> LayerKind | None:
  """The registered kind that builds ``layer``'s class, a projection or an embedding (None for another module)."""
  for kind in _REGISTRY.values():
    if isinstance(layer, kind.layers + kind.embeddings):
      return kind
  return None


def hidden_fan_ins(module: nnx.Module) -> dict[str, int]:
  """The fan-in of every hidden matrix in ``module``, by dotted parameter name (as ``nnx.to_flat_state``).

  Hidden matrices are projection kernels, TT-matrix and BTT cores and
  low-rank factors; each core is a batched matrix whose fan-in is the number
  of inputs one of its outputs sums over: ``r[k] * n_in[k]`` for TT-matrix
  core k, ``m1`` and ``r * m2`` for the BTT cores, ``in`` for ``u`` and ``r``
  for ``v``. Embeddings, norms, biases, int8 layers and an untied ``lm_head``
  (scaled by the model's output multiplier instead) are absent: muP keeps
  their learning rates. Each layer's kind (`kind_of`) gives them. Used by
  `tnjax.train.mup_multipliers`.

  Examples:
    >>> from flax import nnx
    >>> hidden_fan_ins(BTTLinear(768, 3072, rank=4, rngs=nnx.Rngs(0)))
    {'cores.0': 32, 'cores.1': 96}
  """
  out = {}
  for path, node in nnx.iter_graph(module):
    if path[:1] == ("lm_head",):
      continue
    kind = kind_of(node)
    if kind is not None and isinstance(node, kind.layers):
      prefix = "".join(f"{p}." for p in path)
      out.update({prefix + name: fan for name, fan in kind.fan_ins(node).items()})
  return out


def _quantized(layer) -> bool:
  return getattr(layer, "quant", None) is not None


class Dense(LayerKind):
  """A plain (in, out) kernel (``nnx.Linear``; `Int8Linear` with ``quant="int8"``) or ``nnx.Embed`` table."""

  name, embedding, needs_rank, summary = "dense", True, False, "dense"
  layers, embeddings = (nnx.Linear, Int8Linear), (nnx.Embed,)

  def linear(self, spec, n_in, n_out, *, std, use_bias, dtype, rngs, balance="equal"):
    if spec.quant == "int8":
      return Int8Linear(n_in, n_out, use_bias=use_bias, dtype=dtype)
    return nnx.Linear(n_in, n_out, use_bias=use_bias, dtype=dtype, kernel_init=nnx.initializers.normal(std),
                      bias_init=nnx.initializers.zeros, rngs=rngs)

  def embed(self, spec, cfg, rngs):
    return nnx.Embed(cfg.padded_vocab, cfg.d_model, dtype=_dtype(cfg),
                     embedding_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)

  def fan_ins(self, layer):
    return {"kernel": layer.kernel.shape[0]} if isinstance(layer, nnx.Linear) else {}

  def axes(self, layer, rows, cols):
    if isinstance(layer, nnx.Embed):
      return {"embedding": (rows, cols)}
    out = {"kernel": (rows, cols)} if isinstance(layer, nnx.Linear) else {"q": (rows, cols), "scale": (None, cols)}
    return {**out, **_bias_axes(layer, cols)}

  def flops(self, layer, rows):
    return 2 * rows * layer.in_features * layer.out_features


class TTM(LayerKind):
  """TT-matrix (MPO) cores: `TTMLinear`, and `TTEmbedding` for the embedding."""

  name, embedding, per_bond_ranks, summary = "ttm", True, True, "ttm (rank)"
  layers, embeddings = (TTMLinear,), (TTEmbedding,)

  def check_shape(self, spec, where, n_in, n_out):
    dims = (spec.in_dims, spec.out_dims)
    if None not in dims and len(dims[0]) != len(dims[1]):
      raise ValueError(f"{where}: in_dims={dims[0]}, out_dims={dims[1]} but one entry per core in both is expected")
    _check_cover(where, n_in, n_out, *dims)

  def linear(self, spec, n_in, n_out, *, std, use_bias, dtype, rngs, balance="equal"):
    return TTMLinear(n_in, n_out, rank=spec.rank_arg, in_dims=spec.in_dims, out_dims=spec.out_dims,
                     num_cores=spec.num_cores, use_bias=use_bias, path=spec.path, dtype=dtype, kernel_std=std,
                     rngs=rngs, quant=spec.quant, balance=balance)

  def embed(self, spec, cfg, rngs):
    return TTEmbedding(cfg.vocab_size, cfg.d_model, rank=spec.rank_arg, vocab_dims=spec.in_dims,
                       feature_dims=spec.out_dims, num_cores=spec.num_cores, std=cfg.init_std, path=spec.path,
                       dtype=_dtype(cfg), rngs=rngs)

  def fan_ins(self, layer):
    return {} if _quantized(layer) else {f"cores.{k}": c.shape[0] * c.shape[1] for k, c in enumerate(layer.cores)}

  def axes(self, layer, rows, cols):
    # core k: (r[k], n_in[k], n_out[k], r[k+1]); int8 scales have the cores' shapes with size-1 leading axes
    core = (None, rows, cols, None)
    return {**_core_axes(layer, [core] * len(layer.cores)), **_bias_axes(layer, cols)}

  def quantize(self, layer):
    return TTMLinear(layer.in_features, layer.out_features, ttm=layer.ttm, use_bias=layer.bias is not None,
                     path=layer.path, quant="int8")

  def head_flops(self, table, rows):
    head = TTMatrix(tuple(jax.ShapeDtypeStruct(tuple(c.shape[k] for k in (0, 2, 1, 3)), c.dtype)
                          for c in table.cores))  # the transposed table's cores, shapes only
    return path_flops(head, rows, table.path, table.cost)


class BTT(LayerKind):
  """Block Tensor-Train (Monarch at rank 1): `BTTLinear`, projections and an untied head only."""

  name, summary, takes_blocks = "btt", "btt (rank; blocks)", True
  layers = (BTTLinear,)

  @staticmethod
  def dims(spec, n_in: int, n_out: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(in_dims, out_dims) of an (n_in, n_out) projection: from ``blocks``, the spec's own, or `btt_dims`'."""
    if spec.blocks is not None:
      b = spec.blocks
      return (-(-n_in // b), b), (b, -(-n_out // b))
    default_in, default_out = btt_dims(n_in, n_out)
    return spec.in_dims or default_in, spec.out_dims or default_out

  def check_shape(self, spec, where, n_in, n_out):
    dims = self.dims(spec, n_in, n_out)
    check_btt_dims(where, *dims, spec.rank)
    _check_cover(where, n_in, n_out, *dims)

  def linear(self, spec, n_in, n_out, *, std, use_bias, dtype, rngs, balance="equal"):
    in_dims, out_dims = self.dims(spec, n_in, n_out)
    return BTTLinear(n_in, n_out, rank=spec.rank, in_dims=in_dims, out_dims=out_dims, use_bias=use_bias,
                     dtype=dtype, kernel_std=std, rngs=rngs, quant=spec.quant)

  def quantize(self, layer):
    return BTTLinear(layer.in_features, layer.out_features, btt=layer.btt, use_bias=layer.bias is not None,
                     quant="int8")

  def fan_ins(self, layer):
    if _quantized(layer):
      return {}
    left, right = layer.cores
    return {"cores.0": left.shape[1], "cores.1": right.shape[1] * right.shape[2]}

  def axes(self, layer, rows, cols):
    # left (m2, m1, r, n1): rows = (m1, m2); right (n1, r, m2, n2): cols = (n1, n2)
    return {**_core_axes(layer, [(rows, rows, None, cols), (cols, None, rows, cols)]), **_bias_axes(layer, cols)}


class LowRank(LayerKind):
  """``W = u @ v``: `LowRankLinear`, and `LowRankEmbedding` for the embedding (a rank above the smaller side is
  capped)."""

  name, embedding, summary = "lowrank", True, "lowrank (rank)"
  layers, embeddings = (LowRankLinear,), (LowRankEmbedding,)

  def linear(self, spec, n_in, n_out, *, std, use_bias, dtype, rngs, balance="equal"):
    return LowRankLinear(n_in, n_out, rank=min(spec.rank, n_in, n_out), use_bias=use_bias, dtype=dtype,
                         kernel_std=std, rngs=rngs, quant=spec.quant)

  def embed(self, spec, cfg, rngs):
    return LowRankEmbedding(cfg.vocab_size, cfg.d_model, rank=min(spec.rank, cfg.vocab_size, cfg.d_model),
                            std=cfg.init_std, dtype=_dtype(cfg), rngs=rngs)

  def fan_ins(self, layer):
    return {} if _quantized(layer) else {"u": layer.u.shape[0], "v": layer.v.shape[0]}

  def axes(self, layer, rows, cols):
    # u (rows, r), v (r, cols); int8 scales: (1, r) and (1, cols)
    factors = {"u": (rows, None), "v": (None, cols)}
    scales = {} if getattr(layer, "scales", None) is None else {"scales.0": (None, None), "scales.1": (None, cols)}
    return {**factors, **scales, **_bias_axes(layer, cols)}

  def quantize(self, layer):
    return LowRankLinear(layer.in_features, layer.out_features, u=layer.u[...], v=layer.v[...],
                         use_bias=layer.bias is not None, quant="int8")

  def head_flops(self, table, rows):
    return table.attend_flops(rows)  # (x @ v.T) @ u.T


class MPS(LayerKind):
  """TensorGPT: every token row its own TT (MPS), `MPSEmbedding`; the embedding only."""

  name, projection, embedding, per_bond_ranks, summary = "mps", False, True, True, "mps (embedding)"
  embeddings = (MPSEmbedding,)

  def axes(self, layer, rows, cols):
    # core k: (num_embeddings, r[k], n[k], r[k+1])
    return {f"cores.{k}": (rows, None, cols, None) for k in range(len(layer.cores))}

  def embed(self, spec, cfg, rngs):
    return MPSEmbedding(cfg.vocab_size, cfg.d_model, rank=spec.rank_arg, feature_dims=spec.out_dims,
                        num_cores=spec.num_cores, std=cfg.init_std, dtype=_dtype(cfg), rngs=rngs)


def _bias_axes(layer, cols) -> dict:
  return {} if getattr(layer, "bias", None) is None else {"bias": (cols,)}


def _core_axes(layer, axes: list) -> dict:
  """Core k's logical axes ``axes[k]``, and its int8 scales' the same (their size-1 axes shard nowhere)."""
  out = {f"cores.{k}": a for k, a in enumerate(axes)}
  if getattr(layer, "scales", None) is not None:
    out.update({f"scales.{k}": a for k, a in enumerate(axes)})
  return out


def _dtype(cfg):
  return None if cfg.dtype is None else jnp.dtype(cfg.dtype)


def _check_cover(where: str, n_in: int, n_out: int, in_dims, out_dims) -> None:
  for size, field, got in ((n_in, "in_dims", in_dims), (n_out, "out_dims", out_dims)):
    if got is not None and math.prod(got) < size:
      raise ValueError(f"{where}: prod({field})={math.prod(got)} but the projection has {size} "
                       f"{'inputs' if field == 'in_dims' else 'outputs'}; expected prod({field}) >= {size}")


BUILTIN = tuple(register(k).name for k in (Dense(), TTM(), BTT(), LowRank(), MPS()))
