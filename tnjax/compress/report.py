"""What ``tnjax compress`` runs: one method at one or several targets, with a report (JSON + Markdown) and a plot."""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import shutil
import time

import jax
import numpy as np

from tnjax._io import INDEX_FILE, SINGLE_FILE, atomic_write, atomic_write_text, dir_lock
from tnjax.compress import _model
from tnjax.compress.methods import quantize_int8
from tnjax.compress.registry import compress, method
from tnjax.compress.targets import TARGETS, Target
from tnjax.compress.tuning import check_healable, heal
from tnjax.models.decoder import Decoder


def compressed_part(model: Decoder, name: str, layers=None) -> list[str]:
  """Names of the layers a method targets: "embedding" for the embedding methods, else the projections."""
  if method(name).part == "embedding":
    return ["embedding"]
  return _model.resolve_layers("compress", model.config, None if name == "modegpt" else layers)


def summary(before: Decoder, after: Decoder, names: list[str]) -> dict:
  """Parameter and byte accounting: whole model and per compressed layer (biases included).

  Examples:
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
               ax=None, ylabel: str = "validation perplexity") -> None:
  """Perplexity against the fraction of the compressed part kept, one line per method.

  ``rows``: dicts with "method", "kept" and "perplexity". ``ylim``: (low, high)
  to zoom in (points above are drawn at the top edge, marked ^). ``ax``: draw
  into this matplotlib axis instead of a new figure (``path`` is then ignored).
  ``ylabel``: which split's perplexity the rows hold.
  """
  # A Figure with its own Agg canvas: no pyplot, so the caller's backend and open figures are untouched.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  own = ax is None
  if own:
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
  for name in dict.fromkeys(r["method"] for r in rows):
    pts = sorted((r["kept"], r["perplexity"]) for r in rows if r["method"] == name)
    if ylim is not None:
      pts = [(k, min(p, ylim[1])) for k, p in pts]
    (line,) = ax.plot(*zip(*pts), "o-", label=name)
    if ylim is not None:
      clipped = [(k, p) for k, p in pts if p >= ylim[1]]
      if clipped:
        ax.plot(*zip(*clipped), "^", color=line.get_color(), markersize=10)
  if baseline is not None:
    ax.axhline(baseline, color="gray", ls="--", label="uncompressed")
  ax.set_xlabel("fraction of the compressed part's parameters kept")
  ax.set_ylabel(ylabel)
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


CALIB_TOKENS_PER_CALL = 8192  # calibration tokens per device call (rows of windows): sets its activation memory


def run(model: Decoder, method_name: str, out_dir, *, targets: list[dict], valid_ids=None, calib_ids=None,
        layers=None, heal_steps: int = 0, heal_lr: float = 1e-4, int8: bool = False, block_size: int | None = None,
        tokenizer=None, save: bool = True, overwrite: bool = False, allocation: str = "uniform",
        sequential: bool = False, if_larger: str = "error", calib_windows: int = 64,
        max_shard_size: int | str = "5GB", **options) -> dict:
  """Compresses ``model`` at each target ({"rank"|"ratio"|"rtol": value}), evaluates, saves and reports.

  Writes ``out_dir/report.json`` and ``report.md``; the compressed model (tnjax
  format, plus ``tokenizer.json`` when a tokenizer is given) goes to
  ``out_dir/model`` for one target, ``out_dir/<key>-<value>/model`` for several,
  and a sweep also writes ``perplexity.png``. Every file is written under a
  temporary name and renamed; a model above ``max_shard_size`` in shards (`tnjax.interop.save_model`).
  ``allocation``, ``sequential``, ``if_larger`` and ``options`` (``layout``, ``form``) go to `compress`;
  calibration statistics are computed once and reused across the targets of a sweep (except sequential); a single target
  passes the ids to the method, whose data-aware fits stream block by block.

  Windows: ``block_size`` (at most the model's context) sets the evaluation, calibration and healing
  windows; by default each is the smallest of the model's context, `tnjax.eval.DEFAULT_WINDOW` and its
  text. Calibration reads at most ``calib_windows`` evenly spaced windows of ``calib_ids``: no more than the
  text holds without overlap (rounded up to whole device calls of ``CALIB_TOKENS_PER_CALL`` tokens).

  A sweep fails whole or not at all. Every target is checked before any work (its key and value for the
  method, a ratio of 1, a target given twice, a ratio more than ``RATIO_SLACK`` below the least fraction the
  method keeps, computed from the layers' shapes), and so are the windows, the calibration text and ``layers``.
  A failure after that (a target the method refuses only when it gets to it, an error, Ctrl-C) removes what
  this run wrote to ``out_dir``: the models, reports and plot it created, and ``out_dir`` itself when the run
  created it. So ``out_dir`` is left as it was and the same call can be retried. What was there before is
  never removed; with ``overwrite``, what the run had already replaced stays replaced.

  One run at a time: ``out_dir/.tnjax.lock`` (`tnjax._io.dir_lock`) is held from the check of what
  ``out_dir`` holds to the last write, and a second run into the same ``out_dir`` is refused meanwhile.

  Raises:
    ValueError: a ``block_size`` above the model's context or a text shorter than its window; when
      ``out_dir`` already holds a model or a report (a training
      run, an earlier compression, the input model itself) and ``overwrite``
      is False; when another run is writing into ``out_dir``; for a target missing its value, out of
      range, given twice, or a ratio of 1 (it keeps the whole part; allowed with ``if_larger="allow"``);
      when a target does not make the compressed part smaller (a rank at or above full
      rank, modegpt on TT-matrix layers); for a ratio the method cannot meet (below the fraction it keeps
      with every layer at its smallest, computed from the shapes; the message names that fraction), before any
      work when the least is more than ``1 + RATIO_SLACK`` times the ratio, else when the result keeps more
      than that; and the methods' own errors.
  """
  from tnjax._io import shard_bytes
  from tnjax.core import _checks
  from tnjax.data import eval_batches
  from tnjax.eval import perplexity, window_size
  from tnjax.interop import save_model

  fn = "compress"
  out = pathlib.Path(out_dir)
  m = method(method_name)
  _check_targets(fn, m, targets, if_larger)
  context = model.config.block_size
  if block_size is not None:
    window_size(fn, context, block_size, block_size)  # refuses a window longer than the model's context
  calib_windows = _checks.check_positive_int(fn, "calib_windows", calib_windows)
  shard_bytes(fn, max_shard_size)  # refused before any work, not after the fits
  if calib_ids is not None and (m.calibration != "none" or allocation == "importance" or heal_steps):
    # train_batch and eval_batches read one target past each window and need a spare start: 2 tokens more
    calib_block = window_size(fn, context, len(calib_ids), block_size, reads_past=2, text="calib_ids (--calib)")
  calibrate = m.calibration == "required" or allocation == "importance"
  if calibrate and calib_ids is None:
    why = f"method {m.name!r}" if m.calibration == "required" else f"allocation {allocation!r}"
    raise ValueError(f"compress: {why} needs calibration text (--calib FILE)")
  if heal_steps and calib_ids is None:
    raise ValueError("compress: healing needs training text (--calib FILE)")
  if heal_steps:
    check_healable(fn, model)  # before any work: a bf16-stored model cannot heal
  names = compressed_part(model, m.name, layers)
  # the least fraction the method keeps (every layer at its smallest), from the shapes: a ratio it is sure to miss
  # by more than RATIO_SLACK is refused before any work
  ratios = [target["ratio"] for target in targets if "ratio" in target]
  least = m.least(model, names, allocation=allocation, **options) / _part_weights(model, names) if ratios else None
  for value in ratios:
    if (1 + RATIO_SLACK) * value < least:
      _check_least(fn, m.name, value, least)
  evaluate = (lambda m: None) if valid_ids is None else (
      lambda m: perplexity(m, valid_ids, block_size=block_size)["perplexity"])
  with _claim(fn, out, targets, overwrite):
    calib = None
    if calibrate:
      # no more windows than the text holds without overlap: repeating tokens costs time and adds nothing
      windows = min(calib_windows, -(-(len(calib_ids) - 1) // calib_block))
      calls = -(-windows // max(1, min(8, CALIB_TOKENS_PER_CALL // calib_block)))  # 8 windows of <= 1024 tokens
      batches = eval_batches(np.asarray(calib_ids), calls, -(-windows // calls), calib_block)  # rows round up
      calib = [x for x, _ in batches]
      if not sequential and m.name != "modegpt" and len(targets) > 1:  # one pass, reused by every target
        from tnjax.compress.calibration import calibration_pass, input_grams

        calib = (input_grams(model, calib) if m.calibration == "required"  # data fits: every block's Grams
                 else calibration_pass(fn, model, calib, keep_grams=False))  # importance only
      # one target: the ids go to the method, whose data-aware fits then stream block by block (one block's
      # Grams in memory, not the model's: 65 GB of float64 at a Llama-3.1-8B shape)
    report = {"method": m.name, "allocation": allocation, "sequential": sequential, "int8": int8,
              "heal_steps": heal_steps, "calib_tokens": None if calib is None else sum(int(x.size) for x, _ in batches),
              "perplexity_before": evaluate(model),
              "runs": []}

    def compressed(**target):
      return compress(model, m.name, calib=calib, layers=layers, allocation=allocation, sequential=sequential,
                      if_larger=if_larger, **options, **target)

    for target in targets:
      start = time.perf_counter()
      small = compressed(**target)
      jax.block_until_ready(jax.tree_util.tree_leaves(small))
      compress_s = time.perf_counter() - start
      (key, value), = target.items()
      label = f"{key}={value}"
      info = summary(model, small, names)
      if info["part_params_after"] >= info["part_params_before"] and if_larger != "allow":
        raise ValueError(f"{fn}: {m.name} at {label} keeps {info['part_params_after']:,} of the compressed part's "
                         f"{info['part_params_before']:,} parameters but fewer are expected (a rank at or above full "
                         "rank, or layers already smaller than the method's output); choose a smaller target")
      if key == "ratio" and _weights_kept(model, small, names) > (1 + RATIO_SLACK) * value:
        _check_least(fn, m.name, value, least)
      start = time.perf_counter()
      if heal_steps:
        small = heal(small, calib_ids, heal_steps, lr=heal_lr, block_size=calib_block)
      if int8:
        small = quantize_int8(small)
      heal_s = time.perf_counter() - start
      run_info = {"target": label, "compress_s": compress_s, "heal_s": heal_s, "perplexity": evaluate(small),
                  "summary": summary(model, small, names) if int8 else info}
      if save:
        where = out / "model" if len(targets) == 1 else out / f"{key}-{value}" / "model"
        save_model(small, where, tokenizer=tokenizer, max_shard_size=max_shard_size)
        run_info["model_dir"] = str(where)
      report["runs"].append(run_info)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", _markdown(report))
    if len(targets) > 1 and valid_ids is not None:
      rows = [{"method": m.name, "kept": r["summary"]["part_kept"], "perplexity": r["perplexity"]}
              for r in report["runs"]]
      plot_sweep(rows, out / "perplexity.png", baseline=report["perplexity_before"],
                 title=f"tnjax compress: {m.name}")
  return report


RATIO_SLACK = 0.05  # a ratio missed by more than this (relative) is checked against the smallest one the method meets


def _check_least(fn: str, method_name: str, ratio: float, least: float) -> None:
  """Refuses a ratio below ``least``, the fraction of the part's weights the method keeps at its smallest."""
  if ratio < least:
    shown = _round_up(least)
    raise ValueError(f"{fn}: {method_name} cannot meet ratio={ratio}: it keeps at least {shown} of the compressed "
                     f"part's weights (every layer at its smallest); choose ratio >= {shown}")


def _part_weights(model: Decoder, names: list[str]) -> int:
  """The weights of the layers ``names`` (biases excluded, as a ratio counts them)."""
  return sum(_model.weights(_model.get_layer(model, name)) for name in names)


def _weights_kept(before: Decoder, after: Decoder, names: list[str]) -> float:
  """The fraction of the layers' weights that ``after`` keeps."""
  return _part_weights(after, names) / _part_weights(before, names)


def _round_up(x: float, digits: int = 3) -> float:
  """``x`` rounded up to ``digits`` significant digits, so that the number printed is not below it.

  Examples:
    >>> _round_up(0.041666)
    0.0417
  """
  scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
  return math.ceil(x * scale) / scale


def _check_targets(fn: str, m, targets: list[dict], if_larger: str) -> None:
  """Refuses, before any work, a target of the sweep that cannot run: not one of rank, ratio, rtol with a value, a
  value `Target.of` refuses for the method ``m`` (a registry `Method`), a ratio of 1 (the whole part kept: nothing
  smaller, unless ``if_larger="allow"``), or a target given twice (both would write one directory)."""
  for target in targets:
    if len(target) != 1 or None in target.values() or not set(target) <= set(TARGETS):
      raise ValueError(f"{fn}: target {target!r} but one of rank, ratio, rtol with a value is expected "
                       "(--rank, --ratio or --rtol)")
    checked = Target.of(fn, **target, accepted=m.targets)
    if checked.key == "ratio" and checked.value == 1 and if_larger != "allow":
      raise ValueError(f"{fn}: ratio=1.0 keeps the whole compressed part, so {m.name} would make nothing "
                       "smaller; a ratio < 1 is expected (or if_larger='allow', --if-larger allow, to convert at "
                       "full size)")
  labels = [f"{k}={v}" for target in targets for k, v in target.items()]
  twice = sorted({label for label in labels if labels.count(label) > 1})
  if twice:
    raise ValueError(f"{fn}: targets {twice} are given twice but each target of a sweep is expected once (each "
                     "writes its own directory)")


@contextlib.contextmanager
def _claim(fn: str, out: pathlib.Path, targets: list[dict], overwrite: bool):
  """Holds ``out``'s lock for the block and refuses ``out`` when it holds a model or a report (unless
  ``overwrite``); when the block fails, removes what it wrote: the outputs that were not there before, and the
  directories created for ``out``."""
  written = ["model", "report.json", "report.md", "perplexity.png"]
  written += [f"{k}-{v}" for target in targets for k, v in target.items()]
  created = [d for d in (out, *out.parents) if not d.exists()]  # deepest first
  out.mkdir(parents=True, exist_ok=True)
  try:
    with dir_lock(fn, out):
      if not overwrite:
        found = [name for name in written + ["config.json", SINGLE_FILE, INDEX_FILE] if (out / name).exists()]
        if found:
          raise ValueError(f"{fn}: out_dir {out} already holds {found}; choose a new directory or pass --overwrite "
                           "(overwrite=True) to replace them")
      new = [out / name for name in written if not (out / name).exists()]
      try:
        yield
      except BaseException:
        for path in new:
          if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
          else:
            path.unlink(missing_ok=True)
        raise
  except BaseException:
    for d in created:
      try:
        d.rmdir()  # only when empty: never what another process put there meanwhile
      except OSError:
        break
    raise


def parse_targets(rank: str | None, ratio: str | None, rtol: str | None) -> list[dict]:
  """``--rank/--ratio/--rtol`` strings (comma-separated for a sweep) as target dicts.

  Examples:
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
