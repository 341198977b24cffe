"""Block-TT (BTT) layer vs a dense layer at GPT-2 MLP shapes (768 -> 3072 and 3072 -> 768), forward+backward.

For each layout (dims) and rank: ``tnjax.btt_matvec`` and, as a candidate, the same product written as
explicit transposes around batch-major matmuls ("bmm"). Layouts: the balanced default
(``tnjax.core.btt.btt_dims``) and "b blocks": in_dims (m / b, b), out_dims (b, n / b), which has b x b
blocks of rank r (fewer, larger GEMMs and a smaller intermediate). Ranks are chosen for about 25% and 45%
of the dense parameters. Times are medians of 8 calls inside one jit (``_common.time_in_jit``); ratios are
against the dense layer in the same run.

Run: python benchmarks/bench_btt_linear.py [--smoke] [--out results.jsonl]
"""

import argparse

import jax
import jax.numpy as jnp

import tnjax
from tnjax.core import btt as B

from _common import emit, environment, fwd_bwd, time_in_jit


def bmm_matvec(btt, x):
  """x @ W as transpose, batched matmul over i2, transpose, batched matmul over j1, transpose."""
  left, right = btt.cores
  (m1, m2), (n1, n2), r = btt.in_dims, btt.out_dims, btt.rank
  t = x.shape[0]
  xb = x.reshape(t, m1, m2).transpose(2, 0, 1)  # (m2, t, m1)
  z = jnp.matmul(xb, left.reshape(m2, m1, r * n1))  # (m2, t, r * n1)
  z = z.reshape(m2, t, r, n1).transpose(3, 1, 2, 0).reshape(n1, t, r * m2)
  y = jnp.matmul(z, right.reshape(n1, r * m2, n2))  # (n1, t, n2)
  return y.transpose(1, 0, 2).reshape(t, n1 * n2)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--tokens", type=int, default=16384)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  env = environment()
  dtype, tokens, calls, shapes = jnp.bfloat16, args.tokens, 8, [(768, 3072), (3072, 768)]
  if args.smoke:
    tokens, calls, shapes, args.repeats = 256, 2, [(256, 512)], 2

  print(f"# {env['device']} jax {env['jax']} tokens {tokens} bf16, forward+backward")
  print(f"{'shape':<11} {'layout':<22} {'rank':>4} {'params':>7} {'impl':<7} {'ms':>8} {'vs dense':>9}")
  for m, n in shapes:
    xs = [jax.random.normal(jax.random.key(10 + i), (tokens, m), dtype) for i in range(calls)]
    gs = [jax.random.normal(jax.random.key(100 + i), (tokens, n), dtype) for i in range(calls)]
    w = (jax.random.normal(jax.random.key(0), (m, n)) * 0.02).astype(dtype)
    dense = time_in_jit(fwd_bwd(lambda w, x: x @ w), [(w, x, g) for x, g in zip(xs, gs)], args.repeats)
    print(f"{m}x{n:<6} {'dense':<22} {'-':>4} {1.0:>7.2f} {'matmul':<7} {dense * 1e3:>8.3f} {1.0:>8.2f}x")
    layouts = {"balanced": B.btt_dims(m, n)}
    for b in (4, 8, 16):
      layouts[f"{b} blocks"] = ((m // b, b), (b, n // b))
    for name, (in_dims, out_dims) in layouts.items():
      per_rank = (m * out_dims[0] + n * in_dims[1]) / (m * n)
      for target in (0.25, 0.45):
        rank = max(1, min(round(target / per_rank), in_dims[0], out_dims[1]))
        btt = tnjax.random_btt(jax.random.key(1), in_dims, out_dims, rank, std=0.02, dtype=dtype)
        for impl, f in (("einsum", tnjax.btt_matvec), ("bmm", bmm_matvec)):
          sec = time_in_jit(fwd_bwd(f), [(btt, x, g) for x, g in zip(xs, gs)], args.repeats)
          frac = btt.num_params / (m * n)
          print(f"{m}x{n:<6} {name + ' ' + str(in_dims) + str(out_dims):<22} {rank:>4} {frac:>7.2f} {impl:<7} "
                f"{sec * 1e3:>8.3f} {sec / dense:>8.2f}x", flush=True)
          emit({"bench": "btt_linear", "m": m, "n": n, "layout": name, "in_dims": in_dims, "out_dims": out_dims,
                "rank": rank, "param_fraction": frac, "impl": impl, "tokens": tokens, "seconds": sec,
                "dense_seconds": dense, "ratio_vs_dense": sec / dense, **env}, args.out)


if __name__ == "__main__":
  main()
