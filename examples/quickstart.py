"""Decompose and contract real structured data with tnjax; print errors and compression.

Three inputs, each compressed to a relative Frobenius error (``--rtol``):
  1. a smooth function sampled on a 4-D grid, f(x) = 1 / (1 + x1 + x2 + x3 + x4), as a TT;
  2. an exponential covariance kernel K[i, j] = exp(-|t_i - t_j| / 0.1) as a TT-matrix (MPO),
     multiplied by a batch of vectors without forming K;
  3. a Gaussian random matrix of the same size, which has no low-rank structure: its
     ranks stay near full, so it does not compress. Compression depends on the data.

Run: python examples/quickstart.py [--smoke]
"""

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

import tnjax
from tnjax.core.contraction import choose_path, path_flops


def _row(name, shape, tt, err):
  dense = math.prod(shape)
  print(f"{name:<26} {str(shape):<14} {str(tt.ranks):<26} {dense:>10,d} {tt.num_params:>9,d} "
        f"{dense / tt.num_params:>8.1f}x {err:>9.2e}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true", help="small sizes, runs in seconds")
  parser.add_argument("--rtol", type=float, default=1e-6, help="relative error bound for the decompositions")
  args = parser.parse_args(argv)
  jax.config.update("jax_enable_x64", True)  # float64 so that errors near 1e-6 are meaningful

  n = 8 if args.smoke else 16
  q = 3 if args.smoke else 5  # the kernel has 4**q points

  print(f"{'input':<26} {'shape':<14} {'TT ranks':<26} {'dense':>10} {'TT':>9} {'ratio':>9} {'rel err':>9}")
  grid = np.linspace(0.0, 1.0, n)
  x = 1.0 / (1.0 + sum(np.meshgrid(grid, grid, grid, grid, indexing="ij")))
  tt = tnjax.tt_svd(x, rtol=args.rtol)
  err = np.linalg.norm(tnjax.to_dense(tt) - x) / np.linalg.norm(x)
  _row("1/(1+x1+x2+x3+x4)", x.shape, tt, err)
  assert err <= args.rtol

  points = 4 ** q
  t = np.linspace(0.0, 1.0, points)
  kernel = np.exp(-np.abs(t[:, None] - t[None, :]) / 0.1)
  dims = (4,) * q
  ttm = tnjax.ttm_svd(kernel, dims, dims, rtol=args.rtol)
  err = np.linalg.norm(tnjax.to_dense(ttm) - kernel) / np.linalg.norm(kernel)
  _row("exp(-|ti-tj|/0.1)", kernel.shape, ttm, err)
  assert err <= args.rtol

  noise = np.random.default_rng(0).standard_normal(kernel.shape)
  ttm_noise = tnjax.ttm_svd(noise, dims, dims, rtol=0.5)
  err = np.linalg.norm(tnjax.to_dense(ttm_noise) - noise) / np.linalg.norm(noise)
  _row("Gaussian noise (rtol .5)", noise.shape, ttm_noise, err)

  v = jnp.asarray(np.random.default_rng(1).standard_normal((64, points)))
  apply = jax.jit(tnjax.matvec)
  y = apply(ttm, v).block_until_ready()
  start = time.perf_counter()
  y = apply(ttm, v).block_until_ready()
  took = time.perf_counter() - start
  ref = np.asarray(v) @ kernel
  err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
  flops = path_flops(ttm, v.shape[0])  # of the path "auto" ran: choose_path(ttm, 64)
  print(f"\nmatvec: 64 vectors x TT-matrix K, relative error vs dense {err:.2e}, path {choose_path(ttm, 64)!r}, "
        f"{flops:.3g} FLOPs vs {2 * 64 * points * points:.3g} dense, {took * 1e3:.2f} ms (jitted)")
  assert err <= 10 * args.rtol


if __name__ == "__main__":
  main()
