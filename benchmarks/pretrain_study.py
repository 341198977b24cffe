"""Pre-training study driver: a grid of (family, learning rate, seed) runs from one command.

A grid is a TOML file (see ``benchmarks/study/``): ``[base]`` holds the TrainConfig fields of
every run, each ``[families.NAME]`` its changes (``model_overrides`` merged into the base's,
any other field replaced) and ``lrs``, the learning rates to sweep; ``seeds`` lists the seeds.
The protocol:

1. each family runs every learning rate with the first seed;
2. the learning rate with the lowest best validation loss is chosen (on validation, never on
   test) and the other seeds run at it;
3. ``--lr-from DIR`` takes each family's learning rate from an earlier study instead of
   ``lrs`` (with muP, the rate tuned on the small model transfers to the large one).

Finished runs (those with a ``report.json``) are skipped, so a study resumes where it stopped.
Runs go to ``OUT/runs/FAMILY/lr{LR}-s{SEED}/`` (a ``tnjax train`` run directory). The data is
tokenized once (``OUT/tokenizer.json``, ``OUT/cache/``) and hard-linked into each run.
``OUT/results.jsonl`` gets one line per run (parameters, training FLOPs, tokens/s, best
validation perplexity and its step, test perplexity at the best checkpoint and at the last
step), ``OUT/summary.md`` the table per family at its chosen rate (mean and spread over seeds),
and ``OUT/val_vs_params.png`` / ``OUT/val_vs_flops.png`` / ``OUT/val_vs_seconds.png`` the plots
(``--plot DIR ...`` draws several studies in one).

With ``--devices 0,1,2,3`` the runs go to one process per GPU (``CUDA_VISIBLE_DEVICES``);
without it they run one after another in this process.

Run (GPU)::

  python benchmarks/pretrain_study.py --grid benchmarks/study/small.toml --train train.txt \\
      --valid valid.txt --test test.txt --out study/small --devices 0,1,2,3
  python benchmarks/pretrain_study.py --grid benchmarks/study/large.toml ... --out study/large \\
      --lr-from study/small --devices 0,1,2,3
  python benchmarks/pretrain_study.py --plot study/small study/large --out study/plots

``--smoke`` shrinks every model (1 layer, widths / 8, ranks <= 4, a few steps), keeps one family
per layer kind and two learning rates: the whole protocol in about a minute on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import time

SMOKE_BASE = {"steps": 6, "warmup": 2, "eval_every": 3, "eval_batches": 2, "log_every": 3, "checkpoint_every": 6,
              "block_size": 32, "batch_size": 4, "vocab_size": 512, "dtype": "float32", "mup_base_width": 32}


def read_grid(path, smoke: bool = False) -> dict:
  """The grid file as a dict, checked: ``base``, ``families`` (each with ``lrs`` unless transferred), ``seeds``."""
  import tomllib

  grid = tomllib.loads(pathlib.Path(path).read_text())
  unknown = sorted(set(grid) - {"name", "base", "families", "seeds"})
  if unknown or "families" not in grid or not grid["families"]:
    raise ValueError(f"read_grid: {path} has keys {sorted(grid)} but name, base, families (non-empty) and seeds "
                     "are expected")
  grid.setdefault("base", {})
  grid.setdefault("seeds", [0])
  grid.setdefault("name", pathlib.Path(path).stem)
  if smoke:
    grid = _shrink(grid)
  return grid


def _shrink(grid: dict) -> dict:
  """The grid at toy size: one family per layer kind, two learning rates, tiny models."""
  def small_model(mo):
    mo = dict(mo)
    mo["n_layer"] = 1
    if "d_model" in mo:
      mo["d_model"] = max(16, mo["d_model"] // 8)
      mo["n_head"] = mo["d_model"] // 16
    if "d_ff" in mo:
      mo["d_ff"] = max(16, mo["d_ff"] // 8)
    mo.pop("attention_impl", None)
    return mo

  def small_layers(layers):
    return {k: {**v, "rank": min(v["rank"], 4)} if "rank" in v else v for k, v in layers.items()}

  base = {**grid["base"], **SMOKE_BASE}
  base["model_overrides"] = small_model(base.get("model_overrides", {}))
  base["layers"] = small_layers(base.get("layers", {}))
  families, kinds = {}, set()
  for name, fam in grid["families"].items():
    kind = tuple(sorted({v.get("kind", "dense") for v in fam.get("layers", base["layers"]).values()}))
    if kind in kinds:
      continue
    kinds.add(kind)
    fam = dict(fam)
    if "model_overrides" in fam:
      fam["model_overrides"] = small_model(fam["model_overrides"])
    if "layers" in fam:
      fam["layers"] = small_layers(fam["layers"])
    if "lrs" in fam:
      fam["lrs"] = fam["lrs"][:2]
    families[name] = fam
  return {**grid, "base": base, "families": families}


def run_config(grid: dict, family: str, lr: float, seed: int, out: pathlib.Path, files: dict) -> dict:
  """The TrainConfig fields of one run."""
  fam = {k: v for k, v in grid["families"][family].items() if k not in ("lrs", "lr_from")}
  cfg = {**grid["base"], **fam, "lr": lr, "seed": seed, **files}
  cfg["model_overrides"] = {**grid["base"].get("model_overrides", {}), **fam.get("model_overrides", {})}
  cfg["out_dir"] = str(run_dir(out, family, lr, seed))
  cfg["tokenizer"] = str(out / "tokenizer.json")
  return cfg


def run_dir(out: pathlib.Path, family: str, lr: float, seed: int) -> pathlib.Path:
  return out / "runs" / family / f"lr{lr:g}-s{seed}"


def _report(path: pathlib.Path) -> dict | None:
  f = path / "report.json"
  return json.loads(f.read_text()) if f.exists() else None


def chosen_lr(out: pathlib.Path, family: str, lrs: list[float], seed: int) -> float | None:
  """The learning rate of ``lrs`` whose ``seed`` run has the lowest best validation perplexity; None until all ran."""
  reports = {lr: _report(run_dir(out, family, lr, seed)) for lr in lrs}
  if any(r is None for r in reports.values()):
    return None
  return min(lrs, key=lambda lr: reports[lr]["best_val_perplexity"])


def transferred_lrs(src: pathlib.Path, grid: dict) -> dict[str, float]:
  """Each family's chosen learning rate in the study at ``src`` (family ``lr_from`` names another one there)."""
  rows = [json.loads(line) for line in (src / "results.jsonl").read_text().splitlines() if line.strip()]
  out = {}
  for name, fam in grid["families"].items():
    source = fam.get("lr_from", name)
    chosen = {r["lr"] for r in rows if r["family"] == source and r["chosen"]}
    if len(chosen) != 1:
      raise ValueError(f"--lr-from: {src} has no chosen learning rate for family {source!r} (needed by {name!r})")
    out[name] = chosen.pop()
  return out


