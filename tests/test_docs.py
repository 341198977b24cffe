"""Docstring examples and the README's Python block run as written."""

import doctest
import importlib
import pathlib
import re

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = ["tnjax.core.initializers", "tnjax.core.shapes", "tnjax.nn.quant", "tnjax.models.config",
           "tnjax.core.tensor_train", "tnjax.core.contraction.fused", "tnjax.compress.targets", "tnjax.train.config",
           "tnjax.train.sharding", "tnjax.data.tokenizer", "tnjax.data.cache", "tnjax.data.prefetch",
           "tnjax._io", "tnjax.models.names", "tnjax.models.family", "tnjax.interop.hf_llama"]
# Examples that build, train or compress models: several seconds each, so in the slow run (.ci/run runs it).
SLOW_MODULES = ["tnjax.nn.layers", "tnjax.models.gpt", "tnjax.models.generate", "tnjax.compress.methods",
                "tnjax.compress.modegpt", "tnjax.compress.calibration", "tnjax.compress.tuning",
                "tnjax.compress._model", "tnjax.compress.report", "tnjax.models.decoder", "tnjax.interop.native",
                "tnjax.interop.hf",
                "tnjax.interop.hf_gpt2", "tnjax.eval", "tnjax.train.loop", "tnjax.train.mup",
                "tnjax.core.contraction.cost", "tnjax.core.contraction.paths", "tnjax.core.contraction.front",
                "tnjax.core.contraction.gather", "tnjax.models.llama", "tnjax.core.decompositions", "tnjax.core.ops",
                "tnjax.core.btt", "tnjax.core.whitening", "tnjax.compress.registry", "tnjax.nn.kinds"]


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


@pytest.mark.parametrize("name", MODULES + [pytest.param(m, marks=pytest.mark.slow) for m in SLOW_MODULES])
def test_docstring_examples(name, default_jax_config):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


@pytest.mark.slow  # about 30 s of eager TT-SVDs at GPT-2 sizes; .ci/run runs it
def test_readme_python_block(default_jax_config):
  blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
  assert blocks
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {})


def _doc_pages():
  return sorted((ROOT / "docs").rglob("*.md"))


@pytest.mark.parametrize("page", _doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_python_blocks_run(page, default_jax_config):
  """Python blocks written into the pages run; blocks that include an example file are run by CI's smoke loop."""
  ci = (ROOT / ".ci" / "run").read_text()
  for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
    included = re.findall(r'--8<-- "examples/(\w+)\.py"', block)
    if included:
      assert all(name in ci for name in included), f"{page}: {included} not run with --smoke by .ci/run"
      assert all((ROOT / "examples" / f"{name}.py").exists() for name in included)
    else:
      exec(compile(block, str(page), "exec"), {})


def test_every_example_has_a_smoke_run_in_ci():
  ci = (ROOT / ".ci" / "run").read_text()
  for example in (ROOT / "examples").glob("*.py"):
    assert "--smoke" in example.read_text() and example.stem in ci, example


def test_no_sphinx_roles_in_docstrings_or_pages():
  """mkdocstrings' google style does not render :func: and friends; links are [`name`][tnjax.path] or backticks."""
  role = re.compile(r":(mod|attr|func|class|meth|data|obj|exc):`")
  found = [f"{p.relative_to(ROOT)}:{i + 1}" for p in [*(ROOT / "tnjax").rglob("*.py"), *(ROOT / "docs").rglob("*.md")]
           for i, line in enumerate(p.read_text().splitlines()) if role.search(line)]
  assert not found, found


def test_readme_and_example_configs_name_only_files_in_the_repository():
  for path in [ROOT / "README.md", ROOT / "docs" / "getting-started.md", *(ROOT / "examples" / "configs").glob("*")]:
    text = path.read_text()
    assert "../" not in text and "shared/" not in text, path
  for config in (ROOT / "examples" / "configs").glob("*.toml"):
    import tomllib

    files = [f for key in ("train_files", "valid_files", "test_files")
             for f in tomllib.loads(config.read_text()).get(key, [])]
    assert all((ROOT / f).is_file() for f in files), (config, files)


def test_docstring_example_sections_are_code():
  """griffe's Google parser renders ``Examples:`` as code; ``Example:`` becomes Markdown (nested blockquotes,
  and outputs such as ``[3.0, 2.0]`` taken as links, which fails ``mkdocs build --strict``)."""
  singular = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "tnjax").rglob("*.py"))
              for i, line in enumerate(p.read_text().splitlines(), 1) if re.fullmatch(r"\s+Example:\s*", line)]
  assert not singular, f"use 'Examples:' (a code section): {singular}"
