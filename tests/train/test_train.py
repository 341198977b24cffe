import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from tnjax.data import SAMPLE_DIR, token_cache, train_tokenizer
from tnjax.train import TrainConfig, apply_overrides, resolve, train

pytestmark = pytest.mark.filterwarnings("ignore")
ROOT = pathlib.Path(__file__).resolve().parents[2]

SMALL = ["model_overrides={\"n_layer\": 1, \"d_model\": 32, \"n_head\": 2}", "vocab_size=300", "block_size=32",
         "batch_size=8", "eval_batches=2", "log_every=1", "warmup=5", "lr=0.01",
         "layers={\"mlp.c_fc\": {\"kind\": \"ttm\", \"rank\": 4}, \"mlp.c_proj\": {\"kind\": \"ttm\", \"rank\": 4}}"]


@pytest.fixture(autouse=True)
def standard_promotion():
  with jax.numpy_dtype_promotion("standard"):  # optax mixes its int step count with floats
    yield


def _cfg(out, *extra):
  return resolve(None, SMALL + [f"out_dir={out}", *extra])


def _losses(out, key="loss"):
  by_step = {}
  for line in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines():
    m = json.loads(line)
    if key in m:
      by_step[m["step"]] = m[key]
  return by_step


def _prefetchers():
  from tnjax.data.prefetch import THREAD_NAME

  return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def test_overrides_and_toml(tmp_path):
  d = apply_overrides(TrainConfig().to_dict(), ["steps=7", "layers.mlp.c_fc={\"kind\": \"dense\"}",
                                                "model_overrides.n_layer=3", "out_dir=runs/x"])
  assert d["steps"] == 7 and d["layers"]["mlp.c_fc"] == {"kind": "dense"} and d["model_overrides"]["n_layer"] == 3
  assert d["out_dir"] == "runs/x"
  toml = tmp_path / "c.toml"
  toml.write_text('steps = 11\nwarmup = 2\nlr = 0.5\n[model_overrides]\nn_layer = 2\n')
  cfg = resolve(str(toml), ["lr=0.25"])
  assert (cfg.steps, cfg.lr, cfg.model_overrides) == (11, 0.25, {"n_layer": 2})


@pytest.mark.parametrize("overrides, match", [
    (["stepz=3"], r"--set: unknown field 'stepz'"),
    (["steps"], r"--set: 'steps' but key=value is expected"),
    (["steps.x=3"], r"--set: steps is not a dict"),
    (["steps=0"], r"TrainConfig: steps=0 but a positive integer"),
    (["batch_size=10", "grad_accum=3"], r"TrainConfig: batch_size=10 but it must be divisible by grad_accum=3"),
    (["dtype=float16"], r"TrainConfig: dtype='float16' but 'float32' or 'bfloat16'"),
    (["prefetch=-1"], r"TrainConfig: prefetch=-1 but prefetch >= 0 is expected \(0: no prefetching\)"),
    (["prefetch=1.5"], r"TrainConfig: prefetch=1.5 \(float\) but int is expected"),
])
def test_config_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    resolve(None, overrides)


def test_few_steps_lower_the_loss_and_write_outputs(tmp_path):
  report = train(_cfg(tmp_path / "run", "steps=40", "eval_every=20", "checkpoint_every=20", "grad_accum=2",
                      f"test_files=[\"{SAMPLE_DIR / 'valid.txt'}\"]"), progress=False)
  losses = _losses(tmp_path / "run")
  assert np.mean([losses[s] for s in range(36, 41)]) < losses[1] - 1.0
  assert report["final_val_perplexity"] < report["first_val_perplexity"] or report["first_val_perplexity"] < 300
  assert report["final_val_perplexity"] < 300 and "test_perplexity" in report
  # the checkpoint chosen on validation is kept and tested too
  metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  vals = {m["step"]: m["val_loss"] for m in metrics if "val_loss" in m}
  assert report["best_val_step"] == min(vals, key=vals.get) and report["test_perplexity_at_best"] > 1
  if report["best_val_step"] == 40:
    assert report["test_perplexity_at_best"] == pytest.approx(report["test_perplexity"], rel=1e-5)
  assert report["train_flops"] == report["train_flops_per_token"] * 40 * 8 * 32 > 0
  for name in ("report.md", "report.json", "loss.png", "train_config.json", "model/config.json",
               "model/tokenizer.json", "best_model/model.safetensors"):
    assert (tmp_path / "run" / name).exists(), name
  assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()) == [20, 40]
  events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
  assert events and events[0].stat().st_size > 0
  assert not _prefetchers()  # the batch thread ended with the run


