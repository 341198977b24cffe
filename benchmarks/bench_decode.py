"""Decode-time layers: a stack of MLP projections (768 -> 3072 -> 768) stepped token by token in one jitted loop,
dense vs TT-matrix layers by each contraction path, at 1-64 tokens per step.

A decode step reads every layer's weights once; with 24 layer pairs of GPT-2 MLP shapes the dense weights
(226 MB in bf16) exceed the GPU's L2, as in a real model, so the dense baseline pays HBM bandwidth. The
layers are unrolled in Python inside the step, as ``tnjax.models.GPT`` runs its blocks, and all steps run
inside one ``lax.fori_loop``, so launch overheads are those of a real decode loop, not of Python dispatch.
Layouts: the default three-core dims, and the two-core dims of the fused kernel (``fused_dims``: up
(16, 48) -> (192, 16), down (16, 192) -> (48, 16)). Ratios are TT time over dense time in the same run.

Run: python benchmarks/bench_decode.py [--smoke] [--out results.jsonl]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import tnjax
from tnjax.core.contraction import fused as F
from tnjax.core.contraction import linear

from _common import emit, environment


def make_params(layout: str, layers: int, d: int, f: int, rank: int, dtype):
  keys = jax.random.split(jax.random.key(0), 2 * layers)
  if layout == "dense":
    return [((jax.random.normal(k1, (d, f)) * 0.02).astype(dtype),
             (jax.random.normal(k2, (f, d)) * 0.02).astype(dtype)) for k1, k2 in zip(keys[:layers], keys[layers:])]
  if layout == "ttm3":
    up_dims = (tnjax.factorize(d, 3), tnjax.factorize(f, 3))
    down_dims = (tnjax.factorize(f, 3), tnjax.factorize(d, 3))
  else:
    up_dims, down_dims = F.fused_dims(d, f), F.fused_dims(f, d)
  return [(tnjax.random_ttm(k1, *up_dims, rank, std=0.02, dtype=dtype),
           tnjax.random_ttm(k2, *down_dims, rank, std=0.02, dtype=dtype))
          for k1, k2 in zip(keys[:layers], keys[layers:])]


def time_decode(params, x, path: str | None, steps: int, repeats: int) -> float:
  """Seconds per step: every layer pair once per step, the output feeding the next step."""
  apply = (lambda w, h: h @ w) if path is None else (lambda w, h: linear(w, h, path=path))

  @jax.jit
  def run(params, x):
    def step(_, h):
      for w1, w2 in params:
        h = h + 0.1 * apply(w2, jnp.tanh(apply(w1, h)))
      return h
    return jax.lax.fori_loop(0, steps, step, x)

  jax.block_until_ready(run(params, x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run(params, x))
    times.append(time.perf_counter() - start)
  return statistics.median(times) / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--layers", type=int, default=24)
  parser.add_argument("--steps", type=int, default=32)
  parser.add_argument("--tokens", default="1,4,16,64")
  parser.add_argument("--ranks", default="8,16,32")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  env = environment()
  gpu = env["platform"] == "gpu"
  d, f, dtype = 768, 3072, jnp.bfloat16
  if args.smoke:
    args.layers, args.steps, args.tokens, args.ranks, args.repeats, d, f = 2, 2, "1,4", "8", 1, 256, 512
  tokens = [int(t) for t in args.tokens.split(",")]
  ranks = [int(r) for r in args.ranks.split(",")]
  print(f"# {env['device']} jax {env['jax']}: {args.layers} layer pairs {d}->{f}->{d}, {args.steps} steps per call")
  print(f"{'tokens':>6} {'layers':<24} {'us/step':>9} {'vs dense':>9}")
  dense = make_params("dense", args.layers, d, f, 0, dtype)
  variants = []
  for r in ranks:
    ttm3 = make_params("ttm3", args.layers, d, f, r, dtype)
    variants += [(f"ttm3 r{r} {p}", r, p, ttm3) for p in ("dense", "direct", "split", "auto")]
    if r <= F.MAX_RANK:
      two = make_params("fused_dims", args.layers, d, f, r, dtype)
      variants += [(f"fused_dims r{r} {p}", r, p, two) for p in ("split", "auto") + (("fused",) if gpu else ())]
  for t in tokens:
    x = jax.random.normal(jax.random.key(7), (t, d), dtype)
    base = time_decode(dense, x, None, args.steps, args.repeats)
    print(f"{t:>6} {'dense':<24} {base * 1e6:>9.1f} {1.0:>9.2f}")
    emit({"bench": "decode", "tokens": t, "layers": "dense", "seconds_per_step": base, "vs_dense": 1.0, **env},
         args.out)
    for label, r, path, params in variants:
      s = time_decode(params, x, path, args.steps, args.repeats)
      print(f"{t:>6} {label:<24} {s * 1e6:>9.1f} {s / base:>9.2f}")
      emit({"bench": "decode", "tokens": t, "layers": label, "rank": r, "path": path, "seconds_per_step": s,
            "vs_dense": s / base, **env}, args.out)


if __name__ == "__main__":
  main()
