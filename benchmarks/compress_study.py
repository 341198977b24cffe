"""The activation-aware compression study (issue 15): every method of the registry, each allocation, on a
trained GPT, training-free and healed, with an int8 pass and the embedding forms.

Protocol: calibration windows are drawn from the training split (three calibration seeds for every method
that reads calibration); allocations and any other choice are made on the validation split, and the table
reports test perplexity (mean and sd over seeds). Healing uses the same training tokens for every method
and for a dense+heal control.

Jobs are independent, so ``--shard K/N`` runs every N-th of them (one process per GPU); ``--summarize``
merges the shards' JSON lines into a Markdown table and a plot.

Run:
  python benchmarks/compress_study.py --smoke
  python benchmarks/compress_study.py --model runs/dense/best_model --train train.txt --valid valid.txt \\
      --test test.txt --out study/compress --shard 0/4        # and 1/4, 2/4, 3/4 on the other GPUs
  python benchmarks/compress_study.py --summarize study/compress
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import numpy as np
from flax import nnx

from tnjax.compress import (
  choose_layers,
  compress,
  heal,
  input_grams,
  layer_sensitivity,
  projection_names,
  quantize_int8,
)
from tnjax.compress.report import plot_sweep, summary
from tnjax.data import eval_batches
from tnjax.eval import perplexity

from _common import emit, environment

RATIOS = (0.5, 0.7, 0.9)
SEEDS = (0, 1, 2)
# (method, allocation, sequential, calibration seeds): the training-free grid. Methods without calibration run
# once; the main variant of each calibrated method runs on every seed, the others on the first.
FREE = [("svd", "uniform", False, 0), ("svd", "loss", False, 0), ("mpo", "uniform", False, 0),
        ("svdllm", "uniform", False, 3), ("svdllm", "loss", False, 1), ("svdllm", "uniform", True, 1),
        ("modegpt", "importance", False, 3), ("modegpt", "uniform", False, 1), ("mpo-data", "uniform", False, 3),
        ("mpo", "sensitivity", False, 0), ("btt", "uniform", False, 0), ("btt-data", "uniform", False, 3)]
# "sensitivity" is CompactifAI's recipe: profile each layer alone at SENSITIVITY_RATIO on PROFILE tokens of the
# training split, then compress the least harmful layers (per parameter saved) at that ratio until the kept
# fraction is met; at 0.5 kept it is every layer, the uniform allocation, so it runs at the larger sizes only.
SENSITIVITY_RATIO = 0.5
# MoDeGPT's MLP refit at the former near-exact solve (refit_ridge 1e-10 of the mean diagonal; the default is now
# 1e-4): it made MoDeGPT worse from 0.7 to 0.9 kept in three trainings (near-duplicate neurons, huge refit weights).
REFIT_RIDGES = (1e-10,)
# healed at the two smaller sizes (calibration seed 0), with a dense+heal control, at each heal learning rate
# (the rate is chosen per method and size on validation). The dense model ends a WSD decay at 1e-5 to 7e-5
# per parameter (muP), so rates near it: 3e-4 made SVD-LLM worse (11.30 -> 11.94) in an earlier run.
HEALED = [("svdllm", "uniform"), ("modegpt", "importance"), ("mpo-data", "uniform")]
HEAL_RATIOS = (0.5, 0.7)
HEAL_LRS = (3e-5, 1e-4)
SEEDS_AT_09 = 1  # the calibration seeds at 0.9 kept, where every calibrated method was within 0.01 of its mean
EMBEDDING = [("mps", False), ("ttm", False), ("lowrank", False), ("lowrank", True)]


def jobs(smoke: bool) -> list[dict]:
  out = []
  seeds = SEEDS[:1] if smoke else SEEDS
  for ratio in RATIOS[:1] if smoke else RATIOS:
    for method, allocation, seq, n_seeds in FREE:
      for seed in seeds[:min(n_seeds, SEEDS_AT_09) if ratio == 0.9 else n_seeds] or (None,):
        if allocation != "sensitivity" or ratio > SENSITIVITY_RATIO:
          out.append({"kind": "free", "method": method, "allocation": allocation, "sequential": seq, "ratio": ratio,
                      "seed": seed})
    for ridge in REFIT_RIDGES:
      out.append({"kind": "free", "method": "modegpt", "allocation": "importance", "sequential": False, "ratio": ratio,
                  "seed": 0, "refit_ridge": ridge})
    for method, allocation in HEALED if ratio in HEAL_RATIOS else ():
      for lr in HEAL_LRS:
        out.append({"kind": "heal", "method": method, "allocation": allocation, "sequential": False, "ratio": ratio,
                    "seed": None if method in ("svd", "mpo") else 0, "lr": lr})
  if smoke:  # the profiled allocation too, at the next size
    out.append({"kind": "free", "method": "mpo", "allocation": "sensitivity", "sequential": False, "ratio": RATIOS[1],
                "seed": None})
  for lr in HEAL_LRS:
    out.append({"kind": "heal", "method": "dense", "allocation": None, "sequential": False, "ratio": 1.0,
                "seed": None, "lr": lr})
  for form, weighted in EMBEDDING:
    for head in ("tied", "dense"):
      out.append({"kind": "embedding", "method": "tensorgpt", "form": form, "weighted": weighted, "head": head,
                  "ratio": 0.25, "seed": 0 if weighted else None})
  main = {("svd", "uniform"), ("mpo", "uniform"), ("svdllm", "uniform"), ("modegpt", "importance"),
          ("mpo-data", "uniform")}

  def priority(job):  # what a time-limited run finishes first: every method once, then healing, then the rest
    if job["kind"] == "free":
      first = job["seed"] in (None, 0) and not job["sequential"] and "refit_ridge" not in job
      return 0 if first and (job["method"], job["allocation"]) in main else 3
    return {"heal": 1 if job["ratio"] in (0.5, 1.0) else 4, "embedding": 2}[job["kind"]]

  return sorted(out, key=priority)


def select(grid: list[dict], only: list[str]) -> list[dict]:
  """The jobs matching every ``KEY=V`` of at least one ``"KEY=V;KEY=V"`` group (all of them when none); V is
  compared with the field as ``str`` prints it (None, True, 0.5), a missing field as None."""
  groups = []
  for group in only:
    terms = [term.split("=", 1) for term in group.split(";")]
    if any(len(t) != 2 or t[0] not in JOB_KEYS for t in terms):
      raise SystemExit(f"--only {group!r}: expected KEY=V terms joined by ';' with KEY one of {JOB_KEYS}")
    groups.append(dict(terms))
  return [j for j in grid if not groups or any(all(str(j.get(k)) == v for k, v in g.items()) for g in groups)]


def _windows(ids: np.ndarray, n: int, block: int, seed: int) -> np.ndarray:
  starts = np.random.default_rng(seed).integers(0, len(ids) - block, n)
  return np.stack([ids[s:s + block] for s in starts]).astype(np.int32)


class Context:
  """The model, the splits and per-seed calibration, loaded once per process."""

  def __init__(self, args):
    if args.smoke:
      from tnjax.models import GPT, preset

      rng = np.random.default_rng(0)  # a sparse Markov chain: each token has 4 likely successors
      succ, tokens = rng.integers(0, 256, (256, 4)), np.zeros(60_000, np.int32)
      for i in range(1, len(tokens)):
        tokens[i] = rng.integers(0, 256) if rng.random() < 0.1 else succ[tokens[i - 1], rng.integers(0, 4)]
      cfg = preset("tiny", vocab_size=256, block_size=64, d_model=64, n_head=4)
      self.model = heal(GPT(cfg, rngs=nnx.Rngs(0)), tokens[:40_000], 40, lr=3e-3, batch_size=16)
      self.train, self.valid, self.test = tokens[:40_000], tokens[40_000:50_000], tokens[50_000:]
    else:
      from tnjax.data import load_tokenizer, token_cache
      from tnjax.interop import load_model

      self.model = load_model(args.model)
      tok = load_tokenizer(args.tokenizer or args.model)
      # token caches: a training run's (its out_dir/cache, same tokenizer and files) is reused, not re-encoded
      cache = pathlib.Path(args.cache or pathlib.Path(args.out) / "cache")
      self.train, self.valid, self.test = (np.asarray(token_cache([path], tok, cache, split), np.int32)
                                           for path, split in ((args.train, "train"), (args.valid, "valid"),
                                                               (args.test, "test")))
      self.train = self.train[:args.train_tokens]
    self.block = self.model.config.block_size
    # evaluation: eval_tokens in windows spread evenly over each split (as training's validation), one window each
    n = max(args.eval_tokens // self.block, 1)
    self.valid, self.test = (np.concatenate([x[0] for x, _ in eval_batches(ids, n, 1, self.block)])
                             for ids in (self.valid, self.test))
    self.profile = self.train[:args.profile_tokens]  # sensitivity profiling reads training text, not validation
    self.args = args
    self._calib: dict[int, tuple] = {}
    self._sensitivity: dict[str, dict] = {}

  def calibration(self, seed: int):
    """(ids, Calibration) of ``calib_windows`` training windows drawn with ``seed``."""
    if seed not in self._calib:
      ids = _windows(self.train, self.args.calib_windows, self.block, 1000 + seed)
      batches = [ids[i:i + 16] for i in range(0, len(ids), 16)]
      self._calib[seed] = (batches, input_grams(self.model, batches))
    return self._calib[seed]

  def sensitivity(self, method: str) -> dict:
    """`layer_sensitivity` of ``method`` at SENSITIVITY_RATIO on the profiling tokens, once per method."""
    if method not in self._sensitivity:
      def one(model, layers):
        return compress(model, method, ratio=SENSITIVITY_RATIO, layers=layers)

      self._sensitivity[method] = layer_sensitivity(self.model, self.profile, one, block_size=self.block)
    return self._sensitivity[method]

  def ppl(self, model, split) -> float:
    return perplexity(model, self.valid if split == "valid" else self.test, block_size=self.block)["perplexity"]


def _compress(ctx: Context, job: dict):
  if job["method"] == "dense":
    return ctx.model
  calib = None
  if job["seed"] is not None:
    ids, cal = ctx.calibration(job["seed"])
    calib = ids if (job.get("sequential") or job["method"] == "modegpt") else cal
  if job["kind"] == "embedding":
    return compress(ctx.model, "tensorgpt", ratio=job["ratio"], form=job["form"], head=job["head"],
                    calib=calib if job["weighted"] else None)
  if job["allocation"] == "sensitivity":
    part = sum(ctx.model.layer(n).kernel.size for n in projection_names(ctx.model.config))
    chosen = choose_layers(ctx.sensitivity(job["method"]), (1 - job["ratio"]) * part)
    return compress(ctx.model, job["method"], ratio=SENSITIVITY_RATIO, layers=chosen)
  options = {"refit_ridge": job["refit_ridge"]} if "refit_ridge" in job else {}
  return compress(ctx.model, job["method"], ratio=job["ratio"], allocation=job["allocation"],
                  sequential=job["sequential"], calib=calib, **options)


def run_job(ctx: Context, job: dict, env: dict) -> list[dict]:
  start = time.perf_counter()
  small = _compress(ctx, job)
  jax.block_until_ready(jax.tree_util.tree_leaves(nnx.state(small)))
  secs = time.perf_counter() - start
  part = ["embedding"] if job["kind"] == "embedding" else projection_names(ctx.model.config)
  variants = [("", small, 0.0)]
  if job["kind"] == "heal":
    start = time.perf_counter()
    try:
      healed = heal(small, ctx.train, ctx.args.heal_steps, lr=job["lr"], batch_size=ctx.args.heal_batch,
                    block_size=ctx.block)
    except ValueError as e:  # a rate that diverges is a result of the sweep, not the end of the shard
      return [{"bench": "compress_study", **job, "variant": "+heal", "label": f"{job['method']}+heal",
               "valid_ppl": float("nan"), "test_ppl": float("nan"), "compress_s": secs,
               "heal_s": time.perf_counter() - start, "error": str(e), **env}]
    heal_s = time.perf_counter() - start
    variants = [("+heal", healed, heal_s), ("+heal+int8", quantize_int8(healed), heal_s)]
  rows = []
  for suffix, m, heal_s in variants:
    s = summary(ctx.model, m, part)
    rows.append({"bench": "compress_study", **job, "variant": suffix or "free",
                 "label": f"{job['method']}{suffix}", "kept": s["part_kept"], "params": s["params_after"],
                 "bytes": s["bytes_after"], "valid_ppl": ctx.ppl(m, "valid"), "test_ppl": ctx.ppl(m, "test"),
                 "compress_s": secs, "heal_s": heal_s,
                 "heal_tokens": ctx.args.heal_steps * ctx.args.heal_batch * ctx.block if suffix else 0, **env})
  return rows


def _mean_sd(xs):
  return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(out: pathlib.Path) -> str:
  """Merges ``out/*.jsonl`` into ``out/summary.md``, ``out/summary.jsonl`` and ``out/test_ppl_vs_kept.png``."""
  rows = [json.loads(line) for f in sorted(out.glob("shard*.jsonl")) for line in f.read_text().splitlines() if line]
  groups: dict[tuple, list] = {}
  for r in rows:
    key = (r["kind"], r["label"], r.get("allocation"), r.get("sequential"), r.get("form"), r.get("weighted"),
           r.get("head"), r["ratio"], r["variant"], r.get("lr"), r.get("refit_ridge"))
    groups.setdefault(key, []).append(r)
  summ = []
  for key, rs in groups.items():
    kind, label, alloc, seq, form, weighted, head, ratio, variant, lr, ridge = key
    v, vsd = _mean_sd([r["valid_ppl"] for r in rs])
    t, tsd = _mean_sd([r["test_ppl"] for r in rs])
    name = label + ("-seq" if seq else "") + (f" (refit ridge {ridge:g})" if ridge else "")
    if kind == "embedding":
      name = f"tensorgpt-{form}{'-freq' if weighted else ''}-{head}-head"
    summ.append({"kind": kind, "name": name, "allocation": alloc, "ratio": ratio, "variant": variant,
                 "kept": statistics.fmean(r.get("kept", float("nan")) for r in rs), "valid_ppl": v,
                 "valid_sd": vsd, "test_ppl": t,
                 "test_sd": tsd, "seeds": len(rs), "compress_s": statistics.fmean(r["compress_s"] for r in rs),
                 "lr": lr})
  dense = sorted((s for s in summ if s["name"] == "dense+heal"), key=lambda s: s["lr"] or 0)
  ref = rows[0].get("dense_test_ppl") if rows else None
  lines = [f"# Compression study ({rows[0]['device'] if rows else '?'}, jax {rows[0]['jax'] if rows else '?'})", ""]
  if ref:
    lines += [f"Dense model: validation perplexity {rows[0]['dense_valid_ppl']:.3f}, test {ref:.3f}.", ""]
  lines += ["## Training-free, every allocation (test ppl, mean +- sd over calibration seeds; * = the allocation "
            "chosen on validation)", "", "| method | allocation | " + " | ".join(f"kept {r}" for r in RATIOS) + " |",
            "|---|---|" + "---|" * len(RATIOS)]
  free = [s for s in summ if s["kind"] == "free"]
  chosen = {}
  for name in dict.fromkeys(s["name"] for s in free):
    for ratio in RATIOS:
      cands = [s for s in free if s["name"] == name and s["ratio"] == ratio]
      if cands:
        chosen[(name, ratio)] = min(cands, key=lambda s: s["valid_ppl"])["allocation"]
  for name, alloc in dict.fromkeys((s["name"], s["allocation"]) for s in free):
    cells = []
    for ratio in RATIOS:
      s = next((s for s in free if s["name"] == name and s["allocation"] == alloc and s["ratio"] == ratio), None)
      if s is None:
        cells.append("-")
        continue
      mark = "*" if chosen.get((name, ratio)) == alloc else ""
      rel = f" ({s['test_ppl'] / ref:.2f}x)" if ref else ""
      sd = f" +- {s['test_sd']:.2f}" if s["seeds"] > 1 else ""
      cells.append(f"{s['test_ppl']:.2f}{sd}{rel}{mark}")
    lines.append(f"| {name} | {alloc} | " + " | ".join(cells) + " |")
  lines += ["", "## Healed (equal heal tokens) and int8 on top (test ppl; heal rate chosen on validation)", "",
            "| method | allocation | " + " | ".join(f"kept {r}" for r in RATIOS) + " |",
            "|---|---|" + "---|" * len(RATIOS)]
  healed = [s for s in summ if s["kind"] == "heal" and not s["name"].startswith("dense")]
  best_lr = {}  # (name, ratio) -> the heal rate with the lowest validation perplexity after healing
  for s in healed:
    k = (s["name"].split("+")[0], s["ratio"])
    if s["variant"] == "+heal" and s["valid_ppl"] == s["valid_ppl"] and (k not in best_lr or s["valid_ppl"] <
                                                                          best_lr[k][1]):  # nan: diverged
      best_lr[k] = (s["lr"], s["valid_ppl"])
  for variant in ("+heal", "+heal+int8"):
    rows_v = [s for s in healed if s["variant"] == variant]
    for name, alloc in dict.fromkeys((s["name"], s["allocation"]) for s in rows_v):
      cells = []
      for ratio in RATIOS:
        lr = best_lr.get((name.split("+")[0], ratio), (None,))[0]
        s = next((s for s in rows_v if s["name"] == name and s["ratio"] == ratio and s["lr"] == lr), None)
        cells.append("-" if s is None else f"{s['test_ppl']:.2f}" + (f" ({s['test_ppl'] / ref:.2f}x)" if ref else "")
                     + f" lr {lr:g}")
      lines.append(f"| {name} | {alloc} | " + " | ".join(cells) + " |")
  diverged = sorted({f"{s['name']} at kept {s['ratio']}, lr {s['lr']:g}" for s in summ if s["kind"] == "heal"
                     and s["valid_ppl"] != s["valid_ppl"]})
  if diverged:
    lines += ["", "Diverged (loss not finite after healing): " + "; ".join(diverged) + "."]
  for s in dense:
    if s["valid_ppl"] != s["valid_ppl"]:
      continue
    lines += ["", f"Dense + heal control (same tokens, lr {s['lr']:g}): validation {s['valid_ppl']:.3f}, "
              f"test {s['test_ppl']:.3f}."]
  lines += ["", "## Embedding at a quarter of its parameters (test ppl)", "", "| form | test ppl | kept |",
            "|---|---|---|"]
  for s in sorted((s for s in summ if s["kind"] == "embedding"), key=lambda s: s["test_ppl"]):
    rel = f" ({s['test_ppl'] / ref:.2f}x)" if ref else ""
    lines.append(f"| {s['name']} | {s['test_ppl']:.2f}{rel} | {s['kept']:.3f} |")
  text = "\n".join(lines) + "\n"
  (out / "summary.md").write_text(text)
  (out / "summary.jsonl").write_text("".join(json.dumps(s) + "\n" for s in summ))
  pts = [{"method": f"{s['name']} ({s['allocation']})", "kept": s["kept"], "perplexity": s["test_ppl"]}
         for s in free if chosen.get((s["name"], s["ratio"])) == s["allocation"]]
  if pts:
    plot_sweep(pts, out / "test_ppl_vs_kept.png", baseline=ref, title="training-free, allocation chosen on validation",
               ylabel="test perplexity")
  return text


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true", help="a tiny trained model, one seed, for CI")
  parser.add_argument("--model", help="trained tnjax model directory")
  parser.add_argument("--tokenizer", help="tokenizer.json (default: the model directory)")
  parser.add_argument("--train"), parser.add_argument("--valid"), parser.add_argument("--test")
  parser.add_argument("--out", default="study/compress")
  parser.add_argument("--shard", default="0/1", help="K/N: run every N-th job starting at K")
  parser.add_argument("--summarize", metavar="DIR", help="merge DIR/shard*.jsonl into a table and a plot")
  parser.add_argument("--calib-windows", type=int, default=256, help="calibration windows of block_size tokens")
  parser.add_argument("--eval-tokens", type=int, default=131_072,
                      help="validation and test tokens scored, in windows spread evenly over each split")
  parser.add_argument("--cache", help="token cache directory (default OUT/cache; a training run's out_dir/cache "
                      "with the same tokenizer and files is reused)")
  parser.add_argument("--train-tokens", type=int, default=8_000_000, help="training tokens read (calibration, heal)")
  parser.add_argument("--profile-tokens", type=int, default=32_768,
                      help="training tokens of the sensitivity profile (the first of the split)")
  parser.add_argument("--only", action="append", default=[], metavar="KEY=V;KEY=V",
                      help="run only the jobs whose fields match every KEY=V of one of these groups (V as printed: "
                      "None, True, 0.5); repeat for more groups")
  parser.add_argument("--heal-steps", type=int, default=200)
  parser.add_argument("--heal-batch", type=int, default=32)
  args = parser.parse_args()
  if args.summarize:
    print(summarize(pathlib.Path(args.summarize)))
    return
  if args.smoke:
    args.calib_windows, args.heal_steps, args.heal_batch, args.eval_tokens, args.profile_tokens = 16, 2, 4, 4096, 2048
  k, n = (int(x) for x in args.shard.split("/"))
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  ctx = Context(args)
  env = {**environment(), "dense_valid_ppl": ctx.ppl(ctx.model, "valid"), "dense_test_ppl": ctx.ppl(ctx.model, "test"),
         "calib_tokens": args.calib_windows * ctx.block}
  timing = out / "eval_timing.json"
  if k == 0 and not timing.exists():  # what batching the evaluation windows saves (tnjax.eval.perplexity)
    secs = {}
    for batch in (1, None, 1, None):  # the first of each compiles
      start = time.perf_counter()
      perplexity(ctx.model, ctx.valid, block_size=ctx.block, batch_size=batch)
      secs[str(batch)] = time.perf_counter() - start
    timing.write_text(json.dumps({"windows": len(ctx.valid) // ctx.block, "batch_1_s": secs["1"],
                                  "batch_default_s": secs["None"], **env}) + "\n")
    print(f"evaluation of {len(ctx.valid) // ctx.block} windows: one per call {secs['1']:.2f} s, "
          f"batched {secs['None']:.2f} s", flush=True)
  path = out / f"shard{k}.jsonl"
  key = lambda d: json.dumps({x: d.get(x) for x in JOB_KEYS})  # noqa: E731
  done = {key(json.loads(line)) for line in path.read_text().splitlines() if line} if path.exists() else set()
  todo = [j for i, j in enumerate(select(jobs(args.smoke), args.only)) if i % n == k]
  for i, job in enumerate(todo):
    if key(job) in done:  # resume: a finished job is skipped
      continue
    start = time.perf_counter()
    for row in run_job(ctx, job, env):
      emit(row, str(path))
    print(f"[{k}/{n}] {i + 1}/{len(todo)} {job} {time.perf_counter() - start:.1f} s", flush=True)
  if n == 1:
    print(summarize(out))


JOB_KEYS = ("kind", "method", "allocation", "sequential", "ratio", "seed", "form", "weighted", "head", "lr",
            "refit_ridge")

if __name__ == "__main__":
  main()
