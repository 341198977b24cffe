"""Test-wide JAX settings: float64 references, no silent broadcasting or dtype promotion, and little XLA
optimization: the tests run small programs, most of them once (eager ops compile one by one), so compiling is
most of their time; ``--xla_backend_optimization_level=0`` cut the suite's time by about a fifth. The results
are the same programs' (no fast math either way). Subprocesses given ``os.environ`` inherit it."""

import os

# Read when the CPU backend starts (the first computation), after this module runs.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def rng():
  return np.random.default_rng(0)
