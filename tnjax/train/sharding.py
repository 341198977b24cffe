"""Sharding for training: a mesh of named device axes, and rules that map logical axes to mesh axes.

Every parameter has one logical axis name per dimension (`tnjax.models.Decoder.logical_axes`, from its
layer kind, `tnjax.nn.LayerKind.axes`): "embed", "mlp", "heads", "kv_heads", "vocab", or None (a TT bond, a
position); a batch of token ids has "batch" on its leading axis. A rule maps a logical axis to a mesh axis, a
list of mesh axes (split over their product), or None (replicated). `logical_spec` turns a parameter's axes
into a ``PartitionSpec``:

* a dimension gets the mesh axes its logical axis maps to, less those an earlier dimension of the same array
  already took (a mesh axis splits at most one dimension of an array) and those of size 1;
* a rule that does not divide the dimension falls back, dropping mesh axes from the end of its list, to
  replication: a TT core mode of 12 over 8 devices is replicated, its neighbour of 16 split. Parameters are
  never padded. (Batches are not: a batch the batch rule does not divide is an error, `tnjax.train.Trainer`.)

`PRESETS` are the rules of the usual layouts, and `TrainConfig.sharding` picks one (``sharding_rules``
overrides single entries):

* "data" (the default): data parallel. Batches split over mesh axis "data", parameters replicated.
* "fsdp" (also ``fsdp=true``): every logical axis on "data" too, so each parameter and its Adam moments are
  split over the devices along their first dimension that the device count divides (ZeRO-3 / FSDP: XLA
  gathers parameters for the forward and reduce-scatters gradients).
* "fsdp_tp": FSDP over "data" ("embed" and "batch") and tensor parallel over a second axis "model" ("mlp",
  "heads", "kv_heads", "vocab"), Megatron's layout: an MLP's up projection (embed, mlp) splits its columns over
  "model", its down projection (mlp, embed) its rows.

Examples:
  >>> rules = resolve_rules("fsdp_tp", {})
  >>> logical_spec(("embed", "mlp"), (128, 512), rules, {"data": 2, "model": 2})
  P('data', 'model')
  >>> logical_spec((None, "embed", "mlp", None), (1, 8, 12, 4), rules, {"data": 2, "model": 8})  # 12 % 8: replicated
  P(None, 'data', None, None)
"""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from tnjax.nn.kinds import LOGICAL_AXES

_PARAM_AXES = tuple(a for a in LOGICAL_AXES if a != "batch")
PRESETS = {
    "data": {"batch": "data"},
    "fsdp": {"batch": "data", **{a: "data" for a in _PARAM_AXES}},
    "fsdp_tp": {"batch": "data", "embed": "data", "mlp": "model", "heads": "model", "kv_heads": "model",
                "vocab": "model"},
}
# The mesh a preset's rules name, when the config names none: every device on the first axis.
PRESET_MESH_AXES = {"data": ("data",), "fsdp": ("data",), "fsdp_tp": ("data", "model")}


def resolve_rules(preset: str, overrides: dict, fn: str = "resolve_rules") -> dict[str, tuple[str, ...]]:
  """Every logical axis's mesh axes (a tuple, () for replicated): preset ``preset``'s rules, then ``overrides``
  (logical axis -> a mesh axis name, a list of them, or None / [] for replicated).

  Raises:
    ValueError: an unknown preset, an unknown logical axis, a value that is not a name, a list of distinct
      names or None.

  Examples:
    >>> resolve_rules("data", {"mlp": ["data"]})["mlp"], resolve_rules("fsdp", {"vocab": None})["vocab"]
    (('data',), ())
  """
  if preset not in PRESETS:
    raise ValueError(f"{fn}: sharding={preset!r} but one of {tuple(PRESETS)} is expected")
  unknown = sorted(set(overrides) - set(LOGICAL_AXES))
  if unknown:
    raise ValueError(f"{fn}: sharding_rules has logical axes {unknown} but the logical axes are {LOGICAL_AXES}")
  rules = {a: () for a in LOGICAL_AXES}
  for name, value in {**PRESETS[preset], **overrides}.items():
    mesh = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(mesh, list) or not all(isinstance(m, str) and m for m in mesh) or len(set(mesh)) < len(mesh):
      raise ValueError(f"{fn}: sharding_rules[{name!r}]={value!r} but a mesh axis name, a list of distinct names "
                       "or None is expected")
    rules[name] = tuple(mesh)
  return rules


