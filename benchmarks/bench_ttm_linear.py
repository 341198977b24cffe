"""TTM layer paths vs a dense layer at GPT-2 MLP shape (768 x 3072), forward and forward+backward.

For each rank and token count: a dense matmul, the TTM "dense" path (rebuild
W, one matmul), the "direct" path (core by core, custom VJP), "auto" (what
the cost model picks) and plain ``tnjax.matvec`` (opt_einsum's FLOP-optimal
order, autodiff backward). Ratios are against the dense layer in the same
run. Each JSON line also has the cost model's estimates.

Run: python benchmarks/bench_ttm_linear.py [--smoke] [--out results.jsonl]
"""

import argparse

import jax
import jax.numpy as jnp

import tnjax
from tnjax.core import linear as L

from _common import emit, environment, time_call


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  env = environment()
  dtype = jnp.dtype(args.dtype)
  if args.smoke:
    m, n, ranks, token_counts = 96, 384, (4, 16), (1, 256)
  else:
    m, n, ranks, token_counts = 768, 3072, (4, 8, 16, 32, 64), (1, 16, 64, 1024, 16384)
  in_dims, out_dims = tnjax.factorize(m, 3), tnjax.factorize(n, 3)
  key = jax.random.key(0)
  w = (jax.random.normal(key, (m, n)) * 0.02).astype(dtype)
  print(f"# {env['device']} jax {env['jax']} {args.dtype} {m}x{n} in_dims={in_dims} out_dims={out_dims}")
  print(f"{'rank':>4} {'tokens':>6} {'mode':<7} {'dense ms':>9} {'tt-dense':>9} {'direct':>9} {'auto':>9} "
        f"{'matvec':>9}  auto picks")
  for rank in ranks:
    ttm = jax.tree_util.tree_map(lambda c: c.astype(dtype),
                                 tnjax.random_ttm(key, in_dims, out_dims, rank, std=0.02))
    for tokens in token_counts:
      x = jax.random.normal(jax.random.key(1), (tokens, m)).astype(dtype)
      g = jax.random.normal(jax.random.key(2), (tokens, n)).astype(dtype)
      fns = {
          "dense": (lambda p, x: x @ p, w),
          "tt-dense": (lambda p, x: L.linear(p, x, path="dense"), ttm),
          "direct": (lambda p, x: L.linear(p, x, path="direct"), ttm),
          "auto": (lambda p, x: L.linear(p, x, path="auto"), ttm),
          "matvec": (tnjax.matvec, ttm),
      }
      picked = L.choose_path(ttm, tokens)
      estimates = L.path_costs(ttm, tokens)
      for mode in ("fwd", "fwd+bwd"):
        times = {}
        for name, (f, p) in fns.items():
          if mode == "fwd":
            run = jax.jit(f)
          else:
            run = jax.jit(jax.grad(lambda p, x, f=f, g=g: jnp.sum((f(p, x) * g).astype(jnp.float32)), argnums=(0, 1)))
          times[name] = time_call(run, p, x, repeats=args.repeats)
        base = times["dense"]
        print(f"{rank:>4} {tokens:>6} {mode:<7} {base * 1e3:>9.3f} " +
              " ".join(f"{times[k] / base:>8.2f}x" for k in ("tt-dense", "direct", "auto", "matvec")) +
              f"  {picked}")
        emit({"bench": "ttm_linear", "shape": [m, n], "in_dims": in_dims, "out_dims": out_dims, "rank": rank,
              "tokens": tokens, "mode": mode, "dtype": args.dtype, "seconds": times,
              "ratio_vs_dense": {k: v / base for k, v in times.items()}, "auto_picks": picked,
              "tt_params": ttm.num_params, "dense_params": m * n, "cost_model_seconds": estimates, **env},
             args.out)


if __name__ == "__main__":
  main()
