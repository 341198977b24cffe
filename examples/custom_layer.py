"""Write your own tensorized layer from tnjax's pure functions: a Kronecker-product linear layer.

A sum of R Kronecker products, W = sum_r A_r (x) B_r, is a TT-matrix with two
cores and rank R (Van Loan's nearest Kronecker product is its rank-R TT-SVD).
The layer holds the cores as TTParams, builds a TTMatrix in __call__ and lets
tnjax.matvec pick the contraction; from_dense fits it to a trained
kernel with ttm_svd. It then trains like any NNX module.

  python examples/custom_layer.py [--smoke]
"""

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import tnjax
from tnjax.nn import TTParam


class KroneckerLinear(nnx.Module):
  """x @ W with W = sum_r A_r (x) B_r of shape (m1 * m2, n1 * n2): cores (1, m1, n1, R) and (R, m2, n2, 1)."""

  def __init__(self, in_dims: tuple[int, int], out_dims: tuple[int, int], rank: int, *, rngs: nnx.Rngs):
    ttm = tnjax.random_ttm(rngs.params(), in_dims, out_dims, rank, std=1.0 / (in_dims[0] * in_dims[1]) ** 0.5)
    self.cores = nnx.List([TTParam(c) for c in ttm.cores])

  @classmethod
  def from_dense(cls, kernel, in_dims, out_dims, rank: int) -> "KroneckerLinear":
    layer = nnx.eval_shape(lambda: cls(in_dims, out_dims, rank, rngs=nnx.Rngs(0)))
    layer.cores = nnx.List([TTParam(c) for c in tnjax.ttm_svd(kernel, in_dims, out_dims, max_rank=rank).cores])
    return layer

  @property
  def ttm(self) -> tnjax.TTMatrix:
    return tnjax.TTMatrix(tuple(c[...] for c in self.cores))

  def __call__(self, x):
    return tnjax.matvec(self.ttm, x)  # the cost model picks the path of each product (forward, gradients)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true")
  args = parser.parse_args(argv)
  steps = 50 if args.smoke else 500
  key_w, key_x = jax.random.split(jax.random.key(0))
  # A target with Kronecker structure plus noise, 256 x 256 (dims 16 x 16 each side).
  a, b = jax.random.normal(key_w, (2, 16, 16))
  w_true = jnp.kron(a, b) / 16 + 0.002 * jax.random.normal(key_x, (256, 256))
  x = jax.random.normal(key_x, (512, 256))
  y = x @ w_true

  # 1. Fit by decomposition: rank 1 already captures the Kronecker part.
  for rank in (1, 4):
    layer = KroneckerLinear.from_dense(w_true, (16, 16), (16, 16), rank)
    err = jnp.linalg.norm(layer(x) - y) / jnp.linalg.norm(y)
    print(f"from_dense rank {rank}: {layer.ttm.num_params:,} params vs {w_true.size:,}, "
          f"relative output error {float(err):.4f}")

  # 2. Or train it from a random init, like any NNX module.
  layer = KroneckerLinear((16, 16), (16, 16), 4, rngs=nnx.Rngs(1))
  optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(layer, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(layer)
    optimizer.update(layer, grads)
    return loss

  first = float(step(layer, optimizer))
  for _ in range(steps - 1):
    loss = step(layer, optimizer)
  print(f"trained rank 4: loss {first:.4f} -> {float(loss):.5f} in {steps} Adam steps")


if __name__ == "__main__":
  main()
