import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tnjax


@pytest.mark.parametrize("dims, rank, std", [((16, 16, 16), 4, 1.0), ((8, 8, 8, 8), 8, 0.02), ((64, 64), 16, 3.0)])
def test_random_tt_dense_std(dims, rank, std):
  stds = [np.std(tnjax.to_dense(tnjax.random_tt(jax.random.key(s), dims, rank, std=std))) for s in range(8)]
  assert abs(np.mean(stds) / std - 1) < 0.1


@pytest.mark.parametrize("in_dims, out_dims, rank", [((8, 8, 12), (12, 16, 16), 8), ((8, 8, 12), (12, 16, 16), 32),
                                                     ((32, 24), (32, 24), 4)])
def test_random_ttm_dense_std_matches_lecun(in_dims, out_dims, rank):
  std = 1 / math.sqrt(math.prod(in_dims))
  stds = [np.std(tnjax.to_dense(tnjax.random_ttm(jax.random.key(s), in_dims, out_dims, rank, std=std)))
          for s in range(4)]
  assert abs(np.mean(stds) / std - 1) < 0.1


def test_random_ranks_int_caps_tuple_exact():
  assert tnjax.random_tt(jax.random.key(0), (2, 3, 4), 100).ranks == (1, 2, 4, 1)
  assert tnjax.random_tt(jax.random.key(0), (4, 4, 4), (3, 2)).ranks == (1, 3, 2, 1)
  ttm = tnjax.random_ttm(jax.random.key(0), (2, 3), (4, 5), 7, dtype=jnp.float64)
  assert ttm.ranks == (1, 7, 1) and ttm.dtype == jnp.float64 and ttm.shape == (6, 20)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(dims=(4, 4, 4), rank=(5, 2)), r"random_tt: rank\[0\]=5 but bond 0 has full rank 4"),
     (dict(dims=(4, 4, 4), rank=(2,)), r"random_tt: rank has 1 entries but the tensor has 2 bonds"),
     (dict(dims=(4, 4, 4), rank=0), r"random_tt: rank=0 but a positive integer"),
     (dict(dims=(4, 0), rank=2), r"random_tt: dims=\(4, 0\) but every entry must be a positive integer"),
     (dict(dims=(4, 4), rank=2, std=-1.0), r"random_tt: std=-1.0 but a finite number >= 0")],
)
def test_random_tt_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    tnjax.random_tt(jax.random.key(0), **kwargs)


def test_random_ttm_errors():
  with pytest.raises(ValueError, match=r"random_ttm: len\(in_dims\)=2 but len\(out_dims\)=3"):
    tnjax.random_ttm(jax.random.key(0), (2, 3), (2, 3, 4), 2)
