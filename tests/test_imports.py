"""No import cycles in tnjax: no module imports, directly or through others, a module that imports it back, counting
imports inside functions (the lazy shims that held three cycles together), and the old paths those shims served
still work."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "tnjax"


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in ROOT.rglob("*.py"):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def import_graph() -> dict[str, set[str]]:
  """``{module: the tnjax modules it imports}``, at any depth of its code; ``from P import name`` counts as an
  import of ``P.name`` when that is a module, else of ``P`` (a package's ``__init__``)."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                  for a in node.names}
      elif isinstance(node, ast.Import):
        found |= {a.name for a in node.names}
    graph[name] = {m for m in found if m in modules and m != name}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], 0
  for root in graph:
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = counter
    counter += 1
    stack.append(root)
    on.add(root)
    while work:
      v, edges = work[-1]
      w = next(edges, None)
      if w is not None:
        if w not in index:
          index[w] = low[w] = counter
          counter += 1
          stack.append(w)
          on.add(w)
          work.append((w, iter(sorted(graph[w]))))
        elif w in on:
          low[v] = min(low[v], index[w])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[v])
      if low[v] == index[v]:
        comp = []
        while True:
          w = stack.pop()
          on.discard(w)
          comp.append(w)
          if w == v:
            break
        if len(comp) > 1:
          out.append(sorted(comp))
  return out


def test_the_cycle_finder_finds_a_cycle():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_tnjax_imports_itself_back():
  graph = import_graph()
  assert len(graph) > 50 and "tnjax.core.contraction" in graph["tnjax.core"]
  assert cycles(graph) == []


def test_the_old_paths_of_the_removed_shims_still_work():
  import importlib

  mod = importlib.import_module  # tnjax.models.family is also a function's name in tnjax.models
  assert mod("tnjax.core.ops").matvec is mod("tnjax.core.linear").matvec
  assert mod("tnjax.core.ops").dense_backward is mod("tnjax.core.contraction.dense").dense_backward
  assert mod("tnjax.models.config").preset is mod("tnjax.models.family").preset
  hf, hf_gpt2 = mod("tnjax.interop.hf"), mod("tnjax.interop.hf_gpt2")
  for name in ("load_hf_gpt2", "save_hf_gpt2", "config_from_hf", "hf_config"):
    assert getattr(hf, name) is getattr(hf_gpt2, name)


# Every name the module held before it became a re-export of `tnjax.core.contraction` (its public names other
# than the standard library's and typing's).
LINEAR_NAMES = [
    "BlockTT", "CostModel", "FUSED_DTYPES", "H100", "MATVEC_PATHS", "PATHS", "PRODUCTS", "PRODUCT_PATHS", "Plan",
    "SPLIT_ORDERS", "TTMatrix", "btt_matvec", "check_matvec_args", "choose_path", "choose_plan", "dense_backward",
    "fused_backward", "fused_forward", "fused_supported", "fused_unavailable", "fused_work", "gather_rows", "linear",
    "matvec", "matvec_dense", "matvec_direct", "matvec_einsum", "matvec_plan", "matvec_split", "path_costs",
    "path_flops", "plan_seconds", "product_costs", "to_dense", "transpose",
]
FUSED_NAMES = [
    "BACKWARDS", "BACKWARD_BLOCK", "BACKWARD_PROGRAMS", "BACKWARD_WARPS", "DTYPES", "FEW_TOKENS", "MAX_RANK",
    "NUM_WARPS", "TTMatrix", "check_matvec_args", "dense_backward", "fused_backward", "fused_dims", "fused_forward",
    "fused_supported", "fused_unavailable", "fused_work", "matvec_fused",
]


@pytest.mark.parametrize("old, new, names", [
    ("tnjax.core.linear", "tnjax.core.contraction", LINEAR_NAMES),
    ("tnjax.core.fused", "tnjax.core.contraction.fused", FUSED_NAMES),
])
def test_the_deprecated_contraction_modules_export_every_name_they_held(old, new, names):
  import importlib

  import tnjax

  old_mod = importlib.import_module(old)
  for name in names:
    exec(f"from {old} import {name}", {})  # the way users reach them
  # each is the object of its new home (the package or a module below it), not a copy
  homes = [importlib.import_module(m) for m in (new, "tnjax.core.contraction.fused", "tnjax.core.contraction.dense",
                                                "tnjax.core.ops", "tnjax.core.tensor_train", "tnjax.core.btt")]
  renamed = {"FUSED_DTYPES": "DTYPES"}
  for name in names:
    assert any(getattr(h, renamed.get(name, name), None) is getattr(old_mod, name) for h in homes), name
  assert getattr(tnjax.core, old.rsplit(".", 1)[1]) is old_mod  # still an attribute after `import tnjax`
