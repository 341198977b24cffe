"""Train on several devices: data parallel, and FSDP (parameters and optimizer state sharded too).

  python examples/multi_gpu.py                 # every visible GPU
  python examples/multi_gpu.py --smoke         # 2 fake CPU devices (XLA_FLAGS), seconds

tnjax.train puts all visible devices in one mesh axis "data": batches are
split over it, and with fsdp=True each parameter is split along its largest
divisible axis. Both give the same losses as one device (tested).
"""

import argparse
import os
import sys

if "--smoke" in sys.argv:  # must happen before jax is imported
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tnjax.train import TrainConfig, Trainer  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args(argv)
  n = jax.device_count()
  print(f"{n} devices: {[d.device_kind for d in jax.devices()]}")
  tokens = np.random.default_rng(0).integers(0, 512, 100_000).astype(np.uint16)
  for fsdp in (False, True):
    cfg = TrainConfig(layers={"mlp.c_fc": {"kind": "ttm", "rank": 8}}, batch_size=4 * n, block_size=64, fsdp=fsdp,
                      steps=args.steps, warmup=1)
    trainer = Trainer(cfg, vocab_size=512)
    losses = [float(trainer.step(step, tokens)[0]) for step in range(args.steps)]
    name, param = max(trainer.params.items(), key=lambda kv: kv[1].size)
    print(f"fsdp={fsdp!s:<5} losses {losses[0]:.3f} -> {losses[-1]:.3f}; largest parameter {name} "
          f"{param.shape} is sharded as {param.sharding.spec}")


if __name__ == "__main__":
  with jax.numpy_dtype_promotion("standard"):
    main()