def plan(grid: dict, out: pathlib.Path, lrs: dict[str, list[float]]) -> tuple[list[tuple], bool]:
  """Runs that can start now (not finished), and whether any run still waits for another's result."""
  seeds = grid["seeds"]
  ready, waiting = [], False
  for family, rates in lrs.items():
    for lr in rates:
      ready.append((family, lr, seeds[0]))
    best = chosen_lr(out, family, rates, seeds[0]) if len(rates) > 1 else rates[0]
    if best is None:
      waiting = waiting or len(seeds) > 1
      continue
    ready.extend((family, best, s) for s in seeds[1:])
  return [r for r in ready if _report(run_dir(out, *r)) is None], waiting


def prepare_data(grid: dict, out: pathlib.Path, files: dict, tokenizer: str | None) -> None:
  """The study's tokenizer and token caches, made once (and kept across resumes)."""
  from tnjax.data import load_tokenizer, token_cache, train_tokenizer

  out.mkdir(parents=True, exist_ok=True)
  tok_path = out / "tokenizer.json"
  if not tok_path.exists():
    tok = load_tokenizer(tokenizer) if tokenizer else train_tokenizer(files["train_files"],
                                                                      grid["base"].get("vocab_size", 8192))
    tok.save(str(tok_path))
  tok = load_tokenizer(tok_path)
  for split in ("train", "valid", "test"):
    if files.get(f"{split}_files"):
      token_cache(files[f"{split}_files"], tok, out / "cache", split)


