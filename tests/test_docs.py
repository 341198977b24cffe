"""Docstring examples and the README's Python block run as written."""

import doctest
import importlib
import pathlib
import re

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = ["tnjax.core.decompositions", "tnjax.core.ops", "tnjax.core.initializers", "tnjax.core.shapes",
           "tnjax.nn.layers", "tnjax.nn.quant", "tnjax.models.gpt", "tnjax.compress.methods"]


@pytest.fixture
def default_jax_config():
  """Docs are read by users with default settings: float32, standard promotion."""
  saved = {k: getattr(jax.config, k) for k in ("jax_enable_x64", "jax_numpy_rank_promotion",
                                                 "jax_numpy_dtype_promotion")}
  jax.config.update("jax_enable_x64", False)
  jax.config.update("jax_numpy_rank_promotion", "allow")
  jax.config.update("jax_numpy_dtype_promotion", "standard")
  yield
  for k, v in saved.items():
    jax.config.update(k, v)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, default_jax_config):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


def test_readme_python_block(default_jax_config):
  blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
  assert blocks
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {})
