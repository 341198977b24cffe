import json
import sys

import jax
import pytest

from tests.data.test_tokenizer import TEXT
from tests.hf_fixtures import make_hf_gpt2, make_hf_llama
from tnjax.cli import main
from tnjax.data import train_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def model_dir(tmp_path):
  text = tmp_path / "text.txt"
  text.write_text(TEXT)
  d = tmp_path / "model"
  make_hf_gpt2(d, vocab_size=300, n_positions=64)
  train_tokenizer([text], 300).save(str(d / "tokenizer.json"))
  return d, text


def test_eval_and_generate(model_dir, capsys):
  d, text = model_dir
  assert main(["eval", "--model", str(d), "--text", str(text), "--block-size", "32", "--stride", "16",
               "--max-tokens", "200"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["tokens"] == 199 and 1 < result["perplexity"] < 1000
  assert main(["generate", "--model", str(d), "--prompt", "In the beginning", "--max-new-tokens", "8"]) == 0
  assert capsys.readouterr().out.startswith("In the beginning")


def test_generate_a_file_of_prompts_in_batches(model_dir, tmp_path, capsys):
  d, _ = model_dir
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("In the beginning\nAnd God said\nthe earth\n")
  outputs = []
  for batch in ("2", "3"):  # two compiled calls (2 + 1 prompts), or one
    assert main(["generate", "--model", str(d), "--prompts", str(prompts), "--max-new-tokens", "6", "--batch-size",
                 batch]) == 0
    outputs.append(capsys.readouterr().out.splitlines())
  assert len(outputs[0]) == 3 and outputs[0] == outputs[1]  # one continuation per prompt, in order, any batching
  assert main(["generate", "--model", str(d), "--prompt", "And God said", "--max-new-tokens", "6"]) == 0
  assert capsys.readouterr().out.rstrip("\n") == "And God said" + outputs[0][1].replace("\\n", "\n")


@pytest.mark.slow  # three CLI commands; Qwen2 parity is in tests/interop
def test_eval_generate_and_compress_a_hugging_face_qwen2_directory(tmp_path, capsys):
  """The commands take Llama-style checkpoints unchanged (here Qwen2: GQA and q/k/v biases)."""
  text = tmp_path / "text.txt"
  text.write_text(TEXT)
  d = tmp_path / "qwen2"
  make_hf_llama(d, qwen2=True, vocab_size=300, max_position_embeddings=64, num_hidden_layers=1)
  train_tokenizer([text], 300).save(str(d / "tokenizer.json"))
  assert main(["eval", "--model", str(d), "--text", str(text), "--block-size", "32", "--max-tokens", "100"]) == 0
  assert 1 < json.loads(capsys.readouterr().out)["perplexity"] < 1000
  assert main(["generate", "--model", str(d), "--prompt", "In the beginning", "--max-new-tokens", "4"]) == 0
  assert capsys.readouterr().out.startswith("In the beginning")
  out = tmp_path / "small"
  assert main(["compress", "--model", str(d), "--method", "modegpt", "--ratio", "0.5", "--calib", str(text),
               "--block-size", "32", "--out", str(out)]) == 0
  assert "modegpt ratio=0.5" in capsys.readouterr().out and (out / "model" / "config.json").exists()


def test_errors_exit_2(model_dir, tmp_path, capsys):
  d, _ = model_dir
  assert main(["eval", "--model", str(tmp_path / "nowhere"), "--text", "x"]) == 2
  assert "nowhere is not a directory" in capsys.readouterr().err
  assert main(["generate", "--model", str(d), "--prompt", "the", "--max-new-tokens", "100"]) == 2
  assert "but block_size=64" in capsys.readouterr().err


def test_compress_shows_progress_bars_on_a_terminal_only_and_never_with_no_progress(model_dir, tmp_path, capsys,
                                                                                    monkeypatch):
  d, _ = model_dir
  argv = ["compress", "--model", str(d), "--method", "svd", "--ratio", "0.5", "--overwrite", "--out", str(tmp_path)]
  assert main(argv) == 0
  assert "svd_compress: fit" not in capsys.readouterr().err  # piped stderr: no bars
  monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
  assert main(argv) == 0
  assert "svd_compress: fit" in capsys.readouterr().err
  assert main(argv + ["--no-progress"]) == 0
  assert "svd_compress: fit" not in capsys.readouterr().err


@pytest.mark.slow  # a sweep of two targets with validation; the other compress CLI tests run by default
def test_compress_sweep_writes_report_plot_and_models(model_dir, tmp_path, capsys):
  from tnjax.interop import load_model

  d, text = model_dir
  out = tmp_path / "svd"
  assert main(["compress", "--model", str(d), "--method", "svd", "--ratio", "0.5,0.9", "--valid", str(text),
               "--max-tokens", "300", "--block-size", "32", "--out", str(out)]) == 0
  assert "svd ratio=0.5: compressed part 2.0" in capsys.readouterr().out
  report = json.loads((out / "report.json").read_text())
  assert [r["target"] for r in report["runs"]] == ["ratio=0.5", "ratio=0.9"]
  assert report["runs"][0]["summary"]["part_kept"] <= 0.51 and report["perplexity_before"] > 1
  assert (out / "perplexity.png").stat().st_size > 0 and "| ratio=0.9 |" in (out / "report.md").read_text()
  small = load_model(out / "ratio-0.5" / "model")
  assert small.num_params == report["runs"][0]["summary"]["params_after"]
  assert (out / "ratio-0.5" / "model" / "tokenizer.json").exists()


def test_compress_passes_a_methods_own_options_and_refuses_others_first(model_dir, tmp_path, capsys):
  from tnjax.interop import load_model

  d, text = model_dir
  for argv, match in [
      (["--method", "svd", "--rank", "2", "--option", "form=ttm"], "compress: form='ttm' but svd takes no other "
                                                                     "options"),
      (["--method", "tensorgpt", "--rank", "2", "--option", "forms=ttm", "--option", "head=1"],
       "compress: forms='ttm' but tensorgpt takes only form, head"),
      (["--method", "tensorgpt", "--rank", "2", "--option", "form"], "--option 'form' but KEY=VALUE is expected"),
      (["--method", "mpo", "--rank", "2", "--layout", "fused", "--option", "layout=fused"],
       "--layout and --option layout= both given"),
  ]:
    assert main(["compress", "--model", str(d), *argv, "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
  assert not (tmp_path / "no").exists()
  out = tmp_path / "lowrank"
  assert main(["compress", "--model", str(d), "--method", "tensorgpt", "--rank", "2", "--option", "form=lowrank",
               "--option", "head=dense", "--out", str(out)]) == 0
  small = load_model(out / "model")
  assert small.config.layers["embedding"].kind == "lowrank" and not small.config.tie_embeddings


def test_compress_saves_in_shards_of_max_shard_size_and_refuses_a_bad_size_first(model_dir, tmp_path, capsys):
  from tnjax._io import INDEX_FILE
  from tnjax.interop import load_model

  d, text = model_dir
  assert main(["compress", "--model", str(d), "--method", "svd", "--rank", "2", "--out", str(tmp_path / "bad"),
               "--max-shard-size", "5XB"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("tnjax compress: compress: max_shard_size='5XB'"), err
  assert not (tmp_path / "bad").exists()
  out = tmp_path / "sharded"
  assert main(["compress", "--model", str(d), "--method", "svd", "--rank", "2", "--out", str(out),
               "--max-shard-size", "20KB"]) == 0
  assert (out / "model" / INDEX_FILE).exists() and len(list((out / "model").glob("*.safetensors"))) > 1
  assert load_model(out / "model").num_params == json.loads((out / "report.json").read_text())["runs"][0][
      "summary"]["params_after"]


@pytest.mark.slow  # calibration, healing and int8 end to end
def test_compress_modegpt_heal_int8(model_dir, tmp_path, capsys):
  d, text = model_dir
  out = tmp_path / "mode"
  assert main(["compress", "--model", str(d), "--method", "modegpt", "--ratio", "0.6", "--calib", str(text),
               "--heal-steps", "2", "--int8", "--block-size", "32", "--out", str(out)]) == 0
  report = json.loads((out / "report.json").read_text())
  assert report["runs"][0]["summary"]["bytes_after"] < report["runs"][0]["summary"]["bytes_before"] / 2
  assert (out / "model" / "model.safetensors").exists()


@pytest.mark.slow  # calibration and a data-aware fit end to end
def test_compress_data_aware_mpo_with_a_loss_allocation_sequentially(model_dir, tmp_path):
  """The registry's flags end to end: mpo-data at a ratio spread by truncation loss, calibrated block by block."""
  d, text = model_dir
  out = tmp_path / "mpo-data"
  assert main(["compress", "--model", str(d), "--method", "mpo-data", "--ratio", "0.5", "--allocation", "loss",
               "--sequential", "--calib", str(text), "--block-size", "32", "--out", str(out)]) == 0
  report = json.loads((out / "report.json").read_text())
  assert (report["method"], report["allocation"], report["sequential"]) == ("mpo-data", "loss", True)
  assert 0.3 < report["runs"][0]["summary"]["part_kept"] <= 0.51


@pytest.mark.parametrize("extra,match", [
    (["--method", "modegpt", "--ratio", "0.5"], "needs calibration text"),
    (["--method", "mpo", "--ratio", "0.5", "--rank", "3"], "at most one of --rank, --ratio, --rtol"),
    (["--method", "svd", "--ratio", "1.5"], "ratio=1.5 but 0 < ratio <= 1"),
    (["--method", "mpo", "--ratio", "0.5,x"], "not a comma-separated list"),
    (["--method", "svd", "--rank", "2", "--layers", "mlp.up"], "unknown layer name 'mlp.up'"),
    (["--method", "svd", "--rank", "2", "--layout", "fused"], "layout='fused' but svd takes no other options"),
    (["--method", "mpo", "--rank", "4", "--layout", "fused"], "fused_dims: in_features="),
    (["--method", "svd", "--rank", "100000"], "svd_compress: rank=100000 would give layer"),
    (["--method", "svd", "--rank", "2", "--allocation", "loss"], "allocation='loss' with rank=2 but an allocation "
                                                                 "spreads a ratio"),
    (["--method", "svd", "--ratio", "0.5", "--allocation", "importance"], "allocation 'importance' needs calibration"),
    (["--method", "svd", "--ratio", "0.5", "--sequential"], "sequential=True but svd does not calibrate"),
])
def test_compress_errors_exit_2(model_dir, tmp_path, capsys, extra, match):
  d, _ = model_dir
  assert main(["compress", "--model", str(d), "--out", str(tmp_path / "o")] + extra) == 2
  assert match in capsys.readouterr().err


def test_version_help_and_list_fields(capsys):
  import tnjax

  with pytest.raises(SystemExit) as e:
    main(["--version"])
  assert e.value.code == 0 and capsys.readouterr().out.strip() == f"tnjax {tnjax.__version__}"
  with pytest.raises(SystemExit) as e:
    main(["train", "--help"])
  out = capsys.readouterr().out
  assert e.value.code == 0 and "grad_clip (float) = 1.0" in out and "layers={}" in out and "dense" in out
  assert main(["train", "--list-fields"]) == 0
  out = capsys.readouterr().out
  from tnjax.train import TrainConfig

  assert all(f"  {name} (" in out for name in TrainConfig().to_dict())


def test_compress_refuses_to_overwrite_a_run_unless_asked(model_dir, tmp_path, capsys):
  d, _ = model_dir
  run = tmp_path / "run"
  run.mkdir()
  (run / "report.md").write_text("# Training report")
  (run / "report.json").write_text("{}")
  assert main(["compress", "--model", str(d), "--method", "svd", "--ratio", "0.5", "--out", str(run)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "already holds ['report.json', 'report.md']" in err and "--overwrite" in err
  assert (run / "report.md").read_text() == "# Training report" and not (run / "model").exists()
  assert main(["compress", "--model", str(d), "--method", "svd", "--ratio", "0.5", "--out", str(run),
               "--overwrite"]) == 0
  assert "# tnjax compress: svd" in (run / "report.md").read_text() and (run / "model" / "config.json").exists()
  assert not [p for p in run.rglob("*.tmp")]


def _train_argv(out, text, *extra):
  sets = ['model_overrides={"n_layer": 1, "d_model": 32, "n_head": 2}', "layers={}", "vocab_size=300",
          "block_size=16", "batch_size=2", "eval_batches=1", "log_every=1000", "eval_every=100000", "keep=2",
          f"train_files=[\"{text}\"]", f"valid_files=[\"{text}\"]", f"out_dir={out}", *extra]
  return ["train", "--no-progress"] + [a for s in sets for a in ("--set", s)]


@pytest.mark.slow  # two real processes; the in-process Ctrl-C test below stays in the default run
def test_ctrl_c_exits_130_keeps_the_checkpoint_and_a_corrupt_one_is_one_line(tmp_path):
  """Real processes: SIGINT mid-run keeps a checkpoint that restores; a corrupt one is one line, exit 2."""
  import os
  import pathlib
  import signal
  import subprocess
  import sys
  import time

  from tnjax.data import SAMPLE_DIR
  from tnjax.train import resolve

  root = pathlib.Path(__file__).resolve().parents[1]
  env = {**os.environ, "PYTHONPATH": str(root)}
  text = tmp_path / "text.txt"
  text.write_text((SAMPLE_DIR / "valid.txt").read_text()[:20000])
  out = tmp_path / "run"
  argv = _train_argv(out, text, "steps=1000000", "checkpoint_every=2")
  # Ctrl-C as from a terminal: the child gets SIGINT's default disposition even when this process ignores it (a
  # test run started in the background of a non-interactive shell ignores SIGINT, and children inherit that).
  proc = subprocess.Popen([sys.executable, "-m", "tnjax", *argv], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  deadline = time.time() + 400  # generous: the suite runs two workers on two cores
  while not (out / "checkpoints" / "4").exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  try:
    _, err = proc.communicate(timeout=300)
  finally:  # a child that outlives the test would train on, taking a core from every later test
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 130, err[-2000:]
  assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("tnjax train: interrupted"), err[-2000:]

  # The last checkpoint restores into a fresh trainer (no training step: nothing more to compile).
  from tnjax.data import load_tokenizer
  from tnjax.train import Trainer, loop

  latest = max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
  sets = argv[3::2]  # the --set values
  cfg = resolve(None, sets)
  with jax.numpy_dtype_promotion("standard"):  # optax mixes its int step count with floats
    trainer = Trainer(cfg, load_tokenizer(out / "tokenizer.json").get_vocab_size())
    manager = loop._checkpoint_manager(out, cfg)
    try:
      assert loop._restore(manager, trainer) == latest
    finally:
      manager.close()

  for f in (out / "checkpoints" / str(latest)).rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"garbage")
  again = [a for s in sets if not s.startswith("steps=") for a in ("--set", s)]
  again += ["--set", f"steps={latest + 5}", "--set", "warmup=2"]  # warmup < steps, as TrainConfig asks
  r = subprocess.run([sys.executable, "-m", "tnjax", "train", *again, "--resume"],
                     env=env, capture_output=True, text=True, timeout=300)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr, r.stderr
  assert lines[-1].startswith(f"tnjax train: train: checkpoint at step {latest} in ") and \
      "could not be restored" in lines[-1], r.stderr


def test_unexpected_errors_keep_their_traceback_and_ctrl_c_is_130(monkeypatch, capsys):
  import tnjax.cli

  def boom(args):
    raise RuntimeError("a bug, not a bad input")

  def interrupted(args):
    raise KeyboardInterrupt

  monkeypatch.setattr(tnjax.cli, "cmd_eval", boom)
  with pytest.raises(RuntimeError, match="a bug"):  # not swallowed: its traceback reaches the user
    main(["eval", "--model", "m", "--text", "t"])
  monkeypatch.setattr(tnjax.cli, "cmd_eval", interrupted)
  assert main(["eval", "--model", "m", "--text", "t"]) == 130
  assert capsys.readouterr().err == "tnjax eval: interrupted; checkpoints and files already written are intact\n"


@pytest.fixture
def long_context_dir(tmp_path):
  """A Llama-style directory with Llama-3.x's 131072-token context (a tiny model: no window may be padded to it)."""
  text = tmp_path / "text.txt"
  text.write_text(TEXT)
  d = tmp_path / "long"
  make_hf_llama(d, vocab_size=300, max_position_embeddings=1 << 17, num_hidden_layers=1)
  train_tokenizer([text], 300).save(str(d / "tokenizer.json"))
  return d, text


@pytest.mark.slow  # two compressions (~20 s); tests/test_eval.py checks the default window by default
def test_long_context_model_evaluates_and_compresses_without_block_size(long_context_dir, tmp_path, capsys):
  d, text = long_context_dir
  assert main(["eval", "--model", str(d), "--text", str(text), "--max-tokens", "300"]) == 0
  default = json.loads(capsys.readouterr().out)
  assert main(["eval", "--model", str(d), "--text", str(text), "--max-tokens", "300", "--block-size", "300"]) == 0
  assert json.loads(capsys.readouterr().out) == default and default["tokens"] == 299
  out = tmp_path / "small"
  assert main(["compress", "--model", str(d), "--method", "svdllm", "--ratio", "0.5", "--calib", str(text),
               "--calib-windows", "4", "--heal-steps", "1", "--out", str(out)]) == 0
  assert "svdllm ratio=0.5" in capsys.readouterr().out and (out / "model" / "config.json").exists()
  from tnjax.data import load_tokenizer

  tokens = len(load_tokenizer(d / "tokenizer.json").encode(TEXT).ids)
  out64 = tmp_path / "default-windows"  # 64 windows asked for, but no more than the text holds
  assert main(["compress", "--model", str(d), "--method", "svd", "--ratio", "0.5", "--calib", str(text),
               "--allocation", "importance", "--out", str(out64)]) == 0
  window = min(2048, tokens - 2)
  assert json.loads((out64 / "report.json").read_text())["calib_tokens"] == window * -(-(tokens - 1) // window)


@pytest.mark.parametrize("argv,match", [
    (["eval", "--text", "T", "--block-size", "200000"],
     r"tnjax eval: perplexity: block_size=200000 but 2 <= block_size <= 131072 \(the model's context\)"),
    (["compress", "--method", "svd", "--ratio", "0.5", "--block-size", "200000", "--out", "O"],
     r"tnjax compress: compress: block_size=200000 but 2 <= block_size <= 131072"),
    (["compress", "--method", "svdllm", "--ratio", "0.5", "--calib", "T", "--block-size", "100000", "--out", "O"],
     r"compress: calib_ids \(--calib\) has \d+ tokens but a window of 100000 needs at least 100002; give more "
     r"text or a smaller block_size \(--block-size\)"),
])
def test_windows_refused_exit_2(long_context_dir, tmp_path, capsys, argv, match):
  import re

  d, text = long_context_dir
  argv = [str(text) if a == "T" else str(tmp_path / "o") if a == "O" else a for a in argv]
  assert main(argv[:1] + ["--model", str(d)] + argv[1:]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and re.search(match, err), err
  assert not (tmp_path / "o" / "model").exists()


def test_out_of_memory_is_one_line_naming_the_option(model_dir, monkeypatch, capsys):
  """A real XLA RESOURCE_EXHAUSTED (a 16 TB allocation on the CPU) inside a command: one line, exit 2."""
  import jax.numpy as jnp

  import tnjax.eval

  def allocate(*args, **kwargs):
    return jax.jit(lambda: jnp.ones((1 << 42,), jnp.float32))().block_until_ready()

  monkeypatch.setattr(tnjax.eval, "perplexity", allocate)
  d, text = model_dir
  assert main(["eval", "--model", str(d), "--text", str(text)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err, err
  assert err.startswith("tnjax eval: the device ran out of memory (RESOURCE_EXHAUSTED: Out of memory")
  assert err.rstrip().endswith("; lower --block-size or --batch-size")


def _files(path) -> dict:
  """Every file under ``path`` (relative name: bytes), to compare a directory before and after a command."""
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


HOLD = """
import sys
from tnjax._io import dir_lock
with dir_lock("compress", sys.argv[1]):
  print("held", flush=True)
  sys.stdin.readline()
"""


def test_compress_into_a_directory_another_run_writes_is_refused_until_that_run_is_gone(model_dir, tmp_path,
                                                                                         capsys):
  """Two compress runs into one --out: the second is refused naming it (no longer both exit 0, one replacing the
  other's report and models); a holder killed without cleanup (SIGKILL) does not block the next run."""
  import os
  import pathlib
  import subprocess
  import sys

  d, _ = model_dir
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
  holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "held\n"
    before = _files(out)
    argv = ["compress", "--model", str(d), "--method", "svd", "--ratio", "0.5", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"tnjax compress: compress: {out} is in use by another run (pid {holder.pid} on host "), err
    assert _files(out) == before
  finally:
    holder.kill()  # SIGKILL: its lock file stays behind, stale
    holder.wait()
  assert (out / ".tnjax.lock").exists()
  assert main(argv) == 0
  assert (out / "model" / "config.json").exists() and not (out / ".tnjax.lock").exists()
  assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow  # two CLI processes
def test_two_compress_processes_into_one_out_one_wins(model_dir, tmp_path):
  import os
  import pathlib
  import subprocess
  import sys

  d, _ = model_dir
  out = tmp_path / "out"
  env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
  procs = [subprocess.Popen([sys.executable, "-m", "tnjax", "compress", "--model", str(d), "--method", "svd",
                             "--ratio", ratio, "--out", str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for ratio in ("0.5", "0.6")]
  results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
  assert sorted(rc for rc, _ in results) == [0, 2], results
  (rc, err), = [r for r in results if r[0] == 2]
  assert "Traceback" not in err and err.count("\n") == 1, err
  assert "is in use by another run" in err or "already holds" in err, err
  won = ["0.5", "0.6"][[rc for rc, _ in results].index(0)]
  assert json.loads((out / "report.json").read_text())["runs"][0]["target"] == f"ratio={won}"


def test_compress_sweep_failing_mid_way_leaves_out_as_it_was_and_the_retry_runs(model_dir, tmp_path, monkeypatch,
                                                                               capsys):
  """A sweep whose second target fails (here: a rank the method refuses when it gets to it, and Ctrl-C) removes
  what it wrote, and only that: before, ``rank-2/`` stayed and the retry was refused ("already holds")."""
  import tnjax.compress.report

  d, _ = model_dir
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  argv = ["compress", "--model", str(d), "--method", "svd", "--out", str(out), "--rank"]
  assert main(argv + ["2,100000"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "svd_compress: rank=100000 would give layer" in err, err
  assert _files(out) == {"notes.txt": b"mine"} and [p.name for p in out.iterdir()] == ["notes.txt"]

  fresh = tmp_path / "new" / "out"  # a directory the run created goes too
  assert main(argv[:-2] + [str(fresh), "--rank", "2,100000"]) == 2
  assert not (tmp_path / "new").exists()

  calls, real = [], tnjax.compress.report.compress

  def interrupted_at_the_second(*args, **kwargs):
    calls.append(kwargs)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  monkeypatch.setattr(tnjax.compress.report, "compress", interrupted_at_the_second)
  capsys.readouterr()
  assert main(argv + ["2,3"]) == 130
  assert capsys.readouterr().err == "tnjax compress: interrupted; what this run had written to --out was removed\n"
  assert _files(out) == {"notes.txt": b"mine"} and [p.name for p in out.iterdir()] == ["notes.txt"]
  monkeypatch.setattr(tnjax.compress.report, "compress", real)

  assert main(argv + ["2,3"]) == 0  # the retry into the same --out
  report = json.loads((out / "report.json").read_text())
  assert [r["target"] for r in report["runs"]] == ["rank=2", "rank=3"] and (out / "rank-3" / "model").is_dir()
  assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("targets, match", [
    (["--ratio", "0.5,1.0"], r"compress: ratio=1.0 keeps the whole compressed part, so svd would make nothing "
                             r"smaller; a ratio < 1 is expected"),
    (["--ratio", "0.5,1.5"], r"compress: ratio=1.5 but 0 < ratio <= 1"),
    (["--ratio", "0.5,0.5"], r"compress: targets \['ratio=0.5'\] are given twice"),
    (["--ratio", "0.5,1e-9"], r"compress: svd cannot meet ratio=1e-09: it keeps at least [0-9.]+ of the compressed "
                              r"part's weights \(every layer at its smallest\)"),
], ids=["ratio-1", "out-of-range", "twice", "below-the-least"])
def test_compress_sweep_refuses_a_target_before_any_work(model_dir, tmp_path, monkeypatch, capsys, targets, match):
  import re

  import tnjax.compress.report

  monkeypatch.setattr(tnjax.compress.report, "compress", lambda *a, **k: pytest.fail("compressed before refusing"))
  d, _ = model_dir
  out = tmp_path / "out"
  assert main(["compress", "--model", str(d), "--method", "svd", "--out", str(out)] + targets) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and re.search(match, err), err
  assert not out.exists()


def test_compress_refuses_a_ratio_it_cannot_meet_naming_the_smallest(model_dir, tmp_path, capsys):
  """Before: --ratio 1e-9 exited 0 keeping several % of the part (every layer clamped to rank 1). The least is
  computed from the shapes (test_methods checks it equals a compression at the smallest ratio)."""
  import re

  d, _ = model_dir
  out = tmp_path / "out"
  argv = ["compress", "--model", str(d), "--method", "svd", "--out", str(out), "--ratio"]
  assert main(argv + ["0.5,1e-9"]) == 2
  err = capsys.readouterr().err
  found = re.fullmatch(r"tnjax compress: compress: svd cannot meet ratio=1e-09: it keeps at least ([0-9.e-]+) of the "
                       r"compressed part's weights \(every layer at its smallest\); choose ratio >= \1\n", err)
  assert found, err
  assert not out.exists()  # refused before the first target was compressed
  least = float(found.group(1))
  assert 0.01 < least < 0.2
  assert main(argv + [found.group(1)]) == 0  # the smallest ratio named is met (biases aside, as a ratio counts)
  from tnjax.compress.report import _weights_kept, compressed_part
  from tnjax.interop import load_any

  before, after = load_any(d), load_any(out / "model")
  assert _weights_kept(before, after, compressed_part(before, "svd")) <= least


@pytest.mark.slow  # three commands on one model (~30 s); the bf16 loader's own test runs by default
def test_bf16_checkpoint_compresses_with_bf16_parameters(long_context_dir, tmp_path, capsys):
  """--param-dtype bfloat16 end to end: a bf16 model is evaluated, calibrated and fitted (in float32)."""
  with jax.numpy_dtype_promotion("standard"):  # a bf16 computation mixes in float32, as any bf16 model's does
    _bf16_compress(long_context_dir, tmp_path, capsys)


def _bf16_compress(long_context_dir, tmp_path, capsys):
  d, text = long_context_dir
  assert main(["eval", "--model", str(d), "--text", str(text), "--max-tokens", "200", "--param-dtype",
               "bfloat16"]) == 0
  bf16 = json.loads(capsys.readouterr().out)
  assert main(["eval", "--model", str(d), "--text", str(text), "--max-tokens", "200"]) == 0
  assert abs(bf16["nll"] - json.loads(capsys.readouterr().out)["nll"]) < 0.05
  out = tmp_path / "small"
  assert main(["compress", "--model", str(d), "--method", "svdllm", "--ratio", "0.5", "--calib", str(text),
               "--calib-windows", "4", "--param-dtype", "bfloat16", "--valid", str(text), "--max-tokens", "200",
               "--out", str(out)]) == 0
  report = json.loads((out / "report.json").read_text())
  assert report["perplexity_before"] > 1 and report["runs"][0]["perplexity"] > 1