def start_run(cfg: dict, out: pathlib.Path, device: str | None):
  """Starts one run: in this process (``device`` None; returns None when done) or as a subprocess on GPU ``device``."""
  import shutil

  from tnjax._io import copy_tree_linked

  path = pathlib.Path(cfg["out_dir"])
  if path.exists():  # an interrupted run (no report) starts over: its partial state is not part of the study
    shutil.rmtree(path)
  path.mkdir(parents=True, exist_ok=True)
  if not (path / "cache").exists():
    copy_tree_linked(out / "cache", path / "cache")
  (path / "study_run.json").write_text(json.dumps(cfg, indent=1))
  if device is None:
    _train_one(path)
    return None
  env = {**os.environ, "CUDA_VISIBLE_DEVICES": device}
  log = open(path / "log.txt", "w")
  return subprocess.Popen([sys.executable, __file__, "--run-one", str(path)], env=env, stdout=log,
                          stderr=subprocess.STDOUT)


def _train_one(path: pathlib.Path) -> None:
  import jax

  from tnjax.train import TrainConfig, train

  cfg = TrainConfig.from_dict(json.loads((path / "study_run.json").read_text()))
  with jax.numpy_dtype_promotion("standard"):
    train(cfg, progress=False)


def run_grid(grid: dict, out: pathlib.Path, files: dict, *, devices: list[str] | None, lr_from=None,
             tokenizer: str | None = None) -> list[dict]:
  """Runs (or resumes) the whole protocol; returns the result rows (also in ``out/results.jsonl``)."""
  prepare_data(grid, out, files, tokenizer)
  if lr_from is not None:
    moved = transferred_lrs(pathlib.Path(lr_from), grid)
    lrs = {name: [moved[name]] for name in grid["families"]}
  else:
    missing = [n for n, f in grid["families"].items() if not f.get("lrs")]
    if missing:
      raise ValueError(f"run_grid: families {missing} have no lrs (and no --lr-from)")
    lrs = {name: list(fam["lrs"]) for name, fam in grid["families"].items()}
  running: dict = {}  # device -> (process, run, started)
  try:
    failed = _schedule(grid, out, files, devices, lrs, running)
  finally:  # stopped (Ctrl-C, SIGTERM from a time limit) or failed: no run keeps its GPU
    for proc, _, _ in running.values():
      proc.terminate()
  rows = collect(grid, out, lrs)
  if failed:
    raise RuntimeError(f"run_grid: {len(failed)} runs failed ({sorted(failed)[:4]}); see their log.txt")
  return rows


def _schedule(grid, out, files, devices, lrs, running) -> set:
  """Starts every ready run on a free device (or in this process) until none is left; returns the failed runs."""
  free = list(devices or [])
  failed = set()
  while True:
    todo, _ = plan(grid, out, lrs)
    todo = [r for r in todo if r not in failed and r not in {v[1] for v in running.values()}]
    if not todo and not running:
      return failed
    if todo and (devices is None or free):
      run = todo[0]
      cfg = run_config(grid, *run, out, files)
      print(f"[study] start {run} on {free[0] if devices else 'this process'}", flush=True)
      if devices is None:
        start = time.perf_counter()
        start_run(cfg, out, None)
        print(f"[study] done {run} in {time.perf_counter() - start:.0f} s", flush=True)
      else:
        dev = free.pop(0)
        running[dev] = (start_run(cfg, out, dev), run, time.perf_counter())
      continue
    if not running:
      break
    time.sleep(2)
    for dev, (proc, run, started) in list(running.items()):
      if proc.poll() is not None:
        del running[dev]
        free.append(dev)
        ok = proc.returncode == 0 and _report(run_dir(out, *run)) is not None
        print(f"[study] {'done' if ok else 'FAILED'} {run} in {time.perf_counter() - started:.0f} s", flush=True)
        if not ok:
          failed.add(run)
  return failed


