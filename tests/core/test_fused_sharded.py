"""The fused TT-matrix kernels under a device mesh (tnjax.core.contraction.fused.row_axes): on 4 forced CPU devices
(a subprocess) and in the Pallas interpreter, each device runs the kernels on its own token rows inside
``jax.shard_map``; forward and gradients equal the unsharded kernels' and a float64 reference."""

import json
import os
import pathlib
import subprocess
import sys

import jax
from jax.sharding import AxisType

from tnjax.core.contraction.fused import row_axes

ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
import tnjax
from tnjax.core.contraction import fused as F

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
assert jax.device_count() == 4, jax.devices()


def pallas_rows(jaxpr, inside=False):
  # (inside a shard_map?, rows of x) of every pallas_call in a jaxpr, nested ones included
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      found.append((inside, eqn.invars[0].aval.shape[0]))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += pallas_rows(sub, inside or eqn.primitive.name == "shard_map")
  return found


out = []
for mesh_shape, tokens, how in json.loads(sys.argv[1]):
  names = ("data", "model")[:len(mesh_shape)]
  mesh = jax.make_mesh(tuple(mesh_shape), names, axis_types=(AxisType.Auto,) * len(names))
  rng = np.random.default_rng(0)
  w = tnjax.random_ttm(jax.random.key(1), (16, 32), (32, 16), 3, dtype=jnp.float32)
  x = rng.standard_normal((tokens, 512)).astype(np.float32)
  g = rng.standard_normal((tokens, 512)).astype(np.float32)
  if how == "matvec":  # the front door's fused plan: the forward kernel and the two backward kernels
    f = lambda w, x: tnjax.matvec(w, x, path="fused", interpret=True)
  else:
    f = lambda w, x: F.matvec_fused(w, x, interpret=True, backward=how, backward_programs=3)
  loss = lambda w, x: jnp.sum(f(w, x) * g)
  run = jax.jit(lambda w, x: (f(w, x), jax.grad(loss, argnums=(0, 1))(w, x)))
  y0, (dw0, dx0) = run(w, x)  # no mesh: one call on one device
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P(names[0])))
    y1, (dw1, dx1) = run(w, xs)
    calls = pallas_rows(jax.make_jaxpr(run)(w, xs).jaxpr)
    axes = list(F.row_axes(tokens))
  full = np.asarray(tnjax.to_dense(jax.tree_util.tree_map(lambda c: jnp.asarray(c, jnp.float64), w)))
  x64, g64 = x.astype(np.float64), g.astype(np.float64)
  w64 = jax.tree_util.tree_map(lambda c: jnp.asarray(c, jnp.float64), w)
  _, project = jax.vjp(tnjax.to_dense, w64)
  (ref,) = project(jnp.asarray(x64.T @ g64))
  scale = lambda a: float(np.abs(np.asarray(a)).max())
  err = lambda a, b: float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
  out.append({
      "calls": calls, "row_axes": axes,
      "vs_unsharded": [err(y1, y0) / scale(y0), err(dx1, dx0) / scale(dx0)]
                      + [err(a, b) / scale(b) for a, b in zip(dw1.cores, dw0.cores)],
      "vs_float64": [err(y1, x64 @ full) / scale(x64 @ full), err(dx1, g64 @ full.T) / scale(g64 @ full.T)]
                    + [err(a, b) / scale(b) for a, b in zip(dw1.cores, ref.cores)],
      "sharding": str(y1.sharding.spec),
  })
print("RESULT" + json.dumps(out))
"""


def _run(cases):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"}
  r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases)], env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.split("RESULT", 1)[1])


def _check(res, local_rows):
  # every kernel call (forward, and the two backward kernels) runs inside shard_map on one device's rows (the
  # backward kernels pad them to whole token blocks of 4)
  padded = -(-local_rows // 4) * 4
  assert res["calls"] and all(inside and rows in (local_rows, padded) for inside, rows in res["calls"]), res["calls"]
  assert max(res["vs_unsharded"]) < 1e-5, res
  assert max(res["vs_float64"]) < 1e-4, res


def test_fused_kernels_run_on_each_devices_rows_and_match_unsharded():
  # 64 rows over a 2 x 2 mesh: 16 per device (the many-token forward); the kernels' own backward, and the
  # rebuild-W backward; 12 rows over 4: 3 per device (the few-token forward); 6 rows over 2 x 2: "model" (4)
  # does not divide 6 after "data", so 3 per device, split over "data" only
  results = _run([[[2, 2], 64, "kernels"], [[2, 2], 64, "dense"], [[4], 12, "kernels"], [[2, 2], 6, "matvec"]])
  kernels, dense, few, partial = results
  _check(kernels, 16)
  assert kernels["row_axes"] == ["data", "model"]
  assert dense["vs_unsharded"] and max(dense["vs_unsharded"]) < 1e-5 and max(dense["vs_float64"]) < 1e-4
  assert dense["calls"] and all(inside and rows == 16 for inside, rows in dense["calls"])  # the forward only
  _check(few, 3)
  _check(partial, 3)
  assert partial["row_axes"] == ["data"]


def test_row_axes_reads_the_ambient_mesh():
  assert row_axes(64) == ()  # no mesh
  mesh = jax.sharding.AbstractMesh((2, 3), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
  with jax.sharding.use_abstract_mesh(mesh):
    assert row_axes(12) == ("data", "model")
    assert row_axes(4) == ("data",)
    assert row_axes(9) == ("model",)  # "data" does not divide 9, "model" does
    assert row_axes(5) == ()
  manual = jax.sharding.AbstractMesh((2, 3), ("data", "model"), axis_types=(AxisType.Manual, AxisType.Auto))
  with jax.sharding.use_abstract_mesh(manual):
    assert row_axes(12) == ("model",)  # inside a shard_map over "data", its rows are already one device's

