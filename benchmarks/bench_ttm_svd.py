"""Time ttm_svd on GPT-2 weight shapes against a plain SVD of the same matrix.

Rows: the jitted ttm_svd with a static rank cap (the path a compression run
takes), the eager ttm_svd with a tolerance (ranks read on the host), the
jitted jnp.linalg.svd and numpy.linalg.svd of the whole matrix (what a
low-rank SVD baseline costs). Output: one JSON line per measurement, and a
ratio column against numpy.linalg.svd.

Run: python benchmarks/bench_ttm_svd.py [--smoke] [--out results.jsonl]
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

import tnjax

from _common import emit, environment, time_call

SHAPES = {"768x3072": (768, 3072), "50257x768": (50257, 768)}
SMOKE = {"96x384": (96, 384), "1000x96": (1000, 96)}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--max-rank", type=int, default=64)
  parser.add_argument("--cores", type=int, default=3)
  parser.add_argument("--rtol", type=float, default=0.3)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=None, help="append JSON lines here")
  args = parser.parse_args()
  env = environment()
  rng = np.random.default_rng(0)
  print(f"# {env['device']} jax {env['jax']}")
  print(f"{'shape':<11} {'method':<28} {'ms':>9} {'vs numpy svd':>13}")
  for name, (m, n) in (SMOKE if args.smoke else SHAPES).items():
    w_np = rng.standard_normal((m, n)).astype(np.float32) * 0.02
    w = jnp.asarray(w_np)
    in_dims, out_dims = tnjax.factorize(m, args.cores), tnjax.factorize(n, args.cores)
    capped = jax.jit(functools.partial(tnjax.ttm_svd, in_dims=in_dims, out_dims=out_dims, max_rank=args.max_rank))
    by_tol = functools.partial(tnjax.ttm_svd, in_dims=in_dims, out_dims=out_dims, rtol=args.rtol)
    dense_svd = jax.jit(functools.partial(jnp.linalg.svd, full_matrices=False))
    rows = [
        (f"ttm_svd jit max_rank={args.max_rank}", capped, w),
        (f"ttm_svd eager rtol={args.rtol}", by_tol, w),
        ("jnp.linalg.svd jit", dense_svd, w),
        ("numpy.linalg.svd", functools.partial(np.linalg.svd, full_matrices=False), w_np),
    ]
    times = {label: time_call(fn, x, repeats=args.repeats) for label, fn, x in rows}
    ref = times["numpy.linalg.svd"]
    ranks = {"capped": capped(w).ranks, "rtol": by_tol(w).ranks}
    for label, seconds in times.items():
      print(f"{name:<11} {label:<28} {seconds * 1e3:>9.2f} {seconds / ref:>12.3f}x")
      emit({"bench": "ttm_svd", "shape": [m, n], "in_dims": in_dims, "out_dims": out_dims, "method": label,
            "seconds": seconds, "ratio_vs_numpy_svd": seconds / ref, "ranks": ranks, **env}, args.out)


if __name__ == "__main__":
  main()
