"""Generates the figures of docs/concepts.md (run from the repository root; writes docs/img/*.png).

  python docs/figures.py [--out docs/img]
"""

import argparse
import pathlib

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import tnjax
from tnjax.nn import path_costs


def error_vs_rank(out: pathlib.Path) -> None:
  """Relative error of TT-SVD against the rank cap: a smooth function compresses, noise does not."""
  grid = np.linspace(0, 1, 16)
  x1, x2, x3, x4 = np.meshgrid(grid, grid, grid, grid, indexing="ij")
  smooth = jnp.asarray(1.0 / (1.0 + x1 + x2 + x3 + x4), jnp.float32)
  noise = jax.random.normal(jax.random.key(0), smooth.shape)
  ranks = [1, 2, 4, 8, 16, 32, 64]
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for name, x in (("smooth 1/(1+x1+x2+x3+x4)", smooth), ("Gaussian noise", noise)):
    errs = [float(jnp.linalg.norm(tnjax.to_dense(tnjax.tt_svd(x, max_rank=r)) - x) / jnp.linalg.norm(x))
            for r in ranks]
    params = [tnjax.tt_svd(x, max_rank=r).num_params for r in ranks]
    ax.loglog(params, np.maximum(errs, 1e-8), "o-", label=name)
  ax.axvline(smooth.size, color="gray", ls="--", label="dense (65,536)")
  ax.set_xlabel("parameters of the TT (rank cap 1 ... 64)")
  ax.set_ylabel("relative Frobenius error")
  ax.set_title("TT-SVD of a 16 x 16 x 16 x 16 tensor")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "tt_error_vs_rank.png", dpi=110)
  plt.close(fig)


def layer_costs(out: pathlib.Path) -> None:
  """Parameters of a 768 x 3072 TT-matrix against rank, and the cost model's time of each path against tokens."""
  in_dims, out_dims = tnjax.factorize(768, 3), tnjax.factorize(3072, 3)
  ranks = [2, 4, 8, 16, 32, 64, 128]
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
  params = [tnjax.random_ttm(jax.random.key(0), in_dims, out_dims, r).num_params for r in ranks]
  a.semilogy(ranks, params, "o-", label="TT-matrix (3 cores)")
  a.axhline(768 * 3072, color="gray", ls="--", label="dense 768 x 3072")
  a.set_xscale("log", base=2)
  a.set_xlabel("rank")
  a.set_ylabel("parameters")
  a.legend(fontsize=8)
  a.grid(alpha=0.3, which="both")
  tokens = [1, 4, 16, 64, 256, 1024, 4096, 16384]
  for r in (4, 32):
    ttm = tnjax.random_ttm(jax.random.key(0), in_dims, out_dims, r)
    costs = [path_costs(ttm, t) for t in tokens]
    b.loglog(tokens, [c["direct"] * 1e6 for c in costs], "o-", label=f"direct (core by core), rank {r}")
    b.loglog(tokens, [c["dense"] * 1e6 for c in costs], "s--", label=f"rebuild W + matmul, rank {r}")
  b.set_xlabel("tokens")
  b.set_ylabel("estimated forward time (us, H100 roofline)")
  b.legend(fontsize=7)
  b.grid(alpha=0.3, which="both")
  fig.suptitle("a GPT-2 MLP weight as a TT-matrix: size and contraction cost")
  fig.tight_layout()
  fig.savefig(out / "ttm_layer_costs.png", dpi=110)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default="docs/img")
  out = pathlib.Path(parser.parse_args().out)
  out.mkdir(parents=True, exist_ok=True)
  error_vs_rank(out)
  layer_costs(out)
  print(sorted(str(p) for p in out.glob("*.png")))


if __name__ == "__main__":
  main()
