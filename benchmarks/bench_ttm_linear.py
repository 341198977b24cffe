"""TT-matrix layer paths vs a dense layer at GPT-2 MLP shape (768 x 3072), forward and forward+backward.

Two layouts: the default three-core dims (``factorize``) and the two-core dims of the fused Pallas kernel
(``fused_dims``: in (16, 48), out (192, 16)). For each rank: a dense ``x @ W`` (the baseline), then each
path of ``tnjax.core.contraction.linear``: "dense" (rebuild W, one matmul), "direct" (core by core), "split"
(two merged factors, two matmuls), "fused" (the Pallas kernels, GPU only) and "auto" (the cost model's
pick). Forward+backward is ``jax.vjp`` with a random cotangent (gradients for the weights and x).

Each time is the median over repeats of 8 calls on 8 different inputs inside one jit, per call, so Python
dispatch does not hide the kernels (the previous version of this script timed single calls: dense at 16k
tokens read 0.31-0.46 ms there and 0.14-0.15 ms here). On a GPU the fused kernel is first checked against a
float32 reference. Ratios are against the dense layer in the same run.

Run: python benchmarks/bench_ttm_linear.py [--smoke] [--out results.jsonl]
"""

import argparse

import jax
import jax.numpy as jnp

import tnjax
from tnjax.core import contraction as L
from tnjax.core.contraction import fused as F

from _common import emit, environment, fwd_bwd, time_in_jit


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--tokens", type=int, default=16384)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--ranks", default="4,8,16,32")
  parser.add_argument("--layouts", default="ttm3,fused_dims")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  env = environment()
  gpu = env["platform"] == "gpu"
  dtype = jnp.bfloat16
  m, n, tokens, calls, ranks = 768, 3072, args.tokens, 8, tuple(int(r) for r in args.ranks.split(","))
  if args.smoke:
    m, n, tokens, calls, ranks, args.repeats = 256, 512, 256, 2, (4,), 2
  key = jax.random.key(0)
  xs = [jax.random.normal(jax.random.key(10 + i), (tokens, m), dtype) for i in range(calls)]
  gs = [jax.random.normal(jax.random.key(100 + i), (tokens, n), dtype) for i in range(calls)]
  w = (jax.random.normal(key, (m, n)) * 0.02).astype(dtype)
  layouts = {"ttm3": (tnjax.factorize(m, 3), tnjax.factorize(n, 3)), "fused_dims": F.fused_dims(m, n)}
  layouts = {k: v for k, v in layouts.items() if k in args.layouts.split(",")}
  if gpu:  # the kernel on this device against a float32 reference, forward and gradients
    ttm = tnjax.random_ttm(key, *layouts["fused_dims"], 8, std=0.02)
    x32 = jax.random.normal(jax.random.key(3), (333, m))
    g32 = jax.random.normal(jax.random.key(4), (333, n))
    ref, ref_vjp = jax.vjp(lambda t, x: x @ tnjax.to_dense(t), ttm, x32)
    y, vjp = jax.vjp(F.matvec_fused, ttm, x32)
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    errors = [rel(y, ref)] + [rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(vjp(g32)),
                                                         jax.tree_util.tree_leaves(ref_vjp(g32)))]
    print(f"# fused kernel vs float32 reference (output, d cores, dx): {' '.join(f'{e:.1e}' for e in errors)}")
    emit({"bench": "ttm_linear_check", "rel_errors": errors, **env}, args.out)

  print(f"# {env['device']} jax {env['jax']} bf16 {m}x{n}, {tokens} tokens; time per call, ratio to dense")
  print(f"{'layout':<10} {'rank':>4} {'mode':<7} {'dense us':>9} " + " ".join(f"{p:>8}" for p in L.PATHS[1:])
        + " auto  auto picks")
  for name, (in_dims, out_dims) in layouts.items():
    for rank in ranks:
      ttm = tnjax.random_ttm(key, in_dims, out_dims, rank, std=0.02, dtype=dtype)
      paths = ["dense", "split", "auto"] + (["direct"] if rank <= 8 else [])
      if gpu and F.fused_supported(ttm):
        paths += ["fused", "fused_fwd"]
      for mode in ("fwd", "fwd+bwd"):
        times = {}
        for path in ["matmul"] + paths:
          f = (lambda p, x: x @ p) if path == "matmul" else (lambda p, x, path=path: L.linear(p, x, path=path))
          p = w if path == "matmul" else ttm
          if mode == "fwd":
            times[path] = time_in_jit(f, [(p, x) for x in xs], args.repeats)
          else:
            times[path] = time_in_jit(fwd_bwd(f), [(p, x, g) for x, g in zip(xs, gs)], args.repeats)
        base = times.pop("matmul")
        ratios = {k: v / base for k, v in times.items()}
        picked = L.choose_path(ttm, tokens)
        cells = " ".join(f"{ratios[p]:>7.2f}x" if p in ratios else f"{'-':>8}" for p in L.PATHS[1:])
        print(f"{name:<10} {rank:>4} {mode:<7} {base * 1e6:>9.1f} {cells} {ratios['auto']:>5.2f}x  {picked}")
        emit({"bench": "ttm_linear", "layout": name, "in_dims": in_dims, "out_dims": out_dims, "rank": rank,
              "tokens": tokens, "mode": mode, "dtype": "bfloat16", "dense_seconds": base, "seconds": times,
              "ratio_vs_dense": ratios, "auto_picks": picked, "tt_params": ttm.num_params,
              "dense_params": m * n, "cost_model_seconds": L.path_costs(ttm, tokens), **env}, args.out)


if __name__ == "__main__":
  main()
