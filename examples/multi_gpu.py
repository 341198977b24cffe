"""Train on several devices: data parallel, FSDP (parameters and optimizer state sharded too), and FSDP with
tensor parallelism over a second mesh axis.

  python examples/multi_gpu.py                 # every visible GPU
  python examples/multi_gpu.py --smoke         # 2 fake CPU devices (XLA_FLAGS), seconds

tnjax.train puts the visible devices in a mesh ("data", or "data" x "model")
and places each parameter by rules over its logical axes (tnjax.train.sharding):
batches are split over "data"; sharding="fsdp" splits each parameter too, and
"fsdp_tp" splits the MLP, attention-head and vocabulary dimensions over
"model". All give the same losses as one device (tested on CPU devices).
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
  tp = 2 if n % 2 == 0 else 1  # two-way tensor parallel where the devices allow
  for sharding, mesh_shape in (("data", None), ("fsdp", None), ("fsdp_tp", [n // tp, tp])):
    cfg = TrainConfig(layers={"mlp.c_fc": {"kind": "ttm", "rank": 8}}, batch_size=4 * n, block_size=64,
                      sharding=sharding, mesh_shape=mesh_shape, steps=args.steps, warmup=1)
    trainer = Trainer(cfg, vocab_size=512)
    losses = [float(trainer.step(step, tokens)[0]) for step in range(args.steps)]
    name, param = max(trainer.params.items(), key=lambda kv: kv[1].size)
    print(f"{sharding:<8} mesh {dict(trainer.mesh.shape)} losses {losses[0]:.3f} -> {losses[-1]:.3f}; largest "
          f"parameter {name} {param.shape} is sharded as {param.sharding.spec}")


if __name__ == "__main__":
  with jax.numpy_dtype_promotion("standard"):
    main()
