"""What ``tnjax compress`` runs: one method at one or several targets, with a report (JSON + Markdown) and a plot."""

from __future__ import annotations

import json
import math
import pathlib
import time

import jax
import numpy as np

from tnjax._io import atomic_write, atomic_write_text
from tnjax.compress import _model
from tnjax.compress.methods import mpo_compress, quantize_int8, svd_compress, svdllm_compress, tensorgpt_embedding
from tnjax.compress.modegpt import modegpt_compress
from tnjax.compress.tuning import heal
from tnjax.models.decoder import Decoder

METHODS = ("tensorgpt", "mpo", "modegpt", "svd", "svdllm")


def compress(model: Decoder, method: str, *, rank: int | None = None, ratio: float | None = None,
             rtol: float | None = None, calib=None, layers=None, layout: str | None = None) -> Decoder:
  """One method by name: "tensorgpt" (embedding), "mpo" (rank = chi), "modegpt" (ratio only), "svd" or
  "svdllm" (whitened SVD on calibration ``calib``).

  ``layout`` is mpo's ([`mpo_compress`][tnjax.compress.mpo_compress]): "balanced" (default) or "fused".

  Raises:
    ValueError: for an unknown method, a target or layout the method does not
      take, or the methods' own argument errors.

  Example:
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
    >>> compress(model, "mpo", rank=4).config.spec("attn.c_proj", 1).kind
    'ttm'
  """
  fn = "compress"
  if layout is not None and method != "mpo":
    raise ValueError(f"{fn}: layout={layout!r} but only mpo takes a layout")
  if method == "tensorgpt":
    if layers is not None:
      raise ValueError(f"{fn}: layers={layers!r} but tensorgpt compresses the embedding only")
    return tensorgpt_embedding(model, rank=rank, ratio=ratio, rtol=rtol)
  if method == "mpo":
    return mpo_compress(model, chi=rank, ratio=ratio, rtol=rtol, layers=layers, layout=layout or "balanced")
  if method == "svd":
    return svd_compress(model, rank=rank, ratio=ratio, rtol=rtol, layers=layers)
  if method == "svdllm":
    return svdllm_compress(model, calib, rank=rank, ratio=ratio, rtol=rtol, layers=layers)
  if method == "modegpt":
    if rank is not None or rtol is not None or ratio is None:
      raise ValueError(f"{fn}: rank={rank!r}, rtol={rtol!r}, ratio={ratio!r} but modegpt takes a ratio only")
    if layers is not None:
      raise ValueError(f"{fn}: layers={layers!r} but modegpt compresses every block (allocation is global)")
    # Its factors are dense: on TT-matrix (or other tensorized) layers the result would be larger than the input.
    cfg = model.config
    tensorized = [n for n in _model.projection_names(cfg) if cfg.spec_of(n).kind != "dense"]
    if tensorized:
      raise ValueError(f"{fn}: method='modegpt' but layers {tensorized[:4]}{'...' if len(tensorized) > 4 else ''} "
                       "are not dense; modegpt expects dense projections (it would make these larger)")
    return modegpt_compress(model, calib, ratio=ratio)
  raise ValueError(f"{fn}: method={method!r} but one of {METHODS} is expected")


def compressed_part(model: Decoder, method: str, layers=None) -> list[str]:
  """Names of the layers a method targets: "embedding" for tensorgpt, else the projections."""
  if method == "tensorgpt":
    return ["embedding"]
  return _model.resolve_layers("compress", model.config, None if method == "modegpt" else layers)


def summary(before: Decoder, after: Decoder, names: list[str]) -> dict:
  """Parameter and byte accounting: whole model and per compressed layer (biases included).

  Example:
    >>> from flax import nnx
    >>> from tnjax.compress import svd_compress
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
    >>> s = summary(model, svd_compress(model, ratio=0.5, layers=["h.0.mlp.c_fc"]), ["h.0.mlp.c_fc"])
    >>> round(s["part_kept"], 2), s["params_before"] - s["params_after"]
    (0.5, 32896)
  """
  rows = []
  for name in names:
    b, a = _model.count_params(_model.get_layer(before, name)), _model.count_params(_model.get_layer(after, name))
    rows.append({"layer": name, "params_before": b, "params_after": a, "kept": a / b})
  pb, pa = sum(r["params_before"] for r in rows), sum(r["params_after"] for r in rows)
  return {
      "params_before": _model.count_params(before), "params_after": _model.count_params(after),
      "bytes_before": _model.count_bytes(before), "bytes_after": _model.count_bytes(after),
      "part_params_before": pb, "part_params_after": pa, "part_kept": pa / pb, "part_compression": pb / pa,
      "layers": rows,
  }


