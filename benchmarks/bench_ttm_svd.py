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
import statistics
import time

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
  parser.add_argument("--peers", action="store_true",
                      help="also time tensorly and tntorch TT-SVD of the same tensor (if installed; torch on CUDA "
                           "when available). Never tnjax dependencies: install them in the benchmark environment only")
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
    gram = jax.jit(functools.partial(tnjax.ttm_svd, in_dims=in_dims, out_dims=out_dims, max_rank=args.max_rank,
                                     method="gram"))
    gram_tol = functools.partial(tnjax.ttm_svd, in_dims=in_dims, out_dims=out_dims, rtol=args.rtol, method="gram")
    dense_svd = jax.jit(functools.partial(jnp.linalg.svd, full_matrices=False))
    rows = [
        (f"ttm_svd jit max_rank={args.max_rank}", capped, w),
        (f"ttm_svd eager rtol={args.rtol}", by_tol, w),
        (f"ttm_svd gram jit max_rank={args.max_rank}", gram, w),
        (f"ttm_svd gram eager rtol={args.rtol}", gram_tol, w),
        ("jnp.linalg.svd jit", dense_svd, w),
        ("numpy.linalg.svd", functools.partial(np.linalg.svd, full_matrices=False), w_np),
    ]
    times = {label: time_call(fn, x, repeats=args.repeats) for label, fn, x in rows}
    if args.peers:
      times.update(peer_times(w_np, in_dims, out_dims, args.max_rank, args.repeats))
    ref = times["numpy.linalg.svd"]
    ranks = {"capped": capped(w).ranks, "rtol": by_tol(w).ranks}
    err = lambda t, w=w, m=m, n=n: float(jnp.linalg.norm(tnjax.to_dense(t)[:m, :n] - w) / jnp.linalg.norm(w))
    emit({"bench": "ttm_svd_accuracy", "shape": [m, n], "max_rank": args.max_rank, "svd_error": err(capped(w)),
          "gram_error": err(gram(w)), "gram_over_svd": err(gram(w)) / err(capped(w)), **env}, args.out)
    for label, seconds in times.items():
      print(f"{name:<11} {label:<28} {seconds * 1e3:>9.2f} {seconds / ref:>12.3f}x")
      emit({"bench": "ttm_svd", "shape": [m, n], "in_dims": in_dims, "out_dims": out_dims, "method": label,
            "seconds": seconds, "ratio_vs_numpy_svd": seconds / ref, "ranks": ranks, **env}, args.out)


def peer_times(w_np, in_dims, out_dims, max_rank: int, repeats: int) -> dict:
  """Seconds of tensorly's and tntorch's TT-SVD of the interleaved tensor ttm_svd decomposes, same rank cap."""
  d = len(in_dims)
  rows, cols = int(np.prod(in_dims)), int(np.prod(out_dims))
  w = np.pad(w_np, ((0, rows - w_np.shape[0]), (0, cols - w_np.shape[1])))
  x = w.reshape(in_dims + out_dims).transpose([p for k in range(d) for p in (k, d + k)])
  x = np.ascontiguousarray(x.reshape([i * o for i, o in zip(in_dims, out_dims)]))
  out = {}
  try:
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    xt = torch.tensor(x, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  except ImportError:
    torch = None
  def timed(fn):
    fn()
    if torch is not None:
      sync()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn()
      if torch is not None:
        sync()
      times.append(time.perf_counter() - start)
    return statistics.median(times)
  try:
    import tensorly as tl
    from tensorly.decomposition import tensor_train
    if torch is not None:
      tl.set_backend("pytorch")
      out[f"tensorly tensor_train (torch {device})"] = timed(lambda: tensor_train(xt, rank=max_rank))
    else:
      out["tensorly tensor_train (numpy)"] = timed(lambda: tensor_train(x, rank=max_rank))
  except Exception as e:  # report, do not fail the tnjax rows
    print(f"# tensorly: {type(e).__name__}: {e}")
  try:
    import tntorch as tn
    out[f"tntorch Tensor ranks_tt (torch {device})"] = timed(lambda: tn.Tensor(xt, ranks_tt=max_rank))
  except Exception as e:
    print(f"# tntorch: {type(e).__name__}: {e}")
  return out


if __name__ == "__main__":
  main()
