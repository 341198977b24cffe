"""Pre-train a GPT whose MLPs are TT-matrices, next to the dense GPT of the same shape, and compare.

  python examples/pretrain_ttm.py --smoke            # tiny models on the packaged sample, CPU, about a minute
  python examples/pretrain_ttm.py --corpus           # the 6-layer GPTs of examples/configs (GPU)

Each run is an ordinary ``tnjax train`` run (checkpoints, report.md, loss.png in its directory).
"""

import argparse
import pathlib
import tempfile

from tnjax.train import TrainConfig, resolve, train

TTM = {"kind": "ttm", "rank": 16}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--corpus", action="store_true", help="use examples/configs/corpus_{dense,ttm48}.toml")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out or tempfile.mkdtemp())
  if args.corpus:
    configs = {name: resolve(f"examples/configs/corpus_{name}.toml", [f"out_dir={out / name}"])
               for name in ("dense", "ttm48")}
  else:
    steps = 20 if args.smoke else 400
    base = dict(steps=steps, warmup=min(20, steps // 4), eval_every=steps, log_every=10, batch_size=8)
    configs = {"dense": TrainConfig(layers={}, out_dir=str(out / "dense"), **base),
               "ttm-mlp": TrainConfig(layers={"mlp.c_fc": TTM, "mlp.c_proj": TTM}, out_dir=str(out / "ttm"), **base)}
  reports = {name: train(cfg, progress=not args.smoke) for name, cfg in configs.items()}
  print(f"{'model':<10} {'params':>12} {'val ppl':>9} {'tokens/s':>10}")
  for name, r in reports.items():
    print(f"{name:<10} {r['parameters']:>12,} {r['best_val_perplexity']:>9.2f} {r['tokens_per_s'] or 0:>10,.0f}")


if __name__ == "__main__":
  main()
