"""Decode-time layers: a stack of MLP projections (768 -> 3072 -> 768) stepped token by token in one jitted loop,
dense vs TT-matrix layers, at 1-64 tokens per step.

A decode step reads every layer's weights once; with 24 layers of GPT-2 MLP shapes the dense weights (226 MB in
bf16) exceed the GPU's L2, as in a real model, so the dense baseline pays HBM bandwidth. The TT-matrix layers
read only their cores. All steps run inside one ``lax.fori_loop``, so launch overheads are those of a real
decode loop, not of Python dispatch. Ratios are TT time over dense time in the same run.

Run: python benchmarks/bench_decode.py [--smoke] [--out results.jsonl]
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import tnjax
from tnjax.core.linear import linear

from _common import emit, environment


def _stack(trees):
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def make_params(kind: str, layers: int, d: int, f: int, rank: int, dtype):
  keys = jax.random.split(jax.random.key(0), 2 * layers)
  if kind == "dense":
    w1 = jnp.stack([jax.random.normal(k, (d, f)) * 0.02 for k in keys[:layers]]).astype(dtype)
    w2 = jnp.stack([jax.random.normal(k, (f, d)) * 0.02 for k in keys[layers:]]).astype(dtype)
    return w1, w2
  ind, outd = tnjax.factorize(d, 3), tnjax.factorize(f, 3)
  up = _stack([tnjax.random_ttm(k, ind, outd, rank, std=0.02, dtype=dtype).cores for k in keys[:layers]])
  down = _stack([tnjax.random_ttm(k, outd, ind, rank, std=0.02, dtype=dtype).cores for k in keys[layers:]])
  return up, down


@functools.partial(jax.jit, static_argnames=("kind", "path", "steps"))
def decode(params, x, *, kind: str, path: str, steps: int):
  """``steps`` sequential steps; each runs every layer pair once (the output feeds the next step)."""
  def apply(w, h):
    if kind == "dense":
      return h @ w
    return linear(tnjax.TTMatrix(tuple(w)), h, path=path)

  def layer(h, w):
    w1, w2 = w
    return h + 0.1 * apply(w2, jnp.tanh(apply(w1, h))), None

  def step(_, h):
    return jax.lax.scan(layer, h, params)[0]

  return jax.lax.fori_loop(0, steps, step, x)


def time_decode(params, x, repeats: int, **kw) -> float:
  jax.block_until_ready(decode(params, x, **kw))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(decode(params, x, **kw))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) / kw["steps"]


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
  d, f, dtype = 768, 3072, jnp.bfloat16
  if args.smoke:
    args.layers, args.steps, args.tokens, args.ranks, args.repeats, d, f = 2, 2, "1,4", "8", 1, 64, 256
  tokens = [int(t) for t in args.tokens.split(",")]
  ranks = [int(r) for r in args.ranks.split(",")]
  print(f"# {env['device']} jax {env['jax']}: {args.layers} layer pairs {d}->{f}->{d}, {args.steps} steps per call")
  print(f"{'tokens':>6} {'layer':<16} {'us/step':>9} {'vs dense':>9}")
  dense = make_params("dense", args.layers, d, f, 0, dtype)
  tts = {r: make_params("ttm", args.layers, d, f, r, dtype) for r in ranks}
  for t in tokens:
    x = jnp.ones((t, d), dtype)
    base = time_decode(dense, x, args.repeats, kind="dense", path="dense", steps=args.steps)
    print(f"{t:>6} {'dense':<16} {base * 1e6:>9.1f} {1.0:>9.2f}")
    emit({"bench": "decode", "tokens": t, "layer": "dense", "seconds_per_step": base, "vs_dense": 1.0, **env},
         args.out)
    for r, params in tts.items():
      for path in ("direct", "auto"):
        s = time_decode(params, x, args.repeats, kind="ttm", path=path, steps=args.steps)
        label = f"ttm r{r} {path}"
        print(f"{t:>6} {label:<16} {s * 1e6:>9.1f} {s / base:>9.2f}")
        emit({"bench": "decode", "tokens": t, "layer": label, "rank": r, "path": path, "seconds_per_step": s,
              "vs_dense": s / base, **env}, args.out)


if __name__ == "__main__":
  main()
