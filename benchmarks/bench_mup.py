"""muP learning-rate transfer: validation loss vs learning rate at three widths, standard vs muP, for dense,
TT-matrix and Block-TT GPTs and Llama-style models (``llama-*`` families: RMSNorm, SwiGLU, two query heads per
key/value head, ``d_ff = 3 d``, an untied head).

Byte-level language modelling (vocabulary 256, no tokenizer) on a text file, so any text works; every run
sees the same batches (seeded by step). For each family, parametrization and width, the learning rate is
swept on a grid of factor 2 and the validation loss after ``--steps`` steps is recorded. Under muP the best
learning rate should stay put as the width grows (the base width is the narrowest); under the standard
parametrization it drifts. Writes JSON lines and, with ``--plot``, the figure of ``docs/mup.md``.

Run: python benchmarks/bench_mup.py [--smoke] [--train FILE --valid FILE] [--out r.jsonl] [--plot mup.png]
"""

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from tnjax.data import SAMPLE_DIR
from tnjax.train import TrainConfig, Trainer

from _common import emit, environment

FAMILIES = {
    "dense": {},
    "ttm-mlp-r16": {n: {"kind": "ttm", "rank": 16} for n in ("mlp.c_fc", "mlp.c_proj")},
    "btt-all-r4": {n: {"kind": "btt", "rank": 4} for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")},
    "llama-dense": {},
    "llama-ttm-mlp-r16": {n: {"kind": "ttm", "rank": 16} for n in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
    "llama-btt-all-r4": {"*": {"kind": "btt", "rank": 4}},
}


def _model(family: str, width: int, args) -> tuple[str, dict]:
  """The preset and overrides of ``family`` at ``width``."""
  heads = width // args.head_dim
  if family.startswith("llama-"):
    return "llama-tiny", {"d_model": width, "n_head": heads, "n_kv_head": max(1, heads // 2), "d_ff": 3 * width,
                          "n_layer": args.layers, "tie_embeddings": False}
  return "tiny", {"d_model": width, "n_head": heads, "n_layer": args.layers}


def _bytes(path: str) -> np.ndarray:
  return np.frombuffer(open(path, "rb").read(), np.uint8).astype(np.uint16)


def run(family: str, parametrization: str, width: int, lr: float, args, train, vx, vy) -> float:
  model, overrides = _model(family, width, args)
  cfg = TrainConfig(model=model, model_overrides=overrides, layers=FAMILIES[family], block_size=args.block,
                    batch_size=args.batch, steps=args.steps, warmup=max(1, args.steps // 10), lr=lr, dtype=args.dtype,
                    parametrization=parametrization, mup_base_width=args.widths[0])
  trainer = Trainer(cfg, 256)
  for step in range(args.steps):
    trainer.step(step, train)
  losses = [float(trainer._eval(trainer.params, x, y)) for x, y in zip(vx, vy)]
  loss = float(np.mean(losses))
  return loss if math.isfinite(loss) else float("nan")


def plot(records: list[dict], path: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  families = list(dict.fromkeys(r["family"] for r in records))
  pars = list(dict.fromkeys(r["parametrization"] for r in records))
  fig = Figure(figsize=(4 * len(families), 3.2 * len(pars)))
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(pars), len(families), squeeze=False)
  for i, par in enumerate(pars):
    for j, family in enumerate(families):
      ax = axes[i][j]
      for width in sorted({r["width"] for r in records}):
        pts = sorted((r["lr"], r["val_loss"]) for r in records
                     if (r["family"], r["parametrization"], r["width"]) == (family, par, width))
        if pts:
          ax.plot(*zip(*pts), "o-", label=f"d_model {width}")
      ax.set_xscale("log", base=2)
      ax.set_title(f"{family}, {par}")
      ax.set_xlabel("learning rate")
      ax.set_ylabel("validation loss (nats/byte)")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--train", default=str(SAMPLE_DIR / "train.txt"))
  parser.add_argument("--valid", default=str(SAMPLE_DIR / "valid.txt"))
  parser.add_argument("--families", default=",".join(FAMILIES))
  parser.add_argument("--parametrizations", default="mup,standard")
  parser.add_argument("--widths", default="128,256,512")
  parser.add_argument("--lrs", default="0.001,0.002,0.004,0.008,0.016")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--head-dim", type=int, default=32)
  parser.add_argument("--block", type=int, default=128)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--out", default=None)
  parser.add_argument("--plot", default=None)
  args = parser.parse_args()
  if args.smoke:
    args.families, args.parametrizations, args.widths, args.lrs = "btt-all-r4,llama-btt-all-r4", "mup", "64,128", \
        "0.004"
    args.steps, args.layers, args.block, args.batch = 3, 1, 32, 4
  args.widths = [int(w) for w in args.widths.split(",")]
  env = environment()
  train, valid = _bytes(args.train), _bytes(args.valid).astype(np.int32)
  n = 8 * args.batch * args.block
  vx = jnp.asarray(valid[:n].reshape(8, args.batch, args.block))
  vy = jnp.asarray(valid[1:n + 1].reshape(8, args.batch, args.block))
  records = []
  print(f"# {env['device']} jax {env['jax']} {args.layers} layers, head_dim {args.head_dim}, {args.steps} steps of "
        f"{args.batch}x{args.block} bytes, base width {args.widths[0]}")
  for family in args.families.split(","):
    for par in args.parametrizations.split(","):
      for width in args.widths:
        row = []
        for lr in (float(v) for v in args.lrs.split(",")):
          start = time.perf_counter()
          loss = run(family, par, width, lr, args, train, vx, vy)
          row.append((lr, loss))
          record = {"bench": "mup", "family": family, "parametrization": par, "width": width, "lr": lr,
                    "val_loss": loss, "steps": args.steps, "layers": args.layers, "head_dim": args.head_dim,
                    "seconds": time.perf_counter() - start, **env}
          records.append(record)
          emit(record, args.out)
        best = min((v, lr) for lr, v in row if math.isfinite(v))
        print(f"{family:<12} {par:<9} d={width:<5} " + " ".join(f"{v:.3f}" for _, v in row) +
              f"  best lr {best[1]:g}", flush=True)
  if args.plot:
    plot(records, args.plot)


if __name__ == "__main__":
  with jax.numpy_dtype_promotion("standard"):
    main()
