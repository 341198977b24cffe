"""Which factorization is fast on this device? The SVDs and eigendecompositions that compression runs per
layer (`tnjax.compress`), timed at the shapes of a 12 x 768 GPT, float32.

Compression reads one SVD per layer (of ``W``, or of the whitened ``S^T W`` for SVD-LLM and the loss
allocation) and one eigendecomposition per input Gram (the whitening). On the H200 the study's compressions
took 6-46 s per method and size, no faster than the 2-core CPU; this benchmark says which piece is slow and
what replaces it:

* ``svd``: ``jnp.linalg.svd(w, full_matrices=False)`` (what `tnjax.compress` calls), with and without the
  vectors, and `jax.lax.linalg.svd` with each ``SvdAlgorithm`` the backend accepts;
* ``eigh``: ``jnp.linalg.eigh`` of the (in, in) input Gram (768 and 3072);
* ``gram_basis``: `tnjax.core.whitening.whitened_basis` (what `tnjax.compress` calls now): ``eigh`` of the
  smaller of ``w^T w`` and ``w w^T`` (a QR for a wide ``w``); float32 squares the condition number, so the
  relative error of the kept half's singular values and the excess error of the rank-k/2 projection
  ``w V_k V_k^T`` over the optimum are reported;
* ``whitened_basis`` / ``whitened_svd_old``: SVD-LLM's per-layer work with an input Gram, by that route and by
  the SVD of the whitened matrix it replaced;
* ``batched``: ``jnp.linalg.svd`` over the 12 same-shape layers stacked, per layer.

Each time is the median of ``--repeats`` calls of one jitted function (compile excluded). One JSON line per
shape and method with seconds and the ratio to ``jnp.linalg.svd``; the "layer" column names the projection.

Run: python benchmarks/bench_factorize.py [--smoke] [--out results.jsonl]
"""

import argparse

import jax
import jax.numpy as jnp

from tnjax.core.whitening import whiten, whitened_basis

from _common import emit, environment, time_call

GPT2 = {"attn.c_attn": (768, 2304), "attn.c_proj": (768, 768), "mlp.c_fc": (768, 3072), "mlp.c_proj": (3072, 768)}


# Llama-3.1-8B's projections (in, out): q/o, k/v, gate/up, down.
LLAMA_8B = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "gate_proj": (4096, 14336), "down_proj": (14336, 4096)}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true", help="small shapes on any backend, in seconds")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--layers", type=int, default=12, help="layers stacked for the batched SVD")
  parser.add_argument("--shapes", choices=["gpt2", "llama-3.1-8b"], default="gpt2")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  shapes = {"small": (48, 96), "small.t": (96, 48)} if args.smoke else (
      GPT2 if args.shapes == "gpt2" else LLAMA_8B)
  layers = 2 if args.smoke else args.layers
  big = max(max(v) for v in shapes.values()) > 4096  # no stacked SVDs nor per-algorithm runs at 8B sizes
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
        "gram_basis": jax.jit(whitened_basis),
        "whitened_basis": (jax.jit(whitened_basis), w, gram),
        "whitened_svd_old": (jax.jit(lambda w, g: jnp.linalg.svd(whiten(w, g), full_matrices=False)), w, gram),
    }
    if not big:
      cases["batched"] = (jax.jit(jax.vmap(lambda w: jnp.linalg.svd(w, full_matrices=False))),
                          jnp.stack([w * (1 + i) for i in range(layers)]))
    for alg in [] if big else algorithms:
      cases[f"svd_{alg.lower()}"] = jax.jit(lambda w, a=alg: jax.lax.linalg.svd(
          w, full_matrices=False, algorithm=jax.lax.linalg.SvdAlgorithm[a]))
    times = {}
    for label, case in cases.items():
      fn, *arg = case if isinstance(case, tuple) else (case, w)
      try:
        secs = time_call(fn, *arg, repeats=args.repeats)
      except Exception as e:  # an algorithm this backend does not implement
        emit({"bench": "factorize", "layer": name, "shape": [m, n], "method": label, "error": str(e)[:200], **env},
             args.out)
        continue
      times[label] = secs / (layers if label == "batched" else 1)
      err = excess = None
      k = min(m, n) // 2  # the kept half
      if label in ("svd", "gram_basis") or label.startswith("svd_"):
        out = fn(*arg)
        s = {"gram_basis": lambda o: o[0], "svd_values": lambda o: o}.get(label, lambda o: o[1])(out)
        err = float(jnp.max(jnp.abs(s[:k] - s_true[:k]) / s_true[:k]))  # of the kept singular values
      if label in ("svd", "gram_basis"):
        vt = out[-1][:k]
        best = jnp.sqrt(jnp.sum(s_true[k:] ** 2))
        excess = float(jnp.linalg.norm(w - (w @ vt.T) @ vt) / best - 1)  # the rank-k fit's error over the optimum
      emit({"bench": "factorize", "layer": name, "shape": [m, n], "method": label, "seconds": times[label],
            "vs_svd": times[label] / times["svd"], "kept_half_sv_rel_err": err, "rank_half_excess_err": excess,
            **env}, args.out)
    table.append((name, times))
  methods = list(dict.fromkeys(k for _, t in table for k in t))
  print("| layer | " + " | ".join(f"{k} (x svd)" for k in methods) + " |")
  for name, t in table:
    print(f"| {name} | " + " | ".join(f"{t[k] / t['svd']:.2f}" if k in t else "-" for k in methods) + " |")


if __name__ == "__main__":
  main()
