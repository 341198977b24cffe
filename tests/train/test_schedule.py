"""Learning-rate schedules (cosine, warmup-stable-decay) and branching a WSD run into a shorter budget."""

import json
import re

import jax
import numpy as np
import optax
import pytest

from tnjax.cli import main
from tnjax.train import TrainConfig, branch, lr_schedule, resolve, train
from tnjax.train.loop import decay_start

from .test_train import _cfg, _losses

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(autouse=True)
def standard_promotion():
  with jax.numpy_dtype_promotion("standard"):  # optax mixes its int step count with floats
    yield


def _rates(cfg, steps):
  f = lr_schedule(cfg)
  return np.array([float(f(t)) for t in range(steps + 1)])


def test_wsd_shape_against_hand_computed_values():
  cfg = TrainConfig(lr=2.0, min_lr_ratio=0.1, warmup=10, steps=100, schedule="wsd", decay_fraction=0.25)
  r = _rates(cfg, 100)
  assert decay_start(cfg) == 75
  np.testing.assert_allclose(r[:11], 0.2 * np.arange(11), rtol=1e-6)  # linear warmup 0 -> 2
  np.testing.assert_allclose(r[10:76], 2.0)  # stable
  np.testing.assert_allclose(r[75:], 2.0 - (2.0 - 0.2) * np.arange(26) / 25, rtol=1e-6)  # linear decay -> 0.2
  # decay never starts before warmup ends
  assert decay_start(TrainConfig(warmup=20, steps=22, schedule="wsd", decay_fraction=0.5)) == 20


def test_cosine_is_optax_warmup_cosine():
  cfg = TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup=5, steps=50)
  ref = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 5, 50, end_value=1e-4)
  np.testing.assert_allclose(_rates(cfg, 50), [float(ref(t)) for t in range(51)], rtol=1e-6)


def test_wsd_runs_of_different_length_agree_until_the_earlier_decay():
  short, long = (TrainConfig(lr=1.0, warmup=10, steps=n, schedule="wsd", decay_fraction=0.2) for n in (100, 400))
  a, b = _rates(short, 100), _rates(long, 100)
  np.testing.assert_array_equal(a[:80], b[:80])
  assert a[90] < b[90]


@pytest.mark.parametrize("overrides, match", [
    (["schedule=linear"], r"TrainConfig: schedule='linear' but one of \('cosine', 'wsd'\)"),
    (["decay_fraction=0"], r"TrainConfig: decay_fraction=0 but 0 < decay_fraction <= 1"),
    (["decay_fraction=1.5"], r"decay_fraction=1.5 but 0 < decay_fraction <= 1"),
    (["keep_every=-2"], r"TrainConfig: keep_every=-2 but keep_every >= 0"),
])
def test_schedule_config_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    resolve(None, overrides)


@pytest.mark.slow  # three short training runs
def test_branch_of_a_wsd_run_equals_the_shorter_run_from_scratch(tmp_path):
  """A 16-step WSD run keeps its step-8 checkpoint (keep=1, keep_every=8); branching it at step 8
  into a 10-step run gives the losses of a 10-step run trained from the start."""
  wsd = ["schedule=\"wsd\"", "decay_fraction=0.2", "warmup=2", "eval_every=4", "checkpoint_every=4"]
  long = tmp_path / "long"
  train(_cfg(long, "steps=16", "keep=1", "keep_every=8", *wsd), progress=False)
  assert sorted(p.name for p in (long / "checkpoints").iterdir() if p.name.isdigit()) == ["16", "8"]
  train(_cfg(tmp_path / "short", "steps=10", *wsd), progress=False)

  cfg = branch(long, 8, 10, tmp_path / "branch")
  assert (cfg.steps, cfg.schedule) == (10, "wsd")
  metrics = [json.loads(line) for line in (tmp_path / "branch" / "metrics.jsonl").read_text().splitlines()]
  assert max(m["step"] for m in metrics) == 8
  report = train(cfg, resume=True, progress=False)
  got, want = _losses(tmp_path / "branch"), _losses(tmp_path / "short")
  assert sorted(got) == list(range(1, 11))
  np.testing.assert_allclose([got[s] for s in range(1, 11)], [want[s] for s in range(1, 11)], rtol=1e-5)
  assert report["steps"] == 10 and report["best_val_step"] in (4, 8, 10)

  with pytest.raises(ValueError, match=r"branch: .*branch is not empty"):
    branch(long, 8, 10, tmp_path / "branch")
  with pytest.raises(ValueError, match=r"branch: .* has no checkpoint at step 4 \(it has \[8, 16\]\)"):
    branch(long, 4, 10, tmp_path / "b2")
  with pytest.raises(ValueError, match=r"branch: step=8 but the stable phase ends at step 7"):
    branch(long, 8, 9, tmp_path / "b3")
  with pytest.raises(ValueError, match=r"branch: .* has schedule='cosine' but only a 'wsd' run can branch"):
    branch(_cosine_run(tmp_path), 4, 10, tmp_path / "b4")
  with pytest.raises(ValueError, match=r"branch: .*train_config.json does not exist"):
    branch(tmp_path / "nothing", 4, 10, tmp_path / "b5")


def _cosine_run(tmp_path):
  out = tmp_path / "cosine"
  out.mkdir()
  (out / "train_config.json").write_text(json.dumps(_cfg(out, "steps=10").to_dict()))
  return out


@pytest.mark.parametrize("args, match", [
    (["--branch", "x"], r"--branch RUN and --at STEP go together"),
    (["--branch", "x", "--at", "4", "--set", "steps=10"], r"--branch needs exactly --set steps=N and --set out_dir"),
    (["--branch", "x", "--at", "4", "--set", "steps=ten", "--set", "out_dir=y"], r"--set steps='ten' but a positive"),
    (["--branch", "x", "--at", "4", "--resume", "--set", "steps=10", "--set", "out_dir=y"],
     r"--config and --resume do not apply"),
])
def test_branch_cli_errors(args, match, capsys):
  assert main(["train", *args]) == 2
  assert re.search(match, capsys.readouterr().err)
