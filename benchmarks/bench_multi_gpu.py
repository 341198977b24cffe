"""Multi-device scaling of the ``tnjax train`` step: one device vs data parallel vs FSDP, same per-device batch.

Each configuration runs in its own process (``CUDA_VISIBLE_DEVICES`` picks the devices before JAX starts).
Scaling efficiency = tokens/s on n devices / (n x tokens/s on one device). Random tokens, bf16, cuDNN
attention on GPUs.

Run: python benchmarks/bench_multi_gpu.py [--smoke] [--models gpt2,gpt2-medium] [--out results.jsonl]
"""

import argparse
import json
import os
import subprocess
import sys

VARIANTS = {"dense": {}, "btt-all-r2": {n: {"kind": "btt", "rank": 2}
                                       for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}}


def worker(args) -> None:
  import jax
  import numpy as np

  from tnjax.train import TrainConfig, Trainer

  from _common import time_steps

  n = jax.device_count()
  cfg = TrainConfig(model=args.model, layers=VARIANTS[args.variant], batch_size=args.per_device * n,
                    block_size=args.block, dtype=args.dtype, fsdp=args.fsdp, steps=1000, warmup=10,
                    model_overrides={"attention_impl": args.attention})
  trainer = Trainer(cfg, args.vocab)
  tokens = np.random.default_rng(0).integers(0, args.vocab, 4_000_000).astype(np.uint16)
  sec = time_steps(trainer, tokens, args.steps)
  print(json.dumps({"devices": n, "params": trainer.num_params, "step_seconds": sec,
                    "tokens_per_s": cfg.batch_size * cfg.block_size / sec, "device": jax.devices()[0].device_kind,
                    "jax": jax.__version__}))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--models", default="gpt2,gpt2-medium")
  parser.add_argument("--variants", default="dense,btt-all-r2")
  parser.add_argument("--per-device", type=int, default=8)
  parser.add_argument("--block", type=int, default=1024)
  parser.add_argument("--vocab", type=int, default=50257)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--attention", default="cudnn")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--out", default=None)
  # worker-only
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--model", help=argparse.SUPPRESS)
  parser.add_argument("--variant", help=argparse.SUPPRESS)
  parser.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args)
    return
  env = dict(os.environ)
  if args.smoke:
    args.models, args.variants, args.per_device, args.block, args.vocab = "tiny", "dense", 2, 32, 512
    args.dtype, args.attention, args.steps = "float32", "xla", 2
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "0,1").split(",") if d]
  print(f"{'model':<12} {'variant':<11} {'mode':<6} {'devices':>7} {'tokens/s':>11} {'scaling':>8}")
  failed = 0
  for model in args.models.split(","):
    for variant in args.variants.split(","):
      base = None
      for mode, devices in (("single", 1), ("dp", len(visible)), ("fsdp", len(visible))):
        cmd = [sys.executable, __file__, "--worker", "--model", model, "--variant", variant, "--per-device",
               str(args.per_device), "--block", str(args.block), "--vocab", str(args.vocab), "--dtype", args.dtype,
               "--attention", args.attention, "--steps", str(args.steps)] + (["--fsdp"] if mode == "fsdp" else [])
        worker_env = dict(env)
        if args.smoke:
          worker_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        else:
          worker_env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[:devices])
        out = subprocess.run(cmd, env=worker_env, capture_output=True, text=True)
        if out.returncode:
          print(f"{model:<12} {variant:<11} {mode:<6} failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
          failed += 1
          continue
        record = json.loads(out.stdout.strip().splitlines()[-1])
        base = record["tokens_per_s"] if mode == "single" else base
        scaling = record["tokens_per_s"] / (record["devices"] * base) if base else None
        shown = f"{scaling:>7.0%}" if scaling else f"{'-':>8}"
        print(f"{model:<12} {variant:<11} {mode:<6} {record['devices']:>7} {record['tokens_per_s']:>11,.0f} {shown}",
              flush=True)
        line = json.dumps({"bench": "multi_gpu", "model": model, "variant": variant, "mode": mode,
                           "per_device_batch": args.per_device, "block": args.block, "scaling": scaling,
                           "command": " ".join(sys.argv), **record})
        if args.out:
          with open(args.out, "a") as f:
            f.write(line + "\n")
  if failed:
    raise SystemExit(f"bench_multi_gpu: {failed} configuration(s) failed")


if __name__ == "__main__":
  main()