@pytest.mark.slow  # default suite time; .ci/run runs it
def test_resume_refusals_a_moved_run_and_a_corrupt_checkpoint(tmp_path, monkeypatch, capsys):
  """One short run, then: refusals; a moved run (its config saved without prefetch, resumed with another) that
  resumes with more steps (said on stderr), logs each step once, starts its progress bar after the compiling step
  and warns of no deprecation; and a corrupt checkpoint."""
  import shutil
  import warnings

  import tqdm

  out = tmp_path / "run"
  train(_cfg(out, "steps=4", "warmup=2", "checkpoint_every=2", "eval_every=4"), progress=False)
  with pytest.raises(ValueError, match=r"already has checkpoints; pass --resume"):
    train(_cfg(out, "steps=4", "warmup=2"), progress=False)
  with pytest.raises(ValueError, match=r"--resume with a configuration that differs from the saved one in \['seed'\]"):
    train(_cfg(out, "steps=6", "warmup=2", "checkpoint_every=2", "eval_every=4", "seed=1"), resume=True, progress=False)
  with pytest.raises(ValueError, match=r"--resume but .*train_config.json does not exist"):
    train(_cfg(tmp_path / "empty", "steps=4", "warmup=2"), resume=True, progress=False)

  with open(out / "metrics.jsonl", "a") as f:  # as if the run had logged two steps past its last checkpoint
    f.write(json.dumps({"step": 5, "loss": 9.0}) + "\n" + json.dumps({"step": 6, "loss": 9.0}) + "\n")
  moved = tmp_path / "elsewhere" / "moved"
  shutil.move(str(out), str(moved))
  saved = json.loads((moved / "train_config.json").read_text())
  del saved["prefetch"]  # as saved before the field existed; the resume below also changes it, which is allowed
  (moved / "train_config.json").write_text(json.dumps(saved))
  bars = []
  real = tqdm.tqdm
  monkeypatch.setattr(tqdm, "tqdm", lambda *a, **k: bars.append(k) or real(*a, **k))
  capsys.readouterr()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    train(_cfg(moved, "steps=6", "warmup=2", "checkpoint_every=2", "eval_every=4", "prefetch=0"), resume=True,
          progress=False)
  err = capsys.readouterr().err
  assert "resuming at step 4 with steps=6 (the saved run had steps=4)" in err and "schedule" in err
  steps = [m["step"] for m in map(json.loads, (moved / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
  assert steps == [1, 2, 3, 4, 5, 6] and _losses(moved)[5] != 9.0
  assert bars and bars[0]["initial"] == 5  # the bar (and its ETA) starts after the first, compiling, step
  ours = [w for w in caught if issubclass(w.category, DeprecationWarning) and "tnjax" in w.filename]
  assert not ours, [str(w.message) for w in ours]

  for f in (moved / "checkpoints" / "6").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"garbage")
  with pytest.raises(ValueError, match=r"checkpoint at step 6 .* could not be restored"):
    train(_cfg(moved, "steps=8", "warmup=2", "checkpoint_every=2", "eval_every=4"), resume=True, progress=False)


def _cli(out, *extra):
  sets = []
  for s in SMALL + [f"out_dir={out}", "steps=30", "checkpoint_every=5", "eval_every=30", *extra]:
    sets += ["--set", s]
  return [sys.executable, "-m", "tnjax.cli", "train", "--no-progress", *sets]


@pytest.mark.slow  # three training processes
def test_kill_and_resume_reproduces_uninterrupted_losses(tmp_path):
  """SIGKILL mid-run (batches prefetched ahead, losses not yet read), then --resume: every loss and gradient norm
  bit for bit those of an uninterrupted run that draws each batch in the loop (prefetch=0)."""
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  full, cut = tmp_path / "full", tmp_path / "cut"
  uninterrupted = subprocess.Popen(_cli(full, "prefetch=0"), env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
  victim = subprocess.Popen(_cli(cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not (cut / "checkpoints" / "10").exists() and victim.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  victim.kill()  # SIGKILL: no cleanup, mid-run
  victim.wait()
  assert uninterrupted.wait(timeout=300) == 0
  assert not (cut / "report.json").exists(), "the run finished before it could be killed"
  resumed = subprocess.run(_cli(cut) + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  for key in ("loss", "grad_norm"):
    a, b = _losses(full, key), _losses(cut, key)
    assert sorted(a) == sorted(b) == list(range(1, 31))
    assert [b[s] for s in range(1, 31)] == [a[s] for s in range(1, 31)], key  # exactly


def test_token_cache_reused_and_invalidated(tmp_path):
  text = tmp_path / "a.txt"
  text.write_text("In the beginning God created the heaven and the earth.\n" * 50)
  tok = train_tokenizer([SAMPLE_DIR / "valid.txt"], 300)
  first = token_cache([text], tok, tmp_path / "cache", "train")
  stamp = (tmp_path / "cache" / "train.bin").stat().st_mtime_ns
  again = token_cache([text], tok, tmp_path / "cache", "train")
  assert (tmp_path / "cache" / "train.bin").stat().st_mtime_ns == stamp
  np.testing.assert_array_equal(first, again)
  text.write_text("And the earth was without form, and void.\n" * 50)
  changed = token_cache([text], tok, tmp_path / "cache", "train")
  assert len(changed) != len(first)
  other = train_tokenizer([SAMPLE_DIR / "valid.txt"], 280)
  token_cache([text], other, tmp_path / "cache", "train")
  meta = json.loads((tmp_path / "cache" / "train.json").read_text())
  from tnjax.data import tokenizer_hash
  assert meta["tokenizer"] == tokenizer_hash(other)
  with pytest.raises(ValueError, match=r"token_cache: file .*nope.txt does not exist"):
    token_cache([tmp_path / "nope.txt"], tok, tmp_path / "cache", "x")


MULTI = """
import json, sys
import jax
from tnjax.train import resolve, train
assert jax.device_count() == 4, jax.devices()
with jax.numpy_dtype_promotion("standard"):
  for overrides in json.loads(sys.argv[1]):
    train(resolve(None, overrides), progress=False)
"""


@pytest.mark.slow  # two 4-device training processes
def test_data_parallel_and_fsdp_match_one_device(tmp_path):
  base = ["steps=8", "eval_every=8", "checkpoint_every=8"]
  train(_cfg(tmp_path / "one", *base), progress=False)
  env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  runs = {"dp": [], "fsdp": ["fsdp=true"]}
  args = json.dumps([SMALL + [f"out_dir={tmp_path / name}", *base, *extra] for name, extra in runs.items()])
  # One process for both runs: one interpreter start and import, and the model init compiles once.
  r = subprocess.run([sys.executable, "-c", MULTI, args], env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  for name in runs:
    one, many = _losses(tmp_path / "one"), _losses(tmp_path / name)
    # Same math, different reduction order across devices: float32 agreement to 1e-4 relative.
    np.testing.assert_allclose([many[s] for s in range(1, 9)], [one[s] for s in range(1, 9)], rtol=1e-4)


@pytest.mark.slow  # default suite time
def test_bfloat16_compute_keeps_float32_parameters_and_optimizer():
  from tnjax.train import Trainer

  trainer = Trainer(_cfg("unused", "dtype=bfloat16", "steps=5", "warmup=2"), 300)
  tokens = np.random.default_rng(0).integers(0, 300, 5000).astype(np.uint16)
  losses = [float(trainer.step(s, tokens)[0]) for s in range(5)]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  leaves = jax.tree_util.tree_leaves((trainer.params, trainer.opt_state))
  assert {x.dtype for x in leaves if np.issubdtype(x.dtype, np.floating)} == {np.dtype("float32")}
  assert trainer.model_config.dtype == "bfloat16"


@pytest.mark.parametrize("name", ["corpus_dense", "corpus_ttm48"])
def test_example_configs_resolve(name):
  cfg = resolve(str(ROOT / "examples" / "configs" / f"{name}.toml"))
  assert cfg.model == "gpt2" and cfg.model_overrides["d_model"] == 512 and cfg.train_files
  assert (cfg.layers == {}) == (name == "corpus_dense")


def test_tokenizer_is_rebuilt_when_its_sources_change(tmp_path, capsys):
  from tnjax.train.loop import _tokenizer

  text = tmp_path / "a.txt"
  text.write_text((SAMPLE_DIR / "valid.txt").read_text()[:20000])
  out = tmp_path / "run"
  out.mkdir()
  cfg = _cfg(out, f"train_files=[\"{text}\"]", "vocab_size=300")
  assert _tokenizer(cfg, out, resume=False).get_vocab_size() == 300
  assert _tokenizer(cfg, out, resume=False).get_vocab_size() == 300 and capsys.readouterr().err == ""
  with pytest.raises(ValueError, match=r"train: --resume but .*tokenizer.json was made from other training files"):
    _tokenizer(_cfg(out, f"train_files=[\"{text}\"]", "vocab_size=280"), out, resume=True)
  assert _tokenizer(_cfg(out, f"train_files=[\"{text}\"]", "vocab_size=280"), out, resume=False).get_vocab_size() \
      == 280
  assert "tokenizer.json was made from other training files or another vocab_size; training a new one" in \
      capsys.readouterr().err


def test_diverging_loss_is_an_error_and_closes_the_checkpoint_manager(tmp_path, monkeypatch):
  from tnjax.train import Trainer

  closed = _closing_manager(monkeypatch)
  monkeypatch.setattr(Trainer, "step", lambda self, step, tokens, batch=None: (np.float32(np.nan), np.float32(0)))
  with pytest.raises(ValueError, match=r"train: loss=nan at step 1: training diverged; lower lr"):
    train(_cfg(tmp_path / "run", "steps=3", "warmup=2"), progress=False)
  assert closed == [True]


def test_plot_uses_a_figure_not_the_global_backend(tmp_path):
  import matplotlib
  import matplotlib.pyplot as plt

  from tnjax.compress.report import plot_sweep
  from tnjax.train.loop import _plot

  backend, figures = matplotlib.get_backend(), plt.get_fignums()
  _plot([{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "val_loss": 2.5}], tmp_path / "loss.png")
  plot_sweep([{"method": "svd", "kept": 0.5, "perplexity": 10.0}], tmp_path / "sweep.png")
  assert matplotlib.get_backend() == backend and plt.get_fignums() == figures
  assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "sweep.png").stat().st_size > 0


@pytest.mark.slow  # a real 2-step run and three resumes (~6 s)
def test_resume_with_fewer_steps_is_refused_and_changes_nothing(tmp_path, capsys):
  """Before: a run finished at steps=2, resumed with steps=1, exited 0 and rewrote train_config.json and report.json
  with less (steps 1, half the tokens seen, no tokens/s, a best validation step past the end)."""
  from tnjax.cli import main

  text = tmp_path / "text.txt"
  text.write_text((SAMPLE_DIR / "valid.txt").read_text()[:5000])
  out = tmp_path / "run"
  sets = ['model_overrides={"n_layer": 1, "d_model": 32, "n_head": 2}', "layers={}", "vocab_size=300",
          "block_size=16", "batch_size=2", "eval_batches=1", "eval_every=2", "checkpoint_every=2", "warmup=0",
          f"train_files=[\"{text}\"]", f"valid_files=[\"{text}\"]", f"out_dir={out}"]
  train(resolve(None, sets + ["steps=2"]), progress=False)

  def files():
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

  before = files()
  argv = ["train", "--no-progress", "--resume"] + [a for s in sets for a in ("--set", s)]
  for steps, why in ((1, "has already finished 2 steps (checkpoint 2); steps=1 is fewer"),
                     (2, "has already finished 2 steps (checkpoint 2); steps=2 is no more")):
    assert main(argv + ["--set", f"steps={steps}"]) == 2
    err = capsys.readouterr().err
    assert err == f"tnjax train: train: --resume but the run in {out} {why}; choose steps > 2 or a new out_dir\n"
    assert files() == before  # train_config.json and report.json byte for byte, and everything else
  (out / "report.json").unlink()  # an unfinished run (killed after its checkpoint 2) cannot go back either
  assert main(argv + ["--set", "steps=1"]) == 2
  assert "has already trained 2 steps (checkpoint 2); steps=1 is fewer" in capsys.readouterr().err
  assert json.loads((out / "train_config.json").read_text())["steps"] == 2


def _fake_steps(monkeypatch, losses=None, interrupt_at=None):
  """Trainer.step without a model step (nothing compiles): the loop, its batches and its reads run for real."""
  from tnjax.train import Trainer

  seen = []

  def step(self, step, tokens, batch=None):
    assert batch is not None and batch[0].shape == (1, 8, 32)  # made ahead, on the devices
    seen.append(step)
    if step == interrupt_at:
      raise KeyboardInterrupt
    return np.float32(1.0 if losses is None else losses(step)), np.float32(0.5)

  monkeypatch.setattr(Trainer, "step", step)
  return seen


def _closing_manager(monkeypatch):
  from tnjax.train import loop

  closed, real = [], loop._checkpoint_manager

  def manager(out, cfg):
    m = real(out, cfg)
    close = m.close
    m.close = lambda: closed.append(True) or close()
    return m

  monkeypatch.setattr(loop, "_checkpoint_manager", manager)
  return closed


def test_an_error_making_a_batch_or_ctrl_c_ends_the_run_and_its_thread(tmp_path, monkeypatch):
  from tnjax.train import loop

  closed = _closing_manager(monkeypatch)
  seen = _fake_steps(monkeypatch)
  real = loop.train_batch

  def train_batch(tokens, step, *args):
    if step == 5:
      raise ValueError("token_cache: train.bin is truncated at step 5")
    return real(tokens, step, *args)

  monkeypatch.setattr(loop, "train_batch", train_batch)
  with pytest.raises(ValueError, match=r"^token_cache: train.bin is truncated at step 5$"):
    train(_cfg(tmp_path / "run", "steps=8", "prefetch=3"), progress=False)
  assert seen == [0, 1, 2, 3, 4] and closed == [True] and not _prefetchers()
  seen = _fake_steps(monkeypatch, interrupt_at=3)
  monkeypatch.setattr(loop, "train_batch", real)
  with pytest.raises(KeyboardInterrupt):
    train(_cfg(tmp_path / "run", "steps=8", "prefetch=3"), progress=False)  # no checkpoint yet: starts anew
  assert seen == [0, 1, 2, 3] and closed == [True, True] and not _prefetchers()


def test_divergence_is_caught_one_log_interval_late_and_before_a_checkpoint(tmp_path, monkeypatch):
  """Losses are read at the next log step: a NaN logged at step 6 (log_every=2) would be read at step 8, but the
  checkpoint of step 7 reads every pending loss first, so the run stops there and saves no checkpoint 7."""
  _fake_steps(monkeypatch, losses=lambda step: np.nan if step >= 4 else 1.0)
  out = tmp_path / "run"
  with pytest.raises(ValueError, match=r"train: loss=nan at step 6: training diverged"):
    train(_cfg(out, "steps=20", "log_every=2", "checkpoint_every=7", "eval_every=100"), progress=False)
  assert not (out / "checkpoints" / "7").exists() and _losses(out) == {2: 1.0, 4: 1.0}
  with pytest.raises(ValueError, match=r"train: loss=nan at step 6: training diverged"):  # read at step 8
    train(_cfg(out, "steps=20", "log_every=2", "checkpoint_every=100", "eval_every=100"), progress=False)
  assert not _prefetchers()


@pytest.mark.slow  # two training runs (~10 s)
def test_train_losses_are_bit_identical_with_and_without_prefetching(tmp_path):
  """Batches made ahead on the thread, losses read a log step late: the same metrics, bit for bit, as drawing each
  batch in the loop (dropout on, so each step's key counts too)."""
  base = ["steps=12", "log_every=2", "eval_every=5", "checkpoint_every=6", "model_overrides.dropout=0.1"]
  train(_cfg(tmp_path / "plain", *base, "prefetch=0"), progress=False)
  train(_cfg(tmp_path / "ahead", *base, "prefetch=3"), progress=False)
  for key in ("loss", "grad_norm", "val_loss"):
    plain, ahead = _losses(tmp_path / "plain", key), _losses(tmp_path / "ahead", key)
    assert plain == ahead and plain, key  # the same steps, exactly the same values
  assert sorted(_losses(tmp_path / "plain")) == [2, 4, 6, 8, 10, 12] and not _prefetchers()


FAILING_BATCH = """
import sys
from tnjax.cli import main
from tnjax.train import loop
real = loop.train_batch
def train_batch(tokens, step, *args):
  if step == 3:
    raise ValueError("token_cache: train.bin is truncated at step 3")
  return real(tokens, step, *args)
loop.train_batch = train_batch
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # a training process
def test_an_error_making_a_batch_exits_the_cli_in_one_line(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  start = time.time()
  r = subprocess.run([sys.executable, "-c", FAILING_BATCH] + _cli(tmp_path / "run")[3:], env=env,
                     capture_output=True, text=True, timeout=240)
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1] == "tnjax train: token_cache: train.bin is truncated at step 3"
  assert "Traceback" not in r.stderr and time.time() - start < 240
