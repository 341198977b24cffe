"""Training throughput: tokens/s of one jitted AdamW step, dense GPT-2 vs TTM-tensorized GPT-2.

Uses tnjax.train.Trainer (the same step ``tnjax train`` runs) on random
tokens, so no corpus is needed. Ratios are against the dense model in the
same run.

Run: python benchmarks/bench_train_step.py [--smoke] [--attention cudnn] [--out results.jsonl]
"""

import argparse
import time

import jax
import numpy as np

from tnjax.train import TrainConfig, Trainer

from _common import emit, environment


def _ttm(rank, names):
  return {n: {"kind": "ttm", "rank": rank} for n in names}


MLP = ("mlp.c_fc", "mlp.c_proj")
ALL = ("attn.c_attn", "attn.c_proj") + MLP


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--attention", default=None, help="jax.nn.dot_product_attention implementation, e.g. cudnn")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  env = environment()
  if args.smoke:
    model, batch, block, dtype, vocab = "tiny", 4, 64, "float32", 512
    variants = {"dense": {}, "ttm-mlp-r8": _ttm(8, MLP)}
  else:
    model, batch, block, dtype, vocab = "gpt2", 16, 1024, "bfloat16", 50257
    variants = {"dense": {}, "ttm-mlp-r64": _ttm(64, MLP), "ttm-mlp-r16": _ttm(16, MLP),
                "ttm-all-r64": _ttm(64, ALL), "ttm-all-r16": _ttm(16, ALL)}
  tokens = np.random.default_rng(0).integers(0, vocab, 2_000_000).astype(np.uint16)
  print(f"# {env['device']} jax {env['jax']} {model} batch {batch}x{block} {dtype} attention={args.attention}")
  print(f"{'variant':<14} {'params':>12} {'step ms':>9} {'tokens/s':>11} {'vs dense':>9}")
  base = None
  for name, layers in variants.items():
    cfg = TrainConfig(model=model, layers=layers, batch_size=batch, block_size=block, dtype=dtype,
                      model_overrides={"attention_impl": args.attention}, steps=1000, warmup=10)
    trainer = Trainer(cfg, vocab)
    for s in range(2):
      jax.block_until_ready(trainer.step(s, tokens))
    times = []
    for s in range(2, 2 + args.steps):
      start = time.perf_counter()
      jax.block_until_ready(trainer.step(s, tokens))
      times.append(time.perf_counter() - start)
    sec = float(np.median(times))
    rate = batch * block / sec
    base = base or rate
    print(f"{name:<14} {trainer.num_params:>12,d} {sec * 1e3:>9.2f} {rate:>11,.0f} {rate / base:>8.2f}x")
    emit({"bench": "train_step", "variant": name, "model": model, "batch": batch, "block": block, "dtype": dtype,
          "attention": args.attention, "params": trainer.num_params, "step_seconds": sec, "tokens_per_s": rate,
          "ratio_vs_dense": rate / base, **env}, args.out)


if __name__ == "__main__":
  main()
