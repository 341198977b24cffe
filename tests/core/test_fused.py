"""The Pallas kernels of tnjax.core.contraction.fused, run through the Pallas interpreter (CPU CI) against
float64 NumPy.

On a GPU the same kernels are compiled through Triton; benchmarks/bench_ttm_linear.py checks them there
against a float32 reference before timing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tnjax
from tests.core.reference import ttm_full
from tnjax.core import contraction as L
from tnjax.core.contraction import fused as F

LAYOUTS = [
    ((16, 32), (32, 16), 3),  # one slab per mode, rank padded 3 -> 4
    ((16, 48), (192, 16), 8),  # GPT-2 up projection (fused_dims(768, 3072)): 3 b slabs, 3 p slabs
    ((192, 16), (16, 48), 5),  # a transposed layout: 12 a slabs, 3 q slabs, rank padded to 8
    ((4, 16), (16, 4), 4),  # a and q slabs of 4, widened to 16 by the rank
]


def _case(rng, in_dims, out_dims, rank, tokens):
  w = tnjax.random_ttm(jax.random.key(int(rng.integers(1 << 30))), in_dims, out_dims, rank, dtype=jnp.float32)
  x = rng.standard_normal((tokens, w.shape[0])).astype(np.float32)
  g = rng.standard_normal((tokens, w.shape[1])).astype(np.float32)
  return w, x, g


# token counts: the few-token forward without padding (1, 4) and padded (21), the many-token one (300)
@pytest.mark.parametrize("layout, tokens", [(0, 1), (0, 300), pytest.param(1, 4, marks=pytest.mark.slow),
                                           pytest.param(2, 21, marks=pytest.mark.slow), (3, 1)])
def test_forward_and_gradients_equal_float64_reference(rng, layout, tokens):
  in_dims, out_dims, rank = LAYOUTS[layout]
  w, x, g = _case(rng, in_dims, out_dims, rank, tokens)
  full = ttm_full([np.asarray(c, np.float64) for c in w.cores])
  x64, g64 = x.astype(np.float64), g.astype(np.float64)
  y = jax.jit(lambda w, x: F.matvec_fused(w, x, interpret=True))(w, x)
  np.testing.assert_allclose(y, x64 @ full, rtol=1e-4, atol=1e-4 * np.abs(x64 @ full).max())
  loss = lambda w, x: jnp.sum(F.matvec_fused(w, x, interpret=True, backward_programs=3) * g)
  dw, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, x)
  np.testing.assert_allclose(dx, g64 @ full.T, rtol=1e-4, atol=1e-4 * np.abs(g64 @ full.T).max())
  # core gradients: project dW = x^T g through the reconstruction, in float64
  w64 = jax.tree_util.tree_map(lambda c: jnp.asarray(c, jnp.float64), w)  # conftest enables float64
  _, project = jax.vjp(tnjax.to_dense, w64)
  (ref,) = project(jnp.asarray(x64.T @ g64))
  for got, want in zip(dw.cores, ref.cores):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(np.asarray(want)).max())


@pytest.mark.slow  # GPT-2-sized kernels in Pallas interpret mode on CPU
def test_batch_shapes_bfloat16_and_linear_path(rng):
  w, x, _ = _case(rng, (16, 48), (192, 16), 8, 6)
  x3 = x.reshape(2, 3, 768)
  y = F.matvec_fused(w, x3, interpret=True)
  assert y.shape == (2, 3, 3072)
  full = ttm_full([np.asarray(c, np.float64) for c in w.cores])
  ref = x3.astype(np.float64) @ full
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  wb = jax.tree_util.tree_map(lambda c: c.astype(jnp.bfloat16), w)
  yb = F.matvec_fused(wb, x3.astype(jnp.bfloat16), interpret=True)
  assert yb.dtype == jnp.bfloat16
  assert np.linalg.norm(np.asarray(yb, np.float64) - ref) / np.linalg.norm(ref) < 1e-2
  # path="fused" off a GPU falls back to the cost model's pure-JAX choice, with equal results
  np.testing.assert_allclose(L.linear(w, x, path="fused"), L.linear(w, x, path="auto"), rtol=1e-6)


def test_supported_layouts_and_dims():
  assert F.fused_dims(768, 3072) == ((16, 48), (192, 16))
  assert F.fused_dims(3072, 768) == ((16, 192), (48, 16))
  assert F.fused_supported(tnjax.random_ttm(jax.random.key(0), *F.fused_dims(512, 2048), rank=16))
  assert not F.fused_supported(tnjax.random_ttm(jax.random.key(0), (16, 48), (192, 16), rank=17))
  assert not F.fused_supported(tnjax.random_ttm(jax.random.key(0), (8, 8, 12), (12, 16, 16), rank=4))
  assert not F.fused_supported(tnjax.random_ttm(jax.random.key(0), (12, 64), (64, 12), rank=2))
  assert F.fused_supported(tnjax.random_ttm(jax.random.key(0), (12, 64), (64, 12), rank=8))  # rank widens 4 to 32


def test_errors():
  w = tnjax.random_ttm(jax.random.key(0), (16, 48), (192, 16), rank=8)
  x = jnp.ones((2, 768))
  with pytest.raises(ValueError, match=r"matvec_fused: the fused kernel takes a two-core TTMatrix"):
    F.matvec_fused(tnjax.random_ttm(jax.random.key(0), (4, 4, 4), (4, 4, 4), rank=2), jnp.ones((1, 64)))
  with pytest.raises(ValueError, match=r"matvec_fused: rank 32 but at most 16 is supported"):
    F.matvec_fused(tnjax.random_ttm(jax.random.key(0), (16, 48), (192, 16), rank=32), x)
  with pytest.raises(ValueError, match=r"matvec_fused: in_dims\[0\]=12 but a multiple of 8 is needed"):
    F.matvec_fused(tnjax.random_ttm(jax.random.key(0), (12, 64), (64, 12), rank=2), jnp.ones((1, 768)))
  with pytest.raises(ValueError, match=r"matvec_fused: block_tokens=3 but a power of two >= 1 is expected"):
    F.matvec_fused(w, x, block_tokens=3)
  with pytest.raises(ValueError, match=r"matvec_fused: x.shape\[-1\]=5 but prod\(in_dims\)=768"):
    F.matvec_fused(w, jnp.ones((2, 5)))
  with pytest.raises(ValueError, match=r"fused_dims: in_features=100 but a multiple of 256 is needed"):
    F.fused_dims(100, 256)


@pytest.mark.slow  # tests/core/test_plan.py checks the fused_fwd plan against float64 by default
@pytest.mark.parametrize("layout, tokens", [(1, 37), (2, 5)])
def test_fused_forward_with_dense_backward_equals_float64_reference(rng, layout, tokens):
  """backward="dense" (path "fused_fwd"): the kernel forward, the rebuild-W backward."""
  in_dims, out_dims, rank = LAYOUTS[layout]
  w, x, g = _case(rng, in_dims, out_dims, rank, tokens)
  full = ttm_full([np.asarray(c, np.float64) for c in w.cores])
  x64, g64 = x.astype(np.float64), g.astype(np.float64)
  loss = lambda w, x: jnp.sum(F.matvec_fused(w, x, interpret=True, backward="dense") * g)
  value, (dw, dx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(w, x)
  np.testing.assert_allclose(value, np.sum((x64 @ full) * g64), rtol=1e-4)
  np.testing.assert_allclose(dx, g64 @ full.T, rtol=1e-4, atol=1e-4 * np.abs(g64 @ full.T).max())
  w64 = jax.tree_util.tree_map(lambda c: jnp.asarray(c, jnp.float64), w)
  _, project = jax.vjp(tnjax.to_dense, w64)
  (ref,) = project(jnp.asarray(x64.T @ g64))
  for got, want in zip(dw.cores, ref.cores):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(np.asarray(want)).max())
  with pytest.raises(ValueError, match="backward='fast' but one of"):
    F.matvec_fused(w, x, interpret=True, backward="fast")
  # off a GPU the path falls back to "auto", and says why
  with pytest.warns(UserWarning, match=r"path='fused_fwd' falls back to 'auto': the default backend is 'cpu'"):
    y = L.linear(w, x, path="fused_fwd")
  np.testing.assert_allclose(y, L.linear(w, x, path="auto"), rtol=1e-6)
  three = tnjax.random_ttm(jax.random.key(0), (4, 4, 4), (4, 4, 4), rank=2)
  with pytest.warns(UserWarning, match="falls back to 'auto': the fused kernel takes a two-core TTMatrix"):
    L.linear(three, jnp.ones((2, 64), jnp.float32), path="fused")
