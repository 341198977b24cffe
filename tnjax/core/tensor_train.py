"""The two pytrees of tnjax: `TensorTrain` (MPS) and `TTMatrix` (MPO).

Both hold only their cores. Dims, ranks and sizes are derived from core
shapes, so they are static under ``jit`` and per-example under ``vmap``.
Validation lives in `from_cores` (never in ``__post_init__``, which
``unflatten`` also runs on non-array leaves).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


def _validate_cores(cls_name: str, cores, core_ndim: int, layout: str) -> tuple[jax.Array, ...]:
  fn = f"{cls_name}.from_cores"
  cores = tuple(jnp.asarray(c) for c in cores)
  if not cores:
    raise ValueError(f"{fn}: cores is empty but at least one core is expected")
  for k, c in enumerate(cores):
    if c.ndim != core_ndim:
      raise ValueError(f"{fn}: cores[{k}].shape={c.shape} but a {core_ndim}-d core {layout} is expected")
  if cores[0].shape[0] != 1 or cores[-1].shape[-1] != 1:
    raise ValueError(
        f"{fn}: boundary ranks are ({cores[0].shape[0]}, {cores[-1].shape[-1]}) but (1, 1) is expected")
  for k in range(len(cores) - 1):
    if cores[k].shape[-1] != cores[k + 1].shape[0]:
      raise ValueError(
          f"{fn}: cores[{k}].shape[-1]={cores[k].shape[-1]} but cores[{k + 1}].shape[0]="
          f"{cores[k + 1].shape[0]}; neighbouring ranks must match")
  dtypes = {c.dtype for c in cores}
  if len(dtypes) != 1:
    raise ValueError(f"{fn}: cores have dtypes {sorted(map(str, dtypes))} but one dtype is expected")
  return cores


class _TTBase:
  """Properties shared by both formats (all derived from core shapes)."""

  cores: tuple[jax.Array, ...]

  @property
  def ndim(self) -> int:
    """Number of cores d."""
    return len(self.cores)

  @property
  def ranks(self) -> tuple[int, ...]:
    """The d + 1 bond dimensions (r[0], ..., r[d]), with r[0] = r[d] = 1."""
    return tuple(c.shape[0] for c in self.cores) + (self.cores[-1].shape[-1],)

  @property
  def num_params(self) -> int:
    """Total number of entries in the cores."""
    return sum(math.prod(c.shape) for c in self.cores)

  @property
  def dtype(self):
    return self.cores[0].dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TensorTrain(_TTBase):
  """A tensor in TT (MPS) format: core k has shape (r[k], n[k], r[k+1]).

  The tensor's entry ``x[i1, ..., id]`` is the matrix product
  ``cores[0][:, i1, :] @ ... @ cores[d-1][:, id, :]`` (a 1 x 1 matrix).

  Build one with `from_cores` (validates) or [`tt_svd`][tnjax.tt_svd].

  Examples:
    >>> import jax.numpy as jnp, tnjax
    >>> tt = tnjax.TensorTrain((jnp.ones((1, 2, 3)), jnp.ones((3, 4, 1))))
    >>> tt.dims, tt.ranks, tt.num_params
    ((2, 4), (1, 3, 1), 18)
  """

  cores: tuple[jax.Array, ...]

  @classmethod
  def from_cores(cls, cores) -> TensorTrain:
    """Validates core shapes (3-d, matching bonds, boundary ranks 1, one dtype)."""
    return cls(_validate_cores("TensorTrain", cores, 3, "(r[k], n[k], r[k+1])"))

  @property
  def dims(self) -> tuple[int, ...]:
    """Mode sizes (n[0], ..., n[d-1])."""
    return tuple(c.shape[1] for c in self.cores)

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of the dense tensor, equal to `dims`."""
    return self.dims

  @property
  def dense_size(self) -> int:
    return math.prod(self.dims)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TTMatrix(_TTBase):
  """A matrix in TT (MPO) format: core k has shape (r[k], n_in[k], n_out[k], r[k+1]).

  The dense matrix has shape ``(prod(in_dims), prod(out_dims))``; row index
  ``(i1, ..., id)`` and column index ``(j1, ..., jd)`` are read in row-major
  order, and entry ``W[(i), (j)] = cores[0][:, i1, j1, :] @ ... @ cores[d-1][:, id, jd, :]``.

  Build one with `from_cores` (validates) or [`ttm_svd`][tnjax.ttm_svd].

  Examples:
    >>> import jax, tnjax
    >>> ttm = tnjax.random_ttm(jax.random.key(0), (2, 3), (4, 5), rank=2)
    >>> ttm.in_dims, ttm.out_dims, ttm.shape, ttm.ranks
    ((2, 3), (4, 5), (6, 20), (1, 2, 1))
  """

  cores: tuple[jax.Array, ...]

  @classmethod
  def from_cores(cls, cores) -> TTMatrix:
    """Validates core shapes (4-d, matching bonds, boundary ranks 1, one dtype)."""
    return cls(_validate_cores("TTMatrix", cores, 4, "(r[k], n_in[k], n_out[k], r[k+1])"))

  @property
  def in_dims(self) -> tuple[int, ...]:
    return tuple(c.shape[1] for c in self.cores)

  @property
  def out_dims(self) -> tuple[int, ...]:
    return tuple(c.shape[2] for c in self.cores)

  @property
  def shape(self) -> tuple[int, int]:
    """Shape of the dense matrix: (prod(in_dims), prod(out_dims))."""
    return (math.prod(self.in_dims), math.prod(self.out_dims))

  @property
  def dense_size(self) -> int:
    return math.prod(self.shape)


TT = TensorTrain | TTMatrix


def as_tt(t: TT) -> TensorTrain:
  """Views a TTMatrix as a TensorTrain over merged modes n_in[k] * n_out[k] (no copy of meaning)."""
  if isinstance(t, TensorTrain):
    return t
  return TensorTrain(tuple(c.reshape(c.shape[0], c.shape[1] * c.shape[2], c.shape[3]) for c in t.cores))


def split_modes(tt: TensorTrain, in_dims, out_dims) -> TTMatrix:
  """Views a TensorTrain with modes n_in[k] * n_out[k] as a TTMatrix (inverse of `as_tt`)."""
  return TTMatrix(tuple(
      c.reshape(c.shape[0], i, o, c.shape[-1]) for c, i, o in zip(tt.cores, in_dims, out_dims)))


def like(template: TT, tt: TensorTrain) -> TT:
  """Inverse of `as_tt`: gives ``tt`` the format (and mode split) of ``template``."""
  if isinstance(template, TensorTrain):
    return tt
  return split_modes(tt, template.in_dims, template.out_dims)


def check_tt(fn: str, name: str, t) -> None:
  if not isinstance(t, (TensorTrain, TTMatrix)):
    raise ValueError(f"{fn}: {name} is a {type(t).__name__} but a TensorTrain or TTMatrix is expected")
