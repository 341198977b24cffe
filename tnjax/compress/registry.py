"""The compression methods, registered once: name, what they compress, the targets, calibration and
allocations they take. `compress` runs one by name; ``tnjax compress --method`` offers exactly these
names, and the methods table of the docs is `methods_table` (a test keeps the page equal to it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tnjax.compress import _model
from tnjax.compress.methods import (
    btt_compress,
    btt_least,
    embedding_least,
    lowrank_least,
    mpo_compress,
    mpo_least,
    svd_compress,
    svdllm_compress,
    tensorgpt_embedding,
)
from tnjax.compress.modegpt import least_weights as modegpt_least_weights
from tnjax.compress.modegpt import modegpt_compress
from tnjax.compress.targets import ALLOCATIONS, TARGETS, Target, check_choice
from tnjax.models.decoder import Decoder


@dataclasses.dataclass(frozen=True)
class Method:
  """One registered method.

  Attributes:
    name: the registry (and CLI) name.
    run: ``run(model, target, *, calib, layers, allocation, sequential, if_larger, **options)``.
    summary: one line for the docs and ``--help``.
    part: "projections" (attention and MLP, or ``layers``) or "embedding".
    targets: the target keys it takes.
    calibration: "none", "optional" (used when given: an allocation or a metric) or "required".
    allocations: the allocations of a ratio it takes.
    sequential: whether it can calibrate block by block on the compressed blocks.
    options: other keyword options ``compress`` passes through.
    least: ``least(model, names, *, allocation, **options)``: the weights of the layers ``names`` at the
      method's smallest (rank 1 everywhere, or its least widths), from the shapes alone (nothing is fitted).
    writes: the kind of the projections it writes, when it fits any projection anew from its dense
      reconstruction: tensorized layers of another kind are then re-factored (`tnjax.compress.methods.refactored`),
      which ``tnjax compress`` refuses unless asked.
  """

  name: str
  run: Callable
  summary: str
  part: str = "projections"
  targets: tuple[str, ...] = TARGETS
  calibration: str = "none"
  allocations: tuple[str, ...] = ALLOCATIONS
  sequential: bool = False
  options: tuple[str, ...] = ()
  least: Callable = None
  writes: str | None = None


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds ``method`` to the registry (its name must be new)."""
  if method.name in REGISTRY:
    raise ValueError(f"register: a method named {method.name!r} is already registered")
  REGISTRY[method.name] = method
  return method


def _svd(model, target, *, calib, layers, allocation, sequential, if_larger):
  return svd_compress(model, **{target.key: target.value}, layers=layers, allocation=allocation, calib=calib,
                      if_larger=if_larger)


def _svdllm(model, target, *, calib, layers, allocation, sequential, if_larger):
  return svdllm_compress(model, calib, **{target.key: target.value}, layers=layers, allocation=allocation,
                         sequential=sequential, if_larger=if_larger)


def _mpo(fit):
  def run(model, target, *, calib, layers, allocation, sequential, if_larger, layout="balanced"):
    return mpo_compress(model, **{target.key: target.value}, layers=layers, layout=layout, fit=fit, calib=calib,
                        allocation=allocation, sequential=sequential, if_larger=if_larger)

  return run


def _btt(fit):
  def run(model, target, *, calib, layers, allocation, sequential, if_larger):
    return btt_compress(model, **{target.key: target.value}, layers=layers, fit=fit, calib=calib,
                        allocation=allocation, sequential=sequential, if_larger=if_larger)

  return run


def _btt_least(model, names, *, allocation, **options):
  return btt_least(model, names, allocation)


def _modegpt(model, target, *, calib, layers, allocation, sequential, if_larger, **options):
  # Its factors are dense: on TT-matrix (or other tensorized) layers the result would be larger than the input.
  cfg = model.config
  tensorized = [n for n in _model.projection_names(cfg) if cfg.spec_of(n).kind != "dense"]
  if tensorized:
    raise ValueError(f"compress: method='modegpt' but layers {tensorized[:4]}{'...' if len(tensorized) > 4 else ''} "
                     "are not dense; modegpt expects dense projections (it would make these larger)")
  return modegpt_compress(model, calib, ratio=target.value, allocation=allocation, **options)


def _lowrank_least(model, names, *, allocation, **options):
  return lowrank_least(model, names, allocation)


def _mpo_least(model, names, *, allocation, layout="balanced", **options):
  return mpo_least(model, names, allocation, layout=layout)


def _modegpt_least(model, names, *, allocation, **options):
  return modegpt_least_weights(model, allocation=allocation)


def _tensorgpt_least(model, names, *, allocation, form="mps", **options):
  return embedding_least(model, form=form)


def _tensorgpt(model, target, *, calib, layers, allocation, sequential, if_larger, form="mps", head="tied"):
  return tensorgpt_embedding(model, **{target.key: target.value}, form=form, head=head, calib=calib,
                             if_larger=if_larger)


register(Method("svd", _svd, "truncated SVD of each weight matrix (the baseline)", calibration="optional",
                least=_lowrank_least, writes="lowrank"))
register(Method("svdllm", _svdllm, "SVD-LLM: SVD in each layer's input metric (output error)",
                calibration="required", sequential=True, least=_lowrank_least, writes="lowrank"))