def _markdown(report: dict) -> str:
  lines = [f"# tnjax compress: {report['method']}", "",
           "| target | part kept | part compression | model params | model bytes | val ppl | time (s) |",
           "|---|---|---|---|---|---|---|"]
  ppl0 = report.get("perplexity_before")
  for r in report["runs"]:
    s = r["summary"]
    ppl = "-" if r.get("perplexity") is None else f"{r['perplexity']:.3f}"
    lines.append(f"| {r['target']} | {s['part_kept']:.3f} | {s['part_compression']:.2f}x | "
                 f"{s['params_before']:,} -> {s['params_after']:,} | {s['bytes_before']:,} -> {s['bytes_after']:,} | "
                 f"{ppl} | {r['compress_s']:.2f} + heal {r['heal_s']:.2f} |")
  if ppl0 is not None:
    lines += ["", f"Validation perplexity before compression: {ppl0:.3f}."]
  lines += ["", "Per-layer parameters kept (first target):", "", "| layer | before | after | kept |",
            "|---|---|---|---|"]
  for row in report["runs"][0]["summary"]["layers"]:
    lines.append(f"| {row['layer']} | {row['params_before']:,} | {row['params_after']:,} | "
                 f"{row['kept']:.3f} |")
  return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict], path, *, baseline: float | None = None, title: str = "", ylim=None,
               ax=None) -> None:
  """Perplexity against the fraction of the compressed part kept, one line per method.

  ``rows``: dicts with "method", "kept" and "perplexity". ``ylim``: (low, high)
  to zoom in (points above are drawn at the top edge, marked ^). ``ax``: draw
  into this matplotlib axis instead of a new figure (``path`` is then ignored).
  """
  # A Figure with its own Agg canvas: no pyplot, so the caller's backend and open figures are untouched.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  own = ax is None
  if own:
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
  for method in dict.fromkeys(r["method"] for r in rows):
    pts = sorted((r["kept"], r["perplexity"]) for r in rows if r["method"] == method)
    if ylim is not None:
      pts = [(k, min(p, ylim[1])) for k, p in pts]
    (line,) = ax.plot(*zip(*pts), "o-", label=method)
    if ylim is not None:
      clipped = [(k, p) for k, p in pts if p >= ylim[1]]
      if clipped:
        ax.plot(*zip(*clipped), "^", color=line.get_color(), markersize=10)
  if baseline is not None:
    ax.axhline(baseline, color="gray", ls="--", label="uncompressed")
  ax.set_xlabel("fraction of the compressed part's parameters kept")
  ax.set_ylabel("validation perplexity")
  if ylim is None:
    ax.set_yscale("log")
  else:
    ax.set_ylim(*ylim)
  ax.set_title(title)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  if own:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format=pathlib.Path(path).suffix[1:] or "png"))