def collect(grid: dict, out: pathlib.Path, lrs: dict[str, list[float]]) -> list[dict]:
  """One row per finished run, written to ``out/results.jsonl``; ``chosen`` marks the family's chosen rate."""
  import jax

  rows = []
  for family, rates in lrs.items():
    best = chosen_lr(out, family, rates, grid["seeds"][0]) if len(rates) > 1 else rates[0]
    for lr in rates:
      for seed in grid["seeds"]:
        rep = _report(run_dir(out, family, lr, seed))
        if rep is None:
          continue
        rows.append({
            "bench": "pretrain_study", "grid": grid["name"], "family": family, "lr": lr, "seed": seed,
            "chosen": lr == best, "params": rep["parameters"], "steps": rep["steps"], "tokens": rep["tokens_seen"],
            "train_flops": rep["train_flops"], "tokens_per_s": rep["tokens_per_s"],
            "best_val_ppl": rep["best_val_perplexity"], "best_val_step": rep.get("best_val_step"),
            "final_val_ppl": rep["final_val_perplexity"], "test_ppl_at_best": rep.get("test_perplexity_at_best"),
            "test_ppl_last": rep.get("test_perplexity"), "device": rep["device_kind"], "jax": jax.__version__,
            "command": " ".join(sys.argv)})
  (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return rows


def summarize(rows: list[dict]) -> list[dict]:
  """Per (grid, family) at the chosen rate: mean and spread over seeds, and the gap to the dense frontier."""
  groups: dict = {}
  for r in rows:
    if r["chosen"]:
      groups.setdefault((r["grid"], r["family"]), []).append(r)
  out = []
  for (grid, family), rs in groups.items():
    val = [math.log(r["best_val_ppl"]) for r in rs]
    test = [math.log(r["test_ppl_at_best"]) for r in rs if r["test_ppl_at_best"]]
    out.append({"grid": grid, "family": family, "lr": rs[0]["lr"], "seeds": len(rs), "params": rs[0]["params"],
                "train_flops": rs[0]["train_flops"], "tokens": rs[0]["tokens"],
                "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in rs),
                # GPU-seconds of training: the tokens at the run's own measured rate (evaluation excluded)
                "train_seconds": statistics.mean(r["tokens"] / r["tokens_per_s"] for r in rs),
                "val_loss": statistics.mean(val), "val_loss_sd": statistics.stdev(val) if len(val) > 1 else None,
                "val_ppl": math.exp(statistics.mean(val)),
                "best_val_step": rs[0]["best_val_step"],
                "test_ppl_at_best": math.exp(statistics.mean(test)) if test else None,
                "test_ppl_last": statistics.mean(r["test_ppl_last"] for r in rs) if rs[0]["test_ppl_last"] else None})
  for s in out:
    dense = sorted((d for d in out if d["grid"] == s["grid"] and d["family"].startswith("dense")),
                   key=lambda d: d["params"])
    for axis in AXES:
      s[f"frontier_gap_{axis}"] = _frontier_gap(dense, s, axis)
  return out


AXES = {"params": "parameters", "train_flops": "training FLOPs",
        "train_seconds": "training GPU-seconds (tokens over the run's tokens/s)"}


def _frontier_gap(dense: list[dict], s: dict, axis: str) -> float | None:
  """Validation loss minus the dense models' loss at the same ``axis`` value (linear in log axis between the dense
  points; None outside their range): below zero is better than dense."""
  pts = sorted((math.log(d[axis]), d["val_loss"]) for d in dense)
  x = math.log(s[axis])
  for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
    if x0 <= x <= x1:
      return s["val_loss"] - (y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0))
  return None


def markdown(summary: list[dict]) -> str:
  """The summary table; gaps are relative validation perplexity vs the widest dense model of the grid."""
  lines = ["| grid | family | params | train PFLOPs | GPU-s | tokens/s | lr | val ppl (+-sd) | vs dense | step | test "
           "ppl best / last | gap to dense frontier at equal GPU-seconds / FLOPs / params |", "|" + "---|" * 12]
  for s in summary:
    ref = max((d for d in summary if d["grid"] == s["grid"] and d["family"].startswith("dense")),
              key=lambda d: d["params"], default=None)
    rel = f"{s['params'] / ref['params']:.0%} / {s['val_ppl'] / ref['val_ppl'] - 1:+.1%}" if ref else ""
    sd = f" +-{s['val_ppl'] * s['val_loss_sd']:.2f}" if s["val_loss_sd"] is not None else ""
    gaps = " / ".join("-" if s[f"frontier_gap_{a}"] is None else f"{s[f'frontier_gap_{a}']:+.3f}"
                      for a in ("train_seconds", "train_flops", "params"))
    test = " / ".join("-" if v is None else f"{v:.2f}" for v in (s["test_ppl_at_best"], s["test_ppl_last"]))
    lines.append(f"| {s['grid']} | {s['family']} | {s['params'] / 1e6:.2f}M | {s['train_flops'] / 1e15:.1f} | "
                 f"{s['train_seconds']:.0f} | {s['tokens_per_s'] / 1e3:.0f}k | {s['lr']:g} | {s['val_ppl']:.2f}{sd} | "
                 f"{rel} | {s['best_val_step']} | {test} | {gaps} |")
  return "\n".join(lines) + "\n"


