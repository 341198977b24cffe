"""Training configuration: defaults, ``key=value`` overrides, TOML files, and the resolved JSON saved with a run."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import pathlib
import types
import typing
from typing import Any

import jax

from tnjax._io import read_json
from tnjax.core import _checks
from tnjax.data import SAMPLE_DIR
from tnjax.train.sharding import check_rules, mesh_layout, resolve_rules

_TTM16 = {"kind": "ttm", "rank": 16}
PARAMETRIZATIONS = ("standard", "mup")
SCHEDULES = ("cosine", "wsd")


@dataclasses.dataclass
class TrainConfig:
  """Everything a training run depends on. Defaults train a tiny TTM-GPT on the packaged sample in ~1 minute on CPU.

  Attributes:
    model: a preset of [`preset`][tnjax.models.preset], of any family ("tiny" GPT-2, "llama-tiny", ...).
    model_overrides: config fields to change (vocab_size and block_size are set from
      the tokenizer and ``block_size``).
    layers: tensorization (``GPTConfig.layers``); default ``{"*": ...}``: every projection of the
      family TTM rank 16.
    train_files, valid_files, test_files: text files (test may be empty).
    tokenizer: a tokenizer file or directory; None trains a byte-level BPE of
      ``vocab_size`` on the training files (saved in the run directory).
    batch_size: sequences per optimizer step (split into ``grad_accum`` micro-batches).
    schedule: the learning rate after ``warmup`` linear steps: "cosine" decays to
      ``min_lr_ratio * lr`` over the run; "wsd" (warmup-stable-decay) holds ``lr``, then
      decays linearly to ``min_lr_ratio * lr`` over the last ``decay_fraction`` of the steps.
      A WSD run's stable phase does not depend on ``steps``, so one run gives several
      budgets: branch a checkpoint of the stable phase into a shorter run
      ([`branch`][tnjax.train.branch], ``tnjax train --branch RUN --at STEP``).
    decay_fraction: the share of ``steps`` that "wsd" spends decaying, in (0, 1].
    keep_every: also keep every checkpoint whose step is a multiple of this (0: only the last
      ``keep``), e.g. the branch points of a WSD run.
    dtype: computation dtype ("float32" or "bfloat16"; parameters and optimizer stay float32).
    fsdp: shard parameters and optimizer state over devices, not only the batch: the same as
      ``sharding="fsdp"`` (it changes a "data" preset only; the others shard parameters already).
    sharding: the preset of sharding rules (`tnjax.train.sharding.PRESETS`): "data" (data parallel),
      "fsdp", or "fsdp_tp" (FSDP over mesh axis "data", tensor parallel over "model").
    sharding_rules: rules over the preset's, logical axis ("batch", "embed", "mlp", "heads", "kv_heads",
      "vocab") -> a mesh axis, a list of mesh axes, or null / [] (replicated), e.g.
      ``{"vocab": null}``. A rule that does not divide a parameter's dimension leaves it replicated
      (`tnjax.train.sharding`).
    mesh_axes: names of the device mesh's axes; None: the preset's (["data"], or ["data", "model"] for
      "fsdp_tp").
    mesh_shape: the mesh's size along each of ``mesh_axes``, their product the device count; one may be -1
      (the devices the others leave). None: every device on the first axis.
    log_every: steps between logged losses. Losses stay on the devices and a logged one is read (and checked:
      a NaN or infinite loss stops the run) at the next log step, one interval later, so the loop never waits
      for the step it has just dispatched: divergence is caught at most ``log_every`` steps after the step that
      logged it, and always before the next evaluation or checkpoint.
    prefetch: batches made ahead of the step on a background thread and already on the devices
      (`tnjax.data.Prefetcher`); 0 makes each batch in the loop. The batches, and so the losses, are the same
      for every depth, and it may change on ``--resume``.
    parametrization: "standard", or "mup": the model gets ``mup_base_width``
      (init stds and output multiplier, see ``GPTConfig.mup_base_width``)
      and every hidden matrix and TT/BTT core its own learning-rate
      multiplier (`tnjax.train.mup_multipliers`), so ``lr`` tuned at
      ``d_model = mup_base_width`` carries over to wider models.
    mup_base_width: the width at which muP equals the standard parametrization.

  Examples:
    >>> cfg = TrainConfig(steps=1000, layers={"mlp.c_fc": {"kind": "ttm", "rank": 64}}, dtype="bfloat16")
    >>> cfg.validate().batch_size, cfg.model
    (16, 'tiny')
  """

  model: str = "tiny"
  model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  layers: dict[str, Any] = dataclasses.field(default_factory=lambda: {"*": dict(_TTM16)})
  train_files: list[str] = dataclasses.field(default_factory=lambda: [str(SAMPLE_DIR / "train.txt")])
  valid_files: list[str] = dataclasses.field(default_factory=lambda: [str(SAMPLE_DIR / "valid.txt")])
  test_files: list[str] = dataclasses.field(default_factory=list)
  tokenizer: str | None = None
  vocab_size: int = 1024
  block_size: int = 64
  batch_size: int = 16
  grad_accum: int = 1
  steps: int = 200
  lr: float = 3e-3
  min_lr_ratio: float = 0.1
  warmup: int = 20
  schedule: str = "cosine"
  decay_fraction: float = 0.2
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  b1: float = 0.9
  b2: float = 0.95
  dtype: str = "float32"
  eval_every: int = 50
  eval_batches: int = 8
  log_every: int = 10
  checkpoint_every: int = 100
  keep: int = 3
  keep_every: int = 0
  seed: int = 0
  fsdp: bool = False
  sharding: str = "data"
  sharding_rules: dict[str, str | list[str] | None] = dataclasses.field(default_factory=dict)
  mesh_axes: list[str] | None = None
  mesh_shape: list[int] | None = None
  prefetch: int = 2
  parametrization: str = "standard"
  mup_base_width: int = 128
  out_dir: str = "runs/tiny-ttm"

  def validate(self) -> TrainConfig:
    """Checks every field's type and range, and that the model it describes builds; returns ``self``.

    Raises:
      ValueError: naming the field, the value and what is expected.
    """
    fn = "TrainConfig"
    hints = typing.get_type_hints(type(self))
    for f in dataclasses.fields(self):
      _check_type(fn, f.name, getattr(self, f.name), hints[f.name])
    for name in ("block_size", "batch_size", "grad_accum", "steps", "eval_every", "eval_batches", "log_every",
                 "checkpoint_every", "keep", "vocab_size"):
      _checks.check_positive_int(fn, name, getattr(self, name))
    if self.batch_size % self.grad_accum:
      raise ValueError(f"{fn}: batch_size={self.batch_size} but it must be divisible by grad_accum={self.grad_accum}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"{fn}: dtype={self.dtype!r} but 'float32' or 'bfloat16' is expected")
    if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup < 0:
      raise ValueError(f"{fn}: lr={self.lr}, min_lr_ratio={self.min_lr_ratio}, warmup={self.warmup} but lr > 0, "
                       "0 <= min_lr_ratio <= 1 and warmup >= 0 are expected")
    if self.warmup >= self.steps:
      raise ValueError(f"{fn}: warmup={self.warmup} but steps={self.steps}; warmup < steps is expected (the learning "
                       "rate would not reach lr before the run ends)")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"{fn}: schedule={self.schedule!r} but one of {SCHEDULES} is expected")
    if not 0 < self.decay_fraction <= 1:
      raise ValueError(f"{fn}: decay_fraction={self.decay_fraction!r} but 0 < decay_fraction <= 1 is expected")
    if self.keep_every < 0:
      raise ValueError(f"{fn}: keep_every={self.keep_every!r} but keep_every >= 0 is expected (0: off)")
    if self.prefetch < 0:
      raise ValueError(f"{fn}: prefetch={self.prefetch!r} but prefetch >= 0 is expected (0: no prefetching)")
    if self.parametrization not in PARAMETRIZATIONS:
      raise ValueError(f"{fn}: parametrization={self.parametrization!r} but one of {PARAMETRIZATIONS} is expected")
    _checks.check_positive_int(fn, "mup_base_width", self.mup_base_width)
    # Optimizer and seed: a negative clip norm flips the gradients, b >= 1 never forgets.
    for name, ok, expected in (("grad_clip", self.grad_clip > 0, "grad_clip > 0"),
                               ("b1", 0 <= self.b1 < 1, "0 <= b1 < 1"), ("b2", 0 <= self.b2 < 1, "0 <= b2 < 1"),
                               ("weight_decay", self.weight_decay >= 0, "weight_decay >= 0"),
                               ("seed", self.seed >= 0, "seed >= 0")):
      if not (ok and math.isfinite(getattr(self, name))):
        raise ValueError(f"{fn}: {name}={getattr(self, name)!r} but finite {expected} is expected")
    for name in ("train_files", "valid_files"):
      if not getattr(self, name):
        raise ValueError(f"{fn}: {name}=[] but at least one text file is expected")
    # The rules and the mesh's form; not the device count, which `Trainer` checks (asking it here would start
    # JAX's backend before a multi-process run has called jax.distributed.initialize, and a config is valid
    # whatever machine reads it).
    known = math.prod(s for s in self.mesh_shape or () if isinstance(s, int) and s > 0)
    self.sharding_layout(known)
    self.model_config(self.vocab_size)
    return self

  @property
  def sharding_preset(self) -> str:
    """``sharding``, or "fsdp" for ``fsdp=true`` with the default "data"."""
    return "fsdp" if self.fsdp and self.sharding == "data" else self.sharding

  def sharding_layout(self, devices: int | None = None) -> tuple[tuple[str, ...], tuple[int, ...], dict]:
    """(mesh axis names, mesh sizes, rules) of this run on ``devices`` devices (default ``jax.device_count()``,
    which starts JAX's backend: call ``jax.distributed.initialize`` before, on several hosts). The rules map
    every logical axis to a tuple of mesh axes (`tnjax.train.sharding.resolve_rules`).

    Raises:
      ValueError: an unknown preset or logical axis, a rule naming a mesh axis the mesh lacks, or a mesh shape
        that does not match the device count.

    Examples:
      >>> axes, sizes, rules = TrainConfig(sharding="fsdp_tp", mesh_shape=[1, 1]).sharding_layout(1)
      >>> axes, sizes, rules["mlp"], rules["embed"]
      (('data', 'model'), (1, 1), ('model',), ('data',))
    """
    fn, preset = "TrainConfig", self.sharding_preset
    rules = resolve_rules(preset, self.sharding_rules, fn)
    devices = jax.device_count() if devices is None else devices
    axes, sizes = mesh_layout(preset, self.mesh_axes, self.mesh_shape, devices, fn)
    check_rules(fn, rules, axes, preset)
    return axes, sizes, rules

  def model_config(self, vocab_size: int):
    """The model config this run builds (preset, overrides, layers, dtype, muP base width) for a tokenizer of
    ``vocab_size``."""
    from tnjax.models import preset

    mup = self.mup_base_width if self.parametrization == "mup" else None
    try:
      return preset(self.model, **{**self.model_overrides, "vocab_size": vocab_size, "block_size": self.block_size,
                                   "layers": self.layers, "dtype": None if self.dtype == "float32" else self.dtype,
                                   "mup_base_width": mup})
    except (TypeError, ValueError) as e:  # configs raise TypeError for unknown or ill-typed overrides
      raise ValueError(f"TrainConfig: model={self.model!r}, model_overrides={self.model_overrides!r}, "
                       f"layers={self.layers!r} do not make a model: {e}") from e

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def save(self, path) -> None:
    pathlib.Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

  @classmethod
  def from_dict(cls, d: dict) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"TrainConfig: unknown fields {unknown}; known: {sorted(names)}")
    return cls(**d).validate()


def _matches(value, tp) -> bool:
  """Whether a JSON/TOML value fits a field annotation (int is no bool; an int is a float)."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if tp is Any:
    return True
  if origin in (typing.Union, types.UnionType):
    return any(_matches(value, a) for a in args)
  if tp is type(None):
    return value is None
  if tp in (int, float):
    return not isinstance(value, bool) and isinstance(value, numbers.Integral if tp is int else numbers.Real)
  if origin is list:
    return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
  if origin is dict:
    return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
  return isinstance(value, origin or tp)


def _check_type(fn: str, name: str, value, tp) -> None:
  if not _matches(value, tp):
    expected = getattr(tp, "__name__", None) if typing.get_origin(tp) is None else None
    raise ValueError(f"{fn}: {name}={value!r} ({type(value).__name__}) but {expected or tp} is expected")


def _parse_value(key: str, text: str):
  """JSON, or a bare string (a path); text that starts like a JSON object, list or string must parse."""
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    if text.lstrip()[:1] in ("{", "[", '"'):
      raise ValueError(f"--set: {key}={text!r} is not valid JSON ({e})") from e
    return text


def apply_overrides(base: dict, overrides: list[str]) -> dict:
  """Applies ``key=value`` strings: values are JSON (numbers, true, lists, objects) or bare strings.

  ``field.key=value`` sets one key of a dict field, the rest after the first
  dot being the key: ``layers.mlp.c_fc={"kind": "ttm", "rank": 32}``,
  ``model_overrides.n_layer=4``.

  Examples:
    >>> apply_overrides({"steps": 10, "layers": {}}, ["steps=500", 'layers.mlp.c_fc={"kind": "ttm", "rank": 8}'])
    {'steps': 500, 'layers': {'mlp.c_fc': {'kind': 'ttm', 'rank': 8}}}
  """
  out = json.loads(json.dumps(base))
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"--set: {item!r} but key=value is expected")
    key, value = item.split("=", 1)
    field, _, sub = key.partition(".")
    if field not in out:
      raise ValueError(f"--set: unknown field {field!r}; known: {sorted(out)}")
    if sub:
      if not isinstance(out[field], dict):
        raise ValueError(f"--set: {field} is not a dict, so {key!r} cannot set a key inside it")
      out[field][sub] = _parse_value(key, value)
    else:
      out[field] = _parse_value(key, value)
  return out


