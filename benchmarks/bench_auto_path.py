"""Does ``path="auto"`` pick the fastest path? Every path of ``tnjax.matvec`` and ``auto`` at the shapes a
TT-matrix GPT-2 124M trains and decodes with, and auto's time over the best path's (target: within 5%).

Shapes: the four projections of a GPT-2 124M block (attn.c_attn 768 x 2304, attn.c_proj 768 x 768,
mlp.c_fc 768 x 3072, mlp.c_proj 3072 x 768), in the layout a ``{"kind": "ttm"}`` config gets by default
(three cores, ``tnjax.factorize``) and in the fused kernels' two-core layout (``fused_dims``), at ranks 4, 8,
16 and 64, bf16. Training: 16,384 tokens, forward+backward (``jax.vjp``, gradients for the cores and x).
Decoding: 1, 4, 16 and 64 tokens, forward only. Paths: "dense" (rebuild W), "direct", "split", "einsum"
and, where the kernels run (a GPU, a layout and rank they take), "fused" and "fused_fwd"; a dense
``x @ W`` is timed as the reference. "auto" runs the cost model's per-direction plan (printed).

Each time is the median over repeats of 8 calls on 8 inputs inside one jit (``_common.time_in_jit``).
Paths the cost model puts above ``--skip-over`` (3) times its cheapest estimate are not timed (listed
under ``not_timed`` with their estimate; ``--skip-over 0`` times them all): direct and split at 16k tokens
on three-core layouts take 2.5-17x dense (``results/ttm_linear_h100.jsonl``) and would only add compile time.
One JSON line per shape and mode (``bench: "auto_path"``) with every path's seconds, the plan auto ran,
the best path and ``auto_vs_best``; a last line (``bench: "auto_path_summary"``) counts the shapes where
auto is within 5% of the best and names the worst.

Run: python benchmarks/bench_auto_path.py [--smoke] [--out results.jsonl]
"""

import argparse

import jax
import jax.numpy as jnp

import tnjax
from tnjax.core import contraction as L
from tnjax.core.contraction import fused as F

from _common import emit, environment, fwd_bwd, time_in_jit

PROJECTIONS = {"attn.c_attn": (768, 2304), "attn.c_proj": (768, 768), "mlp.c_fc": (768, 3072),
               "mlp.c_proj": (3072, 768)}
XLA_PATHS = ("dense", "direct", "split", "einsum")


def layouts(m: int, n: int) -> dict:
  return {"ttm3": (tnjax.factorize(m, 3), tnjax.factorize(n, 3)), "fused_dims": F.fused_dims(m, n)}


NAMED = {"dense": L.Plan("dense", "dense", "dense"), "direct": L.Plan("direct", "direct", "direct"),
         "split": L.Plan("split", "split", "split"), "fused": L.Plan("fused", "fused", "fused"),
         "fused_fwd": L.Plan("fused", "dense", "dense")}


def estimates(ttm, tokens: int, mode: str) -> dict:
  """The cost model's seconds of each named path (forward only, or the plan's fwd+bwd); none for einsum."""
  fused = F.fused_unavailable(ttm) is None
  costs = L.product_costs(ttm, tokens, gpu=fused)
  out = {}
  for name, plan in NAMED.items():
    if "fused" in plan and not fused:
      continue
    out[name] = costs["forward"][plan.forward] if mode == "fwd" else L.plan_seconds(ttm, tokens, plan, costs=costs)
  return out