def plot(summary: list[dict], out: pathlib.Path) -> list[pathlib.Path]:
  """Validation loss vs parameters, training FLOPs and training GPU-seconds: one colour per family (marker by
  layer kind, error bars over seeds), each grid's dense models joined by a line (the dense frontier)."""
  from matplotlib.figure import Figure

  families = list(dict.fromkeys(s["family"] for s in summary))
  colors = {f: f"C{i % 10}" for i, f in enumerate(families)}
  paths = []
  for axis, label in AXES.items():
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    for grid in dict.fromkeys(s["grid"] for s in summary):
      here = [s for s in summary if s["grid"] == grid]
      dense = sorted((s for s in here if s["family"].startswith("dense")), key=lambda s: s[axis])
      ax.plot([s[axis] for s in dense], [s["val_loss"] for s in dense], "k-", lw=1, alpha=0.5)
      if dense:
        ax.annotate(grid, (dense[-1][axis], dense[-1]["val_loss"]), textcoords="offset points", xytext=(4, -12),
                    fontsize=8)
      for s in here:
        marker = {"dense": "o", "ttm": "s", "btt": "^", "lowrank": "D"}.get(s["family"].split("-")[0], "x")
        ax.errorbar(s[axis], s["val_loss"], yerr=s["val_loss_sd"] or 0, fmt=marker, color=colors[s["family"]],
                    capsize=3)
    for f in families:
      marker = {"dense": "o", "ttm": "s", "btt": "^", "lowrank": "D"}.get(f.split("-")[0], "x")
      ax.plot([], [], marker, color=colors[f], label=f)
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("best validation loss (nats/token)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / f"val_vs_{axis.replace('train_', '')}.png"
    fig.savefig(path, dpi=120)
    paths.append(path)
  return paths


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--grid", help="grid TOML (benchmarks/study/*.toml)")
  p.add_argument("--train", nargs="+", help="training text files")
  p.add_argument("--valid", nargs="+", help="validation text files")
  p.add_argument("--test", nargs="*", default=[], help="test text files")
  p.add_argument("--tokenizer", help="a tokenizer file to use instead of training one on --train")
  p.add_argument("--out", help="study directory (runs, results.jsonl, summary.md, plots)")
  p.add_argument("--devices", help="comma-separated GPU ids, one run per GPU at a time")
  p.add_argument("--lr-from", help="take each family's learning rate from this earlier study")
  p.add_argument("--families", help="comma-separated: run only these families of the grid")
  p.add_argument("--smoke", action="store_true", help="toy sizes: the whole protocol on a CPU in about a minute")
  p.add_argument("--plot", nargs="+", metavar="STUDY", help="only summarize and plot these study directories")
  p.add_argument("--run-one", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that run_grid stops its runs
  if args.run_one:
    _train_one(pathlib.Path(args.run_one))
    return 0
  if not args.out:
    p.error("--out is required")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.plot:
    rows = [json.loads(line) for d in args.plot for line in (pathlib.Path(d) / "results.jsonl").read_text().splitlines()
            if line.strip()]
  else:
    if not (args.grid and args.train and args.valid):
      p.error("--grid, --train and --valid are required (or --plot STUDY ...)")
    grid = read_grid(args.grid, smoke=args.smoke)
    if args.families:
      keep = args.families.split(",")
      unknown = sorted(set(keep) - set(grid["families"]))
      if unknown:
        p.error(f"--families: {unknown} are not in the grid (it has {sorted(grid['families'])})")
      grid["families"] = {n: f for n, f in grid["families"].items() if n in keep}
    files = {"train_files": args.train, "valid_files": args.valid, "test_files": args.test or []}
    rows = run_grid(grid, out, files, devices=args.devices.split(",") if args.devices else None,
                    lr_from=args.lr_from, tokenizer=args.tokenizer)
  summary = summarize(rows)
  table = markdown(summary)
  (out / "summary.md").write_text(table)
  (out / "summary.jsonl").write_text("".join(json.dumps(s) + "\n" for s in summary))
  print(table)
  for path in plot(summary, out):
    print(f"plot: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
