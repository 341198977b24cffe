"""Shared benchmark plumbing: timing of jitted calls and JSON-lines records with the environment."""

import json
import platform
import statistics
import sys
import time

import jax


def environment() -> dict:
  dev = jax.devices()[0]
  return {
      "device": getattr(dev, "device_kind", str(dev)),
      "platform": dev.platform,
      "num_devices": jax.device_count(),
      "jax": jax.__version__,
      "python": platform.python_version(),
      "command": " ".join(sys.argv),
  }


def time_call(fn, *args, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time in seconds of ``fn(*args)``, waiting for the results."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def emit(record: dict, out=None) -> None:
  line = json.dumps(record)
  print(line, flush=True)
  if out is not None:
    with open(out, "a") as f:
      f.write(line + "\n")
