"""The compression study driver's protocol (benchmarks/compress_study.py) on hand-made rows: the job grid,
choices on validation (allocation, heal rate), a diverged heal. The end-to-end run is `.ci/run`'s --smoke."""

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the driver imports benchmarks/_common.py
_spec = importlib.util.spec_from_file_location("compress_study", ROOT / "benchmarks" / "compress_study.py")
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)


def test_grid_runs_every_method_first_and_heals_at_every_rate():
  jobs = study.jobs(smoke=False)
  keys = [json.dumps({k: j.get(k) for k in study.JOB_KEYS}) for j in jobs]
  assert len(keys) == len(set(keys))  # no job twice: resuming by key is exact
  first = jobs[:15]  # five main variants at three sizes, before any seed, allocation or heal
  assert {j["kind"] for j in first} == {"free"} and {j["ratio"] for j in first} == set(study.RATIOS)
  assert all(j["seed"] in (0, None) and not j["sequential"] for j in first)
  heals = [j for j in jobs if j["kind"] == "heal"]
  for ratio in study.HEAL_RATIOS:
    for method, _ in study.HEALED:
      assert sorted(j["lr"] for j in heals if j["method"] == method and j["ratio"] == ratio) == sorted(study.HEAL_LRS)
  assert sorted(j["lr"] for j in heals if j["method"] == "dense") == sorted(study.HEAL_LRS)
  assert {j["seed"] for j in jobs if j["kind"] == "free" and j["ratio"] == 0.9} <= {0, None}


def _row(kind, method, ratio, valid, test, *, variant="free", allocation="uniform", lr=None, seed=0, **extra):
  return {"kind": kind, "method": method, "label": method + ("" if variant == "free" else variant),
          "allocation": allocation, "sequential": False, "ratio": ratio, "seed": seed, "variant": variant, "lr": lr,
          "kept": ratio, "valid_ppl": valid, "test_ppl": test, "compress_s": 1.0, "device": "cpu", "jax": "x",
          "dense_valid_ppl": 10.0, "dense_test_ppl": 9.0, **extra}


def test_summary_chooses_allocation_and_heal_rate_on_validation_and_lists_divergence(tmp_path):
  nan = float("nan")
  rows = [_row("free", "svd", 0.5, 11.0, 9.9, seed=None), _row("free", "svd", 0.5, 10.8, 9.95, allocation="loss",
                                                                seed=None),
          # heal: 1e-4 is better on validation although worse on test; 3e-4 diverged
          _row("heal", "svdllm", 0.5, 10.5, 9.6, variant="+heal", lr=3e-5),
          _row("heal", "svdllm", 0.5, 10.4, 9.7, variant="+heal", lr=1e-4),
          _row("heal", "svdllm", 0.5, 10.45, 9.75, variant="+heal+int8", lr=1e-4),
          _row("heal", "svdllm", 0.5, nan, nan, variant="+heal", lr=3e-4, error="heal: the training loss is nan"),
          _row("heal", "dense", 1.0, 9.9, 8.9, variant="+heal", lr=3e-5, allocation=None, seed=None)]
  (tmp_path / "shard0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  text = study.summarize(tmp_path)
  assert "| svd | loss | 9.95 (1.11x)* |" in text and "| svd | uniform | 9.90 (1.10x) |" in text
  assert "| svdllm+heal | uniform | 9.70 (1.08x) lr 0.0001 |" in text  # the validation choice, not the test one
  assert "| svdllm+heal+int8 | uniform | 9.75 (1.08x) lr 0.0001 |" in text
  assert "Diverged (loss not finite after healing): svdllm+heal at kept 0.5, lr 0.0003." in text
  assert "Dense + heal control (same tokens, lr 3e-05): validation 9.900, test 8.900." in text
  assert (tmp_path / "summary.md").read_text() == text


def test_only_selects_jobs_by_field_groups():
  grid = study.jobs(smoke=False)
  heals = study.select(grid, ["method=mpo-data;kind=heal"])
  assert heals and all(j["method"] == "mpo-data" and j["kind"] == "heal" for j in heals)
  both = study.select(grid, ["method=mpo-data;kind=heal", "method=modegpt;refit_ridge=None;ratio=0.9"])
  assert len(both) == len(heals) + 2  # modegpt at 0.9: importance and uniform, not the refit-ridge probe
  assert study.select(grid, []) == grid
  with pytest.raises(SystemExit, match="--only 'methd=svd'"):
    study.select(grid, ["methd=svd"])