def mesh_layout(preset: str, mesh_axes, mesh_shape, devices: int, fn: str = "mesh_layout"
                ) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """The mesh's axis names and sizes on ``devices`` devices: ``mesh_axes`` (None: the preset's,
  `PRESET_MESH_AXES`) and ``mesh_shape`` (None: every device on the first axis; one entry may be -1, the
  devices the others leave).

  Raises:
    ValueError: names that are not distinct identifiers, a shape of another length or with entries that are not
      positive (or one -1), or sizes whose product is not the device count.

  Examples:
    >>> mesh_layout("fsdp_tp", None, [-1, 2], 8), mesh_layout("data", None, None, 4)
    ((('data', 'model'), (4, 2)), (('data',), (4,)))
  """
  axes = tuple(PRESET_MESH_AXES.get(preset, ("data",)) if mesh_axes is None else mesh_axes)
  if not axes or not all(isinstance(a, str) and a.isidentifier() for a in axes) or len(set(axes)) < len(axes):
    raise ValueError(f"{fn}: mesh_axes={list(axes)} but distinct identifier names (at least one) are expected")
  shape = [-1] + [1] * (len(axes) - 1) if mesh_shape is None else list(mesh_shape)
  if len(shape) != len(axes) or shape.count(-1) > 1 or any(
      isinstance(s, bool) or not isinstance(s, int) or (s < 1 and s != -1) for s in shape):
    raise ValueError(f"{fn}: mesh_shape={shape} but {len(axes)} positive sizes (one may be -1), one per mesh axis "
                     f"of mesh_axes={list(axes)}, are expected")
  given, known = list(shape), math.prod(s for s in shape if s != -1)
  if -1 in shape and devices % known == 0:
    shape[shape.index(-1)] = devices // known
  if -1 in shape or math.prod(shape) != devices:
    raise ValueError(f"{fn}: mesh_shape={given} for mesh_axes={list(axes)} but there are {devices} "
                     "devices (jax.device_count()); sizes whose product is the device count are expected")
  return axes, tuple(shape)


def check_rules(fn: str, rules: dict[str, tuple[str, ...]], mesh_axes: tuple[str, ...], preset: str) -> None:
  """Raises ValueError when a rule names a mesh axis the mesh does not have."""
  for name, mesh in rules.items():
    for axis in mesh:
      if axis not in mesh_axes:
        raise ValueError(f"{fn}: the rule {name!r} -> {axis!r} (sharding={preset!r}, sharding_rules) names mesh "
                         f"axis {axis!r} but mesh_axes={list(mesh_axes)}; add it to mesh_axes and mesh_shape or "
                         "change the rule")


def logical_spec(axes: tuple, shape: tuple[int, ...], rules: dict[str, tuple[str, ...]],
                 sizes: dict[str, int]) -> P:
  """The ``PartitionSpec`` of an array of ``shape`` with logical ``axes`` under ``rules`` on a mesh of axis
  ``sizes``: each dimension its rule's mesh axes, less those taken by an earlier dimension and those of size 1,
  and less trailing ones until their product divides it (the module docstring).

  Raises:
    ValueError: when ``axes`` has not one entry per dimension.
  """
  if len(axes) != len(shape):
    raise ValueError(f"logical_spec: axes={tuple(axes)} but shape={tuple(shape)}; one logical axis per dimension is "
                     "expected")
  used, parts = set(), []
  for name, n in zip(axes, shape):
    mesh = [a for a in (rules.get(name, ()) if name is not None else ()) if a not in used and sizes[a] > 1]
    while mesh and n % math.prod(sizes[a] for a in mesh):
      mesh.pop()
    used.update(mesh)
    parts.append(entry(mesh))
  return P(*parts)


def entry(mesh_axes) -> str | tuple[str, ...] | None:
  """One ``PartitionSpec`` entry for a dimension split over ``mesh_axes``: None, a name, or a tuple of names."""
  mesh_axes = tuple(mesh_axes)
  return None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes


def param_shardings(params: dict, mesh, rules: dict[str, tuple[str, ...]], axes: dict[str, tuple]) -> dict:
  """``{name: NamedSharding}`` of every array in ``params`` (``{name: array}``): its logical ``axes[name]`` under
  ``rules`` (`logical_spec`); a name ``axes`` lacks is replicated.

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    >>> s = param_shardings({"w": jnp.ones((4, 8))}, mesh, resolve_rules("fsdp_tp", {}), {"w": ("embed", "mlp")})
    >>> s["w"].spec  # axes of size 1 split nothing
    P(None, None)
  """
  sizes = dict(mesh.shape)
  return {k: NamedSharding(mesh, logical_spec(axes[k], v.shape, rules, sizes) if k in axes else P())
          for k, v in params.items()}


def make_mesh(axes: tuple[str, ...], shape: tuple[int, ...]) -> jax.sharding.Mesh:
  """Every device in a mesh of ``shape`` with axis names ``axes`` (`jax.make_mesh`'s device order; axes of type
  Auto: XLA propagates shardings through the step)."""
  return jax.make_mesh(tuple(shape), tuple(axes), axis_types=(AxisType.Auto,) * len(axes), devices=jax.devices())