# Fields a resumed run may change: none of them changes the model or the data it trains and validates on (the
# batches are the same, grad_accum only splits them; test files are read at the end). The schedule's fields change
# the learning rates from the resumed step on, which `train` states; every other field is refused.
RESUMABLE = ("steps", "out_dir", "lr", "min_lr_ratio", "warmup", "schedule", "decay_fraction", "weight_decay",
             "grad_clip", "b1", "b2", "grad_accum", "fsdp", "sharding", "sharding_rules", "mesh_axes", "mesh_shape",
             "eval_every", "log_every", "checkpoint_every", "keep", "keep_every", "test_files",
             "prefetch")  # prefetch: when batches are made, not which


def resolve(config_file: str | None = None, overrides: list[str] | None = None, *, resume: bool = False
            ) -> TrainConfig:
  """Defaults, then a config file's top-level keys (TOML, or JSON such as a run's ``train_config.json``), then
  ``--set`` overrides.

  With ``resume``, the run's saved ``train_config.json`` (in the ``out_dir`` that the overrides, the file or
  the default name) takes the place of the defaults, so that ``--resume`` needs only what changes, e.g.
  ``--set steps=4000``; `train` refuses a change to a field outside `RESUMABLE`. A dict field given
  whole (a TOML ``[layers]`` table, ``--set layers={...}``) replaces the one below it, while ``--set
  layers.KEY=...`` sets one key in it.

  Raises:
    ValueError: naming the file or the field: a config file that is missing or not UTF-8 TOML / JSON, a saved
      config that is missing or invalid (``resume``), an override that is not ``key=value``, and the field
      errors of `TrainConfig.validate`.

  Examples:
    >>> cfg = resolve(None, ["steps=50", "lr=1e-3"])
    >>> cfg.steps, cfg.lr
    (50, 0.001)
  """
  file = read_config(config_file) if config_file else {}
  d = {**TrainConfig().to_dict(), **file}
  if resume:
    out_dir = apply_overrides(d, overrides or [])["out_dir"]
    d = {**saved_config("resolve", out_dir), **file, "out_dir": out_dir}
  return TrainConfig.from_dict(apply_overrides(d, overrides or []))