def run(model: Decoder, method: str, out_dir, *, targets: list[dict], valid_ids=None, calib_ids=None, layers=None,
        heal_steps: int = 0, heal_lr: float = 1e-4, int8: bool = False, block_size: int | None = None,
        tokenizer=None, save: bool = True, layout: str | None = None, overwrite: bool = False) -> dict:
  """Compresses ``model`` at each target ({"rank"|"ratio"|"rtol": value}), evaluates, saves and reports.

  Writes ``out_dir/report.json`` and ``report.md``; the compressed model (tnjax
  format, plus ``tokenizer.json`` when a tokenizer is given) goes to
  ``out_dir/model`` for one target, ``out_dir/<key>-<value>/model`` for several,
  and a sweep also writes ``perplexity.png``. Every file is written under a
  temporary name and renamed.

  Raises:
    ValueError: when ``out_dir`` already holds a model or a report (a training
      run, an earlier compression, the input model itself) and ``overwrite``
      is False; for a target missing its value; when a target does not make
      the compressed part smaller (a rank at or above full rank, modegpt on
      TT-matrix layers); and the methods' own errors.
  """
  from tnjax.data import eval_batches
  from tnjax.eval import perplexity
  from tnjax.interop import save_model

  fn = "compress"
  out = pathlib.Path(out_dir)
  for target in targets:
    if len(target) != 1 or None in target.values():
      raise ValueError(f"{fn}: target {target!r} but one of rank, ratio, rtol with a value is expected "
                       "(--rank, --ratio or --rtol)")
  if not overwrite:
    outputs = ["model", "report.json", "report.md", "config.json", "model.safetensors", "perplexity.png"]
    outputs += [f"{k}-{v}" for target in targets for k, v in target.items()]
    found = [name for name in outputs if (out / name).exists()]
    if found:
      raise ValueError(f"{fn}: out_dir {out} already holds {found}; choose a new directory or pass --overwrite "
                       "(overwrite=True) to replace them")
  out.mkdir(parents=True, exist_ok=True)
  block = min(block_size or model.config.block_size, model.config.block_size)
  evaluate = (lambda m: None) if valid_ids is None else (
      lambda m: perplexity(m, valid_ids, block_size=block)["perplexity"])
  calib = None
  if method in ("modegpt", "svdllm"):
    if calib_ids is None:
      raise ValueError(f"compress: method {method!r} needs calibration text (--calib FILE)")
    calib = [x for x, _ in eval_batches(np.asarray(calib_ids), 8, 8, block)]
  if heal_steps and calib_ids is None:
    raise ValueError("compress: healing needs training text (--calib FILE)")
  names = compressed_part(model, method, layers)
  report = {"method": method, "int8": int8, "heal_steps": heal_steps, "perplexity_before": evaluate(model),
            "runs": []}
  for target in targets:
    start = time.perf_counter()
    small = compress(model, method, calib=calib, layers=layers, layout=layout, **target)
    jax.block_until_ready(jax.tree_util.tree_leaves(small))
    compress_s = time.perf_counter() - start
    (key, value), = target.items()
    label = f"{key}={value}"
    info = summary(model, small, names)
    if info["part_params_after"] >= info["part_params_before"]:
      raise ValueError(f"{fn}: {method} at {label} keeps {info['part_params_after']:,} of the compressed part's "
                       f"{info['part_params_before']:,} parameters but fewer are expected (a rank at or above full "
                       "rank, or layers already smaller than the method's output); choose a smaller target")
    start = time.perf_counter()
    if heal_steps:
      small = heal(small, calib_ids, heal_steps, lr=heal_lr, block_size=block)
    if int8:
      small = quantize_int8(small)
    heal_s = time.perf_counter() - start
    run_info = {"target": label, "compress_s": compress_s, "heal_s": heal_s, "perplexity": evaluate(small),
                "summary": summary(model, small, names) if int8 else info}
    if save:
      where = out / "model" if len(targets) == 1 else out / f"{key}-{value}" / "model"
      save_model(small, where)
      if tokenizer is not None:
        atomic_write(where / "tokenizer.json", tokenizer.save)
      run_info["model_dir"] = str(where)
    report["runs"].append(run_info)
  atomic_write_text(out / "report.json", json.dumps(report, indent=2))
  atomic_write_text(out / "report.md", _markdown(report))
  if len(targets) > 1 and valid_ids is not None:
    rows = [{"method": method, "kept": r["summary"]["part_kept"], "perplexity": r["perplexity"]}
            for r in report["runs"]]
    plot_sweep(rows, out / "perplexity.png", baseline=report["perplexity_before"], title=f"tnjax compress: {method}")
  return report


def parse_targets(rank: str | None, ratio: str | None, rtol: str | None) -> list[dict]:
  """``--rank/--ratio/--rtol`` strings (comma-separated for a sweep) as target dicts.

  Example:
    >>> parse_targets(None, "0.5,0.7", None)
    [{'ratio': 0.5}, {'ratio': 0.7}]
  """
  given = {k: v for k, v in (("rank", rank), ("ratio", ratio), ("rtol", rtol)) if v is not None}
  if len(given) > 1:
    raise ValueError(f"compress: {sorted(given)} given but at most one of --rank, --ratio, --rtol is expected")
  if not given:
    raise ValueError("compress: no target given but one of --rank, --ratio, --rtol is expected (without one, "
                     "methods keep full rank and the model grows)")
  (key, text), = given.items()
  cast = int if key == "rank" else float
  try:
    values = [cast(v) for v in text.split(",") if v.strip()]
  except ValueError as e:
    raise ValueError(f"compress: --{key} {text!r} is not a comma-separated list of numbers") from e
  if not values or any(isinstance(v, float) and not math.isfinite(v) for v in values):
    raise ValueError(f"compress: --{key} {text!r} is not a comma-separated list of numbers")
  return [{key: v} for v in values]