def time_paths(ttm, w, tokens: int, mode: str, calls: int, repeats: int, skip_over: float):
  """Seconds per call of the dense reference ("matmul"), "auto" and every path that runs here, except
  those the cost model puts above ``skip_over`` times its cheapest estimate (returned with their estimate)."""
  m, n = w.shape
  keys = jax.random.split(jax.random.key(tokens), 2 * calls)
  xs = [jax.random.normal(k, (tokens, m), w.dtype) for k in keys[:calls]]
  gs = [jax.random.normal(k, (tokens, n), w.dtype) for k in keys[calls:]]
  guess = estimates(ttm, tokens, mode)
  skipped = {p: s for p, s in guess.items() if s > skip_over * min(guess.values())}
  paths = [p for p in guess if p not in skipped] + ["einsum", "auto"]
  times = {}
  for path in ["matmul"] + paths:
    f = (lambda p, x: x @ p) if path == "matmul" else (lambda p, x, path=path: tnjax.matvec(p, x, path=path))
    p = w if path == "matmul" else ttm
    if mode == "fwd":
      times[path] = time_in_jit(f, [(p, x) for x in xs], repeats)
    else:
      times[path] = time_in_jit(fwd_bwd(f), [(p, x, g) for x, g in zip(xs, gs)], repeats)
  return times, skipped


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true", help="one small shape on any backend, in seconds")
  parser.add_argument("--ranks", default="4,8,16,64")
  parser.add_argument("--projections", default=",".join(PROJECTIONS))
  parser.add_argument("--train-tokens", type=int, default=16384)
  parser.add_argument("--decode-tokens", default="1,4,16,64")
  parser.add_argument("--layouts", default="ttm3,fused_dims")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--skip-over", type=float, default=3.0,
                      help="don't time a path the cost model puts above this many times its cheapest estimate "
                           "(0: time every path)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  env = environment()
  dtype, calls = jnp.bfloat16, 8
  shapes = {name: PROJECTIONS[name] for name in args.projections.split(",")}
  ranks = [int(r) for r in args.ranks.split(",")]
  runs = [("fwd+bwd", args.train_tokens)] + [("fwd", int(t)) for t in args.decode_tokens.split(",")]
  if args.smoke:
    shapes, ranks, runs, calls, args.repeats = {"smoke": (256, 512)}, [4], [("fwd+bwd", 64), ("fwd", 1)], 2, 2
  print(f"# {env['device']} jax {env['jax']} bf16; time per call in us; auto over the best path")
  print(f"{'shape':<12} {'layout':<10} {'rank':>4} {'mode':<7} {'tokens':>6} {'matmul':>8} {'best':>10} "
        f"{'best us':>8} {'auto us':>8} {'auto/best':>9}  auto plan")
  within, worst = 0, None
  for name, (m, n) in shapes.items():
    w = (jax.random.normal(jax.random.key(0), (m, n)) * 0.02).astype(dtype)
    for layout, (in_dims, out_dims) in layouts(m, n).items():
      if layout not in args.layouts.split(","):
        continue
      for rank in ranks:
        ttm = tnjax.random_ttm(jax.random.key(1), in_dims, out_dims, rank, std=0.02, dtype=dtype)
        for mode, tokens in runs:
          times, skipped = time_paths(ttm, w, tokens, mode, calls, args.repeats, args.skip_over or float("inf"))
          paths = {k: v for k, v in times.items() if k not in ("matmul", "auto")}
          best = min(paths, key=paths.get)
          ratio = times["auto"] / paths[best]
          plan = L.choose_plan(ttm, tokens)
          within += ratio <= 1.05
          record = {"bench": "auto_path", "shape": name, "in_features": m, "out_features": n, "layout": layout,
                    "in_dims": in_dims, "out_dims": out_dims, "rank": rank, "mode": mode, "tokens": tokens,
                    "dtype": "bfloat16", "seconds": times, "not_timed": skipped, "best_path": best,
                    "auto_plan": list(plan), "auto_vs_best": ratio, "auto_vs_matmul": times["auto"] / times["matmul"],
                    "estimated_seconds": L.product_costs(ttm, tokens), **env}
          if worst is None or ratio > worst["auto_vs_best"]:
            worst = {k: record[k] for k in ("shape", "layout", "rank", "mode", "tokens", "best_path", "auto_plan",
                                             "auto_vs_best")}
          print(f"{name:<12} {layout:<10} {rank:>4} {mode:<7} {tokens:>6} {times['matmul'] * 1e6:>8.1f} "
                f"{best:>10} {paths[best] * 1e6:>8.1f} {times['auto'] * 1e6:>8.1f} {ratio:>8.2f}x  "
                f"{'/'.join(plan)}", flush=True)
          if args.out is not None:
            emit(record, args.out)
  total = len(shapes) * len(args.layouts.split(",")) * len(ranks) * len(runs)
  print(f"# auto within 5% of the best path at {within} of {total} shapes; worst {worst}")
  emit({"bench": "auto_path_summary", "shapes": total, "within_5pct": within, "worst": worst, **env}, args.out)


if __name__ == "__main__":
  main()