def saved_config(fn: str, out_dir, *, resuming: bool = True) -> dict:
  """The resolved configuration saved in the run directory ``out_dir`` (``train_config.json``), as a dict with
  every field (those added since it was saved at their defaults).

  Raises:
    ValueError: naming the file when it is missing, not a JSON object, or has fields TrainConfig does not know.
  """
  path = pathlib.Path(out_dir) / "train_config.json"
  if not path.is_file():
    raise ValueError(f"{fn}: {'--resume but ' if resuming else ''}{path} does not exist; a training run directory "
                     "is expected")
  d = read_json(fn, path)
  if not isinstance(d, dict):
    raise ValueError(f"{fn}: {path} holds {type(d).__name__} but a JSON object of TrainConfig fields is expected")
  unknown = sorted(set(d) - set(TrainConfig().to_dict()))
  if unknown:
    raise ValueError(f"{fn}: {path} has unknown fields {unknown}; it is not a tnjax run configuration (or one of "
                     "another version)")
  return json.loads(json.dumps({**TrainConfig().to_dict(), **d}))


def read_config(path) -> dict:
  """The top-level keys of a config file: JSON when its name ends in ``.json`` (a run's ``train_config.json``),
  else TOML."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"resolve: config file {path} does not exist or is not a file")
  if path.suffix == ".json":
    d = read_json("resolve", path)
    if not isinstance(d, dict):
      raise ValueError(f"resolve: config file {path} holds {type(d).__name__} but a JSON object of TrainConfig "
                       "fields is expected")
    return d
  try:
    import tomllib
  except ImportError as e:  # Python 3.10
    raise ValueError("resolve: reading a TOML config needs Python >= 3.11 (tomllib)") from e
  try:
    return tomllib.loads(path.read_bytes().decode("utf-8"))
  except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
    raise ValueError(f"resolve: config file {path} is not valid UTF-8 TOML ({e})") from e