register(Method("mpo", _mpo("weights"), "CompactifAI: TT-SVD of each weight matrix into an MPO",
                calibration="optional", options=("layout",), least=_mpo_least, writes="ttm"))
register(Method("mpo-data", _mpo("data"), "MPO fitted to each layer's outputs (Kronecker-factored input metric)",
                calibration="required", sequential=True, least=_mpo_least, writes="ttm"))
register(Method("btt", _btt("weights"), "Block-TT (Monarch at rank 1) of each weight matrix: per-block SVD",
                calibration="optional", least=_btt_least, writes="btt"))
register(Method("btt-data", _btt("data"), "Block-TT fitted to each layer's outputs: per-block SVD-LLM, then a "
                "least-squares refit of the right cores in the full input Gram", calibration="required",
                sequential=True, least=_btt_least, writes="btt"))
register(Method("modegpt", _modegpt, "MoDeGPT: Nystrom (MLP), CR (Q/K), whitened SVD (V/O) per block",
                targets=("ratio",), calibration="required", allocations=("importance", "uniform"),
                options=("refit_ridge",), least=_modegpt_least))
register(Method("tensorgpt", _tensorgpt, "TensorGPT: the embedding as an MPS per row (or one TT-matrix, or U V)",
                part="embedding", calibration="optional", allocations=("uniform",), options=("form", "head"),
                least=_tensorgpt_least))
METHODS = tuple(REGISTRY)


def method(name: str) -> Method:
  """The registered method ``name``."""
  return REGISTRY[check_choice("compress", "method", name, tuple(REGISTRY))]


def check_options(fn: str, m: Method, options: dict) -> None:
  """Refuses keyword options that method ``m`` does not declare (`Method.options`), naming those it takes."""
  unknown = sorted(set(options) - set(m.options))
  if unknown:
    raise ValueError(f"{fn}: {', '.join(f'{k}={options[k]!r}' for k in unknown)} but {m.name} takes "
                     f"{'only ' + ', '.join(m.options) if m.options else 'no other options'}")


def compress(model: Decoder, method_name: str, *, rank: int | None = None, ratio: float | None = None,
             rtol: float | None = None, calib=None, layers=None, allocation: str = "uniform",
             sequential: bool = False, if_larger: str = "error", **options) -> Decoder:
  """Runs a registered method by name at one target (exactly one of ``rank``, ``ratio``, ``rtol``; see
  `tnjax.compress.targets`).

  Args:
    model: the model to compress.
    method_name: a name of `REGISTRY` ("svd", "svdllm", "mpo", "mpo-data", "btt", "btt-data", "modegpt",
      "tensorgpt").
    rank, ratio, rtol: the target.
    calib: calibration ids (batch, time) or a `Calibration` (required or optional per method).
    layers: projections to compress (methods whose part is the projections, modegpt excepted).
    allocation: how a ratio is spread over layers ("uniform", "importance", "loss"; per method).
    sequential: calibrate block by block on the compressed blocks (svdllm, mpo-data).
    if_larger: "error", "keep" or "allow", for a layer the target would not make smaller.
    options: a method's own options: ``layout`` for mpo, ``refit_ridge`` for modegpt, ``form``, ``head``
      for tensorgpt.

  Raises:
    ValueError: for an unknown method, a target, allocation, option or ``layers`` the method does not take,
      missing calibration, and the methods' own argument errors; all before any work is done.

  Examples:
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
    >>> compress(model, "mpo", rank=4).config.spec("attn.c_proj", 1).kind
    'ttm'
  """
  fn = "compress"
  m = method(method_name)
  target = Target.of(fn, rank=rank, ratio=ratio, rtol=rtol, accepted=m.targets)
  check_choice(fn, "allocation", allocation, m.allocations)
  check_choice(fn, "if_larger", if_larger, ("error", "keep", "allow"))
  check_options(fn, m, options)
  if calib is None and m.calibration == "required":
    raise ValueError(f"{fn}: method={m.name!r} needs calibration text (calib=, or --calib FILE)")
  if calib is not None and m.calibration == "none":
    raise ValueError(f"{fn}: calib given but {m.name} does not read calibration")
  if sequential and not m.sequential:
    raise ValueError(f"{fn}: sequential=True but {m.name} does not calibrate block by block; "
                     f"{[k for k, v in REGISTRY.items() if v.sequential]} do")
  if layers is not None and (m.part == "embedding" or m.name == "modegpt"):
    why = "compresses the embedding only" if m.part == "embedding" else "compresses every block (global widths)"
    raise ValueError(f"{fn}: layers={layers!r} but {m.name} {why}")
  return m.run(model, target, calib=calib, layers=layers, allocation=allocation, sequential=sequential,
               if_larger=if_larger, **options)


def methods_table() -> str:
  """The Markdown table of registered methods (the docs show exactly this).

  Examples:
    >>> print(methods_table().splitlines()[0])
    | method | what it does | compresses | targets | calibration | allocations | sequential |
  """
  lines = ["| method | what it does | compresses | targets | calibration | allocations | sequential |",
           "|---|---|---|---|---|---|---|"]
  for m in REGISTRY.values():
    lines.append(f"| `{m.name}` | {m.summary} | {m.part} | {', '.join(m.targets)} | {m.calibration} | "
                 f"{', '.join(m.allocations)} | {'yes' if m.sequential else 'no'} |")
  return "\n".join(lines) + "\n"
