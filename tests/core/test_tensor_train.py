import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tnjax
from tests.core.reference import tt_full, ttm_full


def _cores(rng, shapes):
  return [jnp.asarray(rng.standard_normal(s)) for s in shapes]


def test_tensor_train_properties(rng):
  tt = tnjax.TensorTrain.from_cores(_cores(rng, [(1, 4, 3), (3, 5, 2), (2, 6, 1)]))
  assert tt.dims == tt.shape == (4, 5, 6)
  assert tt.ranks == (1, 3, 2, 1)
  assert tt.ndim == 3
  assert tt.num_params == 12 + 30 + 12
  assert tt.dtype == jnp.float64


def test_tt_matrix_properties(rng):
  ttm = tnjax.TTMatrix.from_cores(_cores(rng, [(1, 2, 3, 4), (4, 5, 7, 1)]))
  assert ttm.in_dims == (2, 5) and ttm.out_dims == (3, 7)
  assert ttm.shape == (10, 21)
  assert ttm.ranks == (1, 4, 1)
  assert ttm.num_params == 24 + 140


def test_pytree_leaves_are_only_cores(rng):
  ttm = tnjax.TTMatrix.from_cores(_cores(rng, [(1, 2, 3, 4), (4, 5, 7, 1)]))
  leaves, treedef = jax.tree_util.tree_flatten(ttm)
  assert len(leaves) == 2 and all(isinstance(x, jax.Array) for x in leaves)
  again = jax.tree_util.tree_unflatten(treedef, leaves)
  assert isinstance(again, tnjax.TTMatrix) and again.shape == (10, 21)
  doubled = jax.tree_util.tree_map(lambda c: 2 * c, ttm)
  np.testing.assert_allclose(ttm_full(doubled.cores), 4 * ttm_full(ttm.cores))


def test_passes_through_jit_with_static_properties(rng):
  tt = tnjax.TensorTrain.from_cores(_cores(rng, [(1, 4, 3), (3, 5, 1)]))
  seen = []

  @jax.jit
  def f(t):
    seen.append((t.dims, t.ranks))  # static under jit: plain ints
    return t

  out = f(tt)
  assert seen == [((4, 5), (1, 3, 1))]
  np.testing.assert_allclose(tt_full(out.cores), tt_full(tt.cores))


@pytest.mark.parametrize(
    "shapes, match",
    [
        ([], "cores is empty"),
        ([(1, 4, 3, 1)], r"cores\[0\].shape=\(1, 4, 3, 1\) but a 3-d core"),
        ([(2, 4, 1)], r"boundary ranks are \(2, 1\) but \(1, 1\)"),
        ([(1, 4, 3), (2, 5, 1)], r"cores\[0\].shape\[-1\]=3 but cores\[1\].shape\[0\]=2"),
    ],
)
def test_tensor_train_from_cores_errors(rng, shapes, match):
  with pytest.raises(ValueError, match=match):
    tnjax.TensorTrain.from_cores(_cores(rng, shapes))


def test_tt_matrix_from_cores_errors(rng):
  with pytest.raises(ValueError, match=r"TTMatrix.from_cores: cores\[1\].shape=\(3, 5, 1\) but a 4-d core"):
    tnjax.TTMatrix.from_cores(_cores(rng, [(1, 2, 2, 3), (3, 5, 1)]))
  mixed = [jnp.ones((1, 2, 2, 3), jnp.float32), jnp.ones((3, 2, 2, 1), jnp.float64)]
  with pytest.raises(ValueError, match="cores have dtypes .* but one dtype"):
    tnjax.TTMatrix.from_cores(mixed)
