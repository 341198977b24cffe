"""The study driver's protocol (benchmarks/pretrain_study.py) on hand-made reports: rate choice on validation,
seeds at the chosen rate, muP transfer, the dense-frontier gap. The end-to-end run is `.ci/run`'s --smoke."""

import importlib.util
import json
import math
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("pretrain_study", ROOT / "benchmarks" / "pretrain_study.py")
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)

GRID = {"name": "g", "seeds": [0, 1], "base": {"steps": 10, "model_overrides": {"n_layer": 2, "d_model": 64}},
        "families": {"dense": {"lrs": [1e-3, 2e-3]},
                     "narrow": {"model_overrides": {"d_model": 32}, "lrs": [1e-3, 2e-3]}}}


def _finish(out, family, lr, seed, ppl, params=100, flops=1e12):
  d = study.run_dir(out, family, lr, seed)
  d.mkdir(parents=True)
  (d / "report.json").write_text(json.dumps({
      "parameters": params, "steps": 10, "tokens_seen": 640, "train_flops": flops, "tokens_per_s": 1e3,
      "best_val_perplexity": ppl, "best_val_step": 10, "final_val_perplexity": ppl, "test_perplexity": ppl,
      "test_perplexity_at_best": ppl, "device_kind": "cpu"}))


def test_rates_first_then_seeds_at_the_chosen_rate(tmp_path):
  lrs = {n: f["lrs"] for n, f in GRID["families"].items()}
  todo, waiting = study.plan(GRID, tmp_path, lrs)
  assert waiting and set(todo) == {(n, lr, 0) for n in lrs for lr in (1e-3, 2e-3)}
  _finish(tmp_path, "dense", 1e-3, 0, 20.0)
  _finish(tmp_path, "dense", 2e-3, 0, 18.0)
  todo, _ = study.plan(GRID, tmp_path, lrs)
  assert ("dense", 2e-3, 1) in todo and ("dense", 1e-3, 1) not in todo  # the rate chosen on validation
  cfg = study.run_config(GRID, "narrow", 2e-3, 1, tmp_path, {"train_files": ["t"], "valid_files": ["v"]})
  assert cfg["model_overrides"] == {"n_layer": 2, "d_model": 32} and (cfg["lr"], cfg["seed"]) == (2e-3, 1)
  assert cfg["out_dir"].endswith("runs/narrow/lr0.002-s1") and "lrs" not in cfg


def test_summary_transfer_and_frontier_gap(tmp_path):
  lrs = {n: f["lrs"] for n, f in GRID["families"].items()}
  for lr, ppl in ((1e-3, 20.0), (2e-3, 18.0)):
    _finish(tmp_path, "dense", lr, 0, ppl, params=400, flops=4e12)
    _finish(tmp_path, "narrow", lr, 0, ppl + 4, params=100, flops=1e12)
  _finish(tmp_path, "dense", 2e-3, 1, 18.5, params=400, flops=4e12)
  _finish(tmp_path, "narrow", 2e-3, 1, 22.0, params=100, flops=1e12)
  rows = study.collect(GRID, tmp_path, lrs)
  assert len(rows) == 6 and sum(r["chosen"] for r in rows) == 4
  assert study.transferred_lrs(tmp_path, GRID) == {"dense": 2e-3, "narrow": 2e-3}
  with pytest.raises(ValueError, match=r"--lr-from: .* has no chosen learning rate for family 'wide'"):
    study.transferred_lrs(tmp_path, {"families": {"wide": {}}})

  summary = {s["family"]: s for s in study.summarize(rows)}
  dense = summary["dense"]
  assert dense["val_ppl"] == pytest.approx(math.sqrt(18.0 * 18.5)) and dense["seeds"] == 2
  assert dense["val_loss_sd"] == pytest.approx(abs(math.log(18.0) - math.log(18.5)) / math.sqrt(2))
  # a model halfway (in log params) between the two dense widths, 0.1 nats below their interpolated loss
  mid = {"params": 200, "train_flops": 2e12, "val_loss": (dense["val_loss"] + summary["narrow"]["val_loss"]) / 2 - 0.1}
  dense_pts = [dense, summary["narrow"]]
  assert study._frontier_gap(dense_pts, mid, "params") == pytest.approx(-0.1)
  assert study._frontier_gap(dense_pts, {**mid, "params": 1000}, "params") is None  # outside the dense range
  assert dense["train_seconds"] == pytest.approx(640 / 1e3)  # tokens over tokens/s
  assert {f"frontier_gap_{a}" for a in study.AXES} <= set(dense)
  assert "| g | dense |" in study.markdown(list(summary.values()))


GRIDS = [p for p in sorted((ROOT / "benchmarks" / "study").glob("*.toml")) if "[families." in p.read_text()]


@pytest.mark.slow  # builds every family's model (30 s); .ci/run runs it
@pytest.mark.parametrize("grid", GRIDS, ids=lambda p: p.stem)
def test_every_committed_grid_gives_valid_configs_and_mup_multipliers(grid, tmp_path):
  """A grid's mistake (a field, a muP base its heads cannot take) shows here, not minutes into a GPU session."""
  from tnjax.train import TrainConfig
  from tnjax.train.mup import mup_multipliers

  g = study.read_grid(grid)
  files = {"train_files": ["t.txt"], "valid_files": ["v.txt"]}
  for family, fam in g["families"].items():
    lr = (fam.get("lrs") or [1e-3])[0]
    cfg = TrainConfig(**study.run_config(g, family, lr, g["seeds"][0], tmp_path, files)).validate()
    if cfg.parametrization == "mup":
      assert mup_multipliers(cfg.model_config(cfg.vocab_size)), family
