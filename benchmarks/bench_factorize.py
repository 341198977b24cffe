"""Which factorization is fast on this device? The SVDs and eigendecompositions that compression runs per
layer (`tnjax.compress`), timed at the shapes of a 12 x 768 GPT, float32.

Compression reads one SVD per layer (of ``W``, or of the whitened ``S^T W`` for SVD-LLM and the loss
allocation) and one eigendecomposition per input Gram (the whitening). On the H200 the study's compressions
took 6-46 s per method and size, no faster than the 2-core CPU; this benchmark says which piece is slow and
what replaces it:

* ``svd``: ``jnp.linalg.svd(w, full_matrices=False)`` (what `tnjax.compress` calls), with and without the
  vectors, and `jax.lax.linalg.svd` with each ``SvdAlgorithm`` the backend accepts;
* ``eigh``: ``jnp.linalg.eigh`` of the (in, in) input Gram (768 and 3072);
* ``gram_svd``: the SVD from ``eigh(w w^T)`` (the smaller side), ``V^T = diag(1/s) U^T w``; float32 squares
  the condition number, so its relative error on the kept singular values is reported too;
* ``batched``: ``jnp.linalg.svd`` over the 12 same-shape layers stacked, per layer.

Each time is the median of ``--repeats`` calls of one jitted function (compile excluded). One JSON line per
shape and method with seconds and the ratio to ``jnp.linalg.svd``; the "layer" column names the projection.

Run: python benchmarks/bench_factorize.py [--smoke] [--out results.jsonl]
"""

import argparse

import jax
import jax.numpy as jnp

from _common import emit, environment, time_call

SHAPES = {"attn.c_attn": (768, 2304), "attn.c_proj": (768, 768), "mlp.c_fc": (768, 3072), "mlp.c_proj": (3072, 768)}


def gram_svd(w):
  """SVD of ``w`` from the eigendecomposition of its smaller Gram: (s, vt) with ``vt`` (k, n)."""
  t = w.shape[0] > w.shape[1]
  a = w.T if t else w  # (k, n), k <= n
  lam, u = jnp.linalg.eigh(a @ a.T)
  lam, u = lam[::-1], u[:, ::-1]
  s = jnp.sqrt(jnp.maximum(lam, 0.0))
  vt = (u.T @ a) / jnp.maximum(s, 1e-30)[:, None]
  return s, (u.T if t else vt)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true", help="small shapes on any backend, in seconds")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--layers", type=int, default=12, help="layers stacked for the batched SVD")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  shapes = {"small": (48, 96), "small.t": (96, 48)} if args.smoke else SHAPES
  layers = 2 if args.smoke else args.layers
  env = environment()
  table = []
  algorithms = [a for a in jax.lax.linalg.SvdAlgorithm.__members__ if a != "DEFAULT"]
  for name, (m, n) in shapes.items():
    key = jax.random.key(0)
    # a trained-weight-like spectrum: singular values falling over three decades
    u, _ = jnp.linalg.qr(jax.random.normal(key, (m, min(m, n))))
    v, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (n, min(m, n))))
    s_true = jnp.logspace(0, -3, min(m, n))
    w = (u * s_true) @ v.T
    x = jax.random.normal(jax.random.key(2), (4 * m, m))
    gram = x.T @ x
    cases = {
        "svd": jax.jit(lambda w: jnp.linalg.svd(w, full_matrices=False)),
        "svd_values": jax.jit(lambda w: jnp.linalg.svd(w, compute_uv=False)),
        "eigh_gram": (jax.jit(jnp.linalg.eigh), gram),
        "gram_svd": jax.jit(gram_svd),
        "batched": (jax.jit(jax.vmap(lambda w: jnp.linalg.svd(w, full_matrices=False))),
                    jnp.stack([w * (1 + i) for i in range(layers)])),
    }
    for alg in algorithms:
      cases[f"svd_{alg.lower()}"] = jax.jit(lambda w, a=alg: jax.lax.linalg.svd(
          w, full_matrices=False, algorithm=jax.lax.linalg.SvdAlgorithm[a]))
    times = {}
    for label, case in cases.items():
      fn, arg = case if isinstance(case, tuple) else (case, w)
      try:
        secs = time_call(fn, arg, repeats=args.repeats)
      except Exception as e:  # an algorithm this backend does not implement
        emit({"bench": "factorize", "layer": name, "shape": [m, n], "method": label, "error": str(e)[:200], **env},
             args.out)
        continue
      times[label] = secs / (layers if label == "batched" else 1)
      err = None
      if label in ("svd", "gram_svd") or label.startswith("svd_"):
        out = fn(arg)
        s = {"gram_svd": lambda o: o[0], "svd_values": lambda o: o}.get(label, lambda o: o[1])(out)
        k = min(m, n) // 2  # the kept half: relative error of its singular values
        err = float(jnp.max(jnp.abs(s[:k] - s_true[:k]) / s_true[:k]))
      emit({"bench": "factorize", "layer": name, "shape": [m, n], "method": label, "seconds": times[label],
            "vs_svd": times[label] / times["svd"], "kept_half_sv_rel_err": err, **env}, args.out)
    table.append((name, times))
  methods = list(dict.fromkeys(k for _, t in table for k in t))
  print("| layer | " + " | ".join(f"{k} (x svd)" for k in methods) + " |")
  for name, t in table:
    print(f"| {name} | " + " | ".join(f"{t[k] / t['svd']:.2f}" if k in t else "-" for k in methods) + " |")


if __name__ == "__main__":
  main()
