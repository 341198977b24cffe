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


def time_in_jit(fn, arg_sets, repeats: int = 10) -> float:
  """Median seconds per call of ``fn`` over ``len(arg_sets)`` calls made inside one jitted function.

  Each call gets its own arguments (so nothing is cached between them) and all outputs are returned, so
  Python dispatch, which would otherwise dominate sub-millisecond kernels, is paid once per repeat.
  """
  many = jax.jit(lambda sets: [fn(*a) for a in sets])
  jax.block_until_ready(many(arg_sets))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(many(arg_sets))
    times.append(time.perf_counter() - start)
  return statistics.median(times) / len(arg_sets)


def fwd_bwd(f):
  """``f(p, x)`` with its VJP for cotangent ``g``: what a training step runs for one layer."""
  def run(p, x, g):
    y, vjp = jax.vjp(f, p, x)
    return y, vjp(g)
  return run


def time_steps(runner, tokens, steps: int, warmup: int = 2) -> float:
  """Median seconds of ``runner.step(i, tokens)`` (a Trainer or alike) over ``steps`` steps after ``warmup``."""
  for s in range(warmup):
    jax.block_until_ready(runner.step(s, tokens))
  times = []
  for s in range(warmup, warmup + steps):
    start = time.perf_counter()
    jax.block_until_ready(runner.step(s, tokens))
    times.append(time.perf_counter() - start)
  return statistics.median(times)
