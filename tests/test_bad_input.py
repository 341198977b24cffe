"""A newcomer's bad inputs, each met by a clean error: the Python API raises ValueError with a message naming the
function, the argument or file, the value and what is expected; the CLI exits 2 with one line on stderr (or argparse's
usage error) and changes no input file."""

import hashlib
import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from tests.data.test_tokenizer import TEXT
from tnjax._io import LOCK_NAME, atomic_write, dir_lock, read_text
from tnjax.cli import main
from tnjax.data import SAMPLE_DIR, load_tokenizer, train_tokenizer
from tnjax.interop import load_hf_gpt2, load_model, save_model
from tnjax.models import GPT, preset
from tnjax.train import TrainConfig, resolve

pytestmark = pytest.mark.filterwarnings("ignore")

SMALL_MODEL = dict(vocab_size=300, block_size=64, n_layer=1, n_head=2, d_model=32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A tiny native model with its tokenizer, a text file, a binary file and a directory."""
  d = tmp_path_factory.mktemp("bad")
  text = d / "text.txt"
  text.write_text(TEXT)
  model = d / "model"
  save_model(GPT(preset("tiny", **SMALL_MODEL), rngs=nnx.Rngs(0)), model)
  train_tokenizer([text], 300).save(str(model / "tokenizer.json"))
  binary = d / "binary.bin"
  binary.write_bytes(bytes(range(256)) * 8)
  (d / "adir").mkdir()
  (d / "prompts.txt").write_text("In the beginning\nAnd God said\n")
  (d / "gap.txt").write_text("In the beginning\n\nAnd God said\n")
  (d / "empty.txt").write_text("")
  big = d / "big-tokenizer.json"  # another tokenizer, with more tokens than the model's vocabulary
  train_tokenizer([SAMPLE_DIR / "valid.txt"], 600).save(str(big))
  ttm = d / "ttm"  # the README's kind of model: every projection a TT-matrix
  save_model(GPT(preset("tiny", **SMALL_MODEL, layers={"*": {"kind": "ttm", "rank": 4}}), rngs=nnx.Rngs(0)), ttm)
  (ttm / "tokenizer.json").write_bytes((model / "tokenizer.json").read_bytes())
  return {"dir": d, "text": text, "model": model, "binary": binary, "adir": d / "adir", "prompts": d / "prompts.txt",
          "gap": d / "gap.txt", "empty": d / "empty.txt", "big": big, "ttm": ttm}


def _digest(path: pathlib.Path) -> dict:
  return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs `tnjax.cli.main` on each argv in one fresh Python process (one JAX start for many cases), with the process's
# file descriptor 2 sent to a file per case: whatever reaches the user's terminal (tracebacks printed by library
# threads or loggers included) is what the case sees. An exception main lets through is printed as a traceback.
_DRIVER = r"""
import json, os, sys, tempfile, traceback
if len(sys.argv) > 3:  # a file size limit: writes past it fail with EFBIG, as on a full disk
  import resource, signal
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]),) * 2)
from tnjax.cli import main
cases, results = json.loads(sys.argv[1]), []
for argv in cases:
  with tempfile.TemporaryFile("w+") as err:
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(err.fileno(), 2)
    try:
      rc = main(argv)
    except SystemExit as e:
      rc = e.code
    except BaseException:
      traceback.print_exc()
      rc = "raised"
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
    err.seek(0)
    results.append({"argv": argv, "rc": rc, "err": err.read()})
with open(sys.argv[2], "w") as f:
  json.dump(results, f)
"""


def cli_cases_in_a_process(cases: list[list[str]], tmp_path: pathlib.Path, timeout: float = 600,
                           file_size_limit: int | None = None) -> list[dict]:
  """``[{"argv", "rc", "err"}]`` of each ``tnjax`` command line in ``cases``, run in one real process (whose files
  cannot grow past ``file_size_limit`` bytes when it is given: a full disk)."""
  out = tmp_path / "cli-results.json"
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  limit = [] if file_size_limit is None else [str(file_size_limit)]
  done = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(cases), str(out), *limit], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0 and out.exists(), done.stderr[-3000:]
  return json.loads(out.read_text())


def assert_one_line(result: dict, match: str) -> None:
  """Exit code 2, one line on stderr starting ``tnjax <command>: `` and matching ``match``, no traceback."""
  lines, err = result["err"].strip().splitlines(), result["err"]
  said = f"tnjax {' '.join(result['argv'])}\nexit {result['rc']}, stderr:\n{err}"  # in full: pytest cuts reprs
  if result["rc"] != 2 or "Traceback" in err or len(lines) != 1:
    raise AssertionError(said)
  assert lines[0].startswith(f"tnjax {result['argv'][0]}: ") and re.search(match, lines[0]), (match, lines[0])


def _corrupt_copy(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
  dst.mkdir(parents=True, exist_ok=True)
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  edit(dst)
  return dst


# --- configuration: TrainConfig fields and --set values --------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    (["lr=abc"], r"TrainConfig: lr='abc' \(str\) but float is expected"),
    (["lr=NaN"], r"TrainConfig: lr=nan.*lr > 0"),
    (["grad_clip=-1"], r"TrainConfig: grad_clip=-1 but finite grad_clip > 0 is expected"),
    (["grad_clip=0"], r"grad_clip=0 but finite grad_clip > 0"),
    (["b1=1.0"], r"TrainConfig: b1=1.0 but finite 0 <= b1 < 1 is expected"),
    (["b2=-0.1"], r"TrainConfig: b2=-0.1 but finite 0 <= b2 < 1"),
    (["weight_decay=-0.1"], r"TrainConfig: weight_decay=-0.1 but finite weight_decay >= 0"),
    (["seed=-1"], r"TrainConfig: seed=-1 but finite seed >= 0"),
    (["seed=1.5"], r"TrainConfig: seed=1.5 \(float\) but int is expected"),
    (["fsdp=\"yes\""], r"TrainConfig: fsdp='yes' \(str\) but bool is expected"),
    (["steps=true"], r"TrainConfig: steps=True \(bool\) but int is expected"),
    (["train_files=x.txt"], r"TrainConfig: train_files='x.txt' \(str\) but list\[str\] is expected"),
    (["valid_files=[]"], r"TrainConfig: valid_files=\[\] but at least one text file is expected"),
    (["tokenizer=3"], r"TrainConfig: tokenizer=3 \(int\) but str \| None is expected"),
    (["warmup=-1"], r"warmup=-1 but lr > 0, 0 <= min_lr_ratio <= 1 and warmup >= 0"),
    (["min_lr_ratio=2"], r"min_lr_ratio=2, warmup=20 but"),
    (["vocab_size=0"], r"TrainConfig: vocab_size=0 but a positive integer"),
    (["model=gpt5"], r"do not make a model: preset: name='gpt5'"),
    (["model_overrides.n_layer=\"x\""], r"do not make a model: GPTConfig: n_layer='x'"),
    (["model_overrides.bogus=1"], r"do not make a model: .*bogus"),
    (['layers.mlp.c_fc={"kind": "bogus"}'], r"do not make a model: GPTConfig: .*kind='bogus'"),
    (['layers.mlp.c_fc={"kind": "ttm", rank: 8}'], r"--set: layers.mlp.c_fc=.* is not valid JSON"),
    (['train_files=["a.txt"'], r"--set: train_files=.* is not valid JSON"),
    (["warmup=100000", "steps=20"], r"TrainConfig: warmup=100000 but steps=20; warmup < steps is expected"),
    (["steps=20"], r"TrainConfig: warmup=20 but steps=20; warmup < steps"),
    (["model_overrides.layer_norm_eps=-1"], r"do not make a model: GPTConfig: layer_norm_eps=-1 \(int\) but a finite "
                                            r"number > 0"),
    (["stepz=3"], r"--set: unknown field 'stepz'"),
    (["steps"], r"--set: 'steps' but key=value is expected"),
])
def test_config_values(overrides, match):
  with pytest.raises(ValueError, match=match):
    resolve(None, overrides)


@pytest.mark.parametrize("name, overrides, match", [
    ("tiny", dict(layer_norm_eps=-1), r"GPTConfig: layer_norm_eps=-1 \(int\) but a finite number > 0 is expected"),
    ("tiny", dict(layer_norm_eps=0.0), r"GPTConfig: layer_norm_eps=0.0 \(float\) but a finite number > 0"),
    ("tiny", dict(layer_norm_eps=float("nan")), r"GPTConfig: layer_norm_eps=nan \(float\) but a finite number > 0"),
    ("tiny", dict(layer_norm_eps="1e-5"), r"GPTConfig: layer_norm_eps='1e-5' \(str\) but a finite number > 0"),
    ("tiny", dict(init_std=float("inf")), r"GPTConfig: init_std=inf \(float\) but a finite number is expected"),
    ("tiny", dict(dropout="0.1"), r"GPTConfig: dropout='0.1' \(str\) but a finite number is expected"),
    ("tiny", dict(tie_embeddings="yes"), r"GPTConfig: tie_embeddings='yes' \(str\) but true or false is expected"),
    ("tiny", dict(d_ff="512"), r"GPTConfig: d_ff='512' but a positive integer is expected"),
    ("llama-tiny", dict(rms_norm_eps=-1e-6), r"LlamaConfig: rms_norm_eps=-1e-06 \(float\) but a finite number > 0"),
    ("llama-tiny", dict(rope_theta="1e4"), r"LlamaConfig: rope_theta='1e4' \(str\) but a finite number"),
    ("llama-tiny", dict(n_kv_head=0), r"LlamaConfig: n_kv_head=0 but a positive integer"),
])
def test_model_config_scalars_are_checked(name, overrides, match):
  """Before, preset(layer_norm_eps=-1) built a model whose every output was NaN, and a string eps failed in the
  forward pass."""
  with pytest.raises(ValueError, match=match):
    preset(name, **overrides)


def test_hf_config_with_a_string_number_is_refused_at_load_naming_the_field_and_file(tmp_path):
  from tnjax.interop import save_hf_gpt2

  d = save_hf_gpt2(GPT(preset("tiny", **SMALL_MODEL), rngs=nnx.Rngs(0)), tmp_path / "hf")
  hf = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**hf, "layer_norm_epsilon": "1e-5"}))
  with pytest.raises(ValueError, match=r"^GPTConfig: layer_norm_eps='1e-5' \(str\) but a finite number > 0 is "
                                       rf"expected \(in {re.escape(str(d / 'config.json'))}\)$"):
    load_hf_gpt2(d)
  (d / "config.json").write_text(json.dumps({**hf, "n_layer": "1"}))
  with pytest.raises(ValueError, match=r"GPTConfig: n_layer='1' but a positive integer .*\(in .*config.json\)"):
    load_hf_gpt2(d)


def test_config_files(files, tmp_path):
  with pytest.raises(ValueError, match=r"resolve: config file .*nope.toml does not exist"):
    resolve(str(tmp_path / "nope.toml"))
  with pytest.raises(ValueError, match=r"resolve: config file .*adir does not exist or is not a file"):
    resolve(str(files["adir"]))
  bad = tmp_path / "bad.toml"
  bad.write_text("steps = = 3\n")
  with pytest.raises(ValueError, match=r"resolve: config file .*bad.toml is not valid UTF-8 TOML"):
    resolve(str(bad))
  with pytest.raises(ValueError, match=r"resolve: config file .*binary.bin is not valid UTF-8 TOML"):
    resolve(str(files["binary"]))
  unknown = tmp_path / "unknown.toml"
  unknown.write_text("stepz = 3\n")
  with pytest.raises(ValueError, match=r"TrainConfig: unknown fields \['stepz'\]"):
    resolve(str(unknown))
  with pytest.raises(ValueError, match=r"TrainConfig: grad_clip=-2.0 but finite grad_clip > 0"):
    TrainConfig(grad_clip=-2.0).validate()


# --- files: text, tokenizers, models ---------------------------------------------------------------------------------

def test_text_files(files, tmp_path):
  with pytest.raises(ValueError, match=r"eval: --text file .*nowhere.txt does not exist"):
    read_text("eval", "--text", tmp_path / "nowhere.txt")
  with pytest.raises(ValueError, match=r"eval: --text file .*adir is not a regular file"):
    read_text("eval", "--text", files["adir"])
  with pytest.raises(ValueError, match=r"eval: --text file .*binary.bin is not UTF-8 text \(byte 128"):
    read_text("eval", "--text", files["binary"])
  nul = tmp_path / "nul.txt"
  nul.write_bytes(b"abc\x00def")
  with pytest.raises(ValueError, match=r"contains NUL bytes"):
    read_text("eval", "--text", nul)
  with pytest.raises(ValueError, match=r"train_tokenizer: text file .*binary.bin is not UTF-8 text"):
    train_tokenizer([files["binary"]], 300)
  with pytest.raises(ValueError, match=r"train_tokenizer: file .*nowhere.txt does not exist"):
    train_tokenizer([tmp_path / "nowhere.txt"], 300)


def test_tokenizer_files(files, tmp_path):
  with pytest.raises(ValueError, match=r"load_tokenizer: .*nowhere does not exist"):
    load_tokenizer(tmp_path / "nowhere")
  garbled = tmp_path / "tokenizer.json"
  garbled.write_text('{"version": "1.0", "model": 17')
  with pytest.raises(ValueError, match=r"load_tokenizer: .*tokenizer.json is not a readable tokenizer"):
    load_tokenizer(garbled)
  with pytest.raises(ValueError, match=r"load_tokenizer: .*adir has no tokenizer.json"):
    load_tokenizer(files["adir"])


def _truncate(d):
  data = (d / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _garble_header(d):
  data = bytearray((d / "model.safetensors").read_bytes())
  data[8:40] = b"#" * 32
  (d / "model.safetensors").write_bytes(bytes(data))


def _overwrite_values(d):
  data = bytearray((d / "model.safetensors").read_bytes())
  data[-4000:] = b"\xff" * 4000  # 0xffffffff is a float32 NaN
  (d / "model.safetensors").write_bytes(bytes(data))


def _bad_config_json(d):
  (d / "config.json").write_text('{"format": "tnjax-gpt", "config": ')


def _other_format(d):
  meta = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**meta, "format": "keras"}))


def _bad_config_field(d):
  meta = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**meta, "config": {**meta["config"], "n_layer": "two"}}))


def _wrong_shape(d):
  from safetensors.numpy import load_file, save_file

  tensors = load_file(str(d / "model.safetensors"))
  name = next(k for k, v in tensors.items() if v.ndim == 1)
  tensors[name] = np.zeros(tensors[name].shape[0] + 1, tensors[name].dtype)
  save_file(tensors, str(d / "model.safetensors"))


@pytest.mark.parametrize("edit, match", [
    (_truncate, r"load_model: .*model.safetensors is not a readable safetensors file .*truncated or corrupt"),
    (_garble_header, r"load_model: .*model.safetensors is not a readable safetensors file"),
    (_overwrite_values, r"load_model: tensor .* in .*model.safetensors has NaN or infinite values"),
    (_bad_config_json, r"load_model: .*config.json is not valid JSON"),
    (_other_format, r"load_model: .*config.json has format='keras' but 'tnjax-gpt' is expected"),
    (_bad_config_field, r"load_model: .*config.json has no valid GPT config .*n_layer='two'"),
    (_wrong_shape, r"load_model: parameter .* has shape .* is expected \(in .*model.safetensors\)"),
    (lambda d: (d / "model.safetensors").unlink(), r"load_model: .*model.safetensors does not exist"),
])
def test_corrupt_model_files(files, tmp_path, edit, match):
  with pytest.raises(ValueError, match=match):
    load_model(_corrupt_copy(files["model"], tmp_path / "m", edit))


def _rewrite(name_and_edit):
  """An edit of a model directory's safetensors: ``name_and_edit(tensors)`` changes the dict in place."""
  def edit(d):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    name_and_edit(tensors)
    save_file(tensors, str(d / "model.safetensors"))
  return edit


def _as_int(tensors):
  tensors["wte.embedding"] = tensors["wte.embedding"].astype(np.int32)


def _unchained(tensors):  # core 1's first rank is not core 0's last
  c = tensors["h.0.mlp.c_fc.cores.1"]
  tensors["h.0.mlp.c_fc.cores.1"] = np.zeros((c.shape[0] + 1,) + c.shape[1:], c.dtype)


def _wrong_modes(tensors):  # core 1's input mode is not the layer's
  c = tensors["h.0.mlp.c_fc.cores.1"]
  tensors["h.0.mlp.c_fc.cores.1"] = np.zeros((c.shape[0], c.shape[1] + 1) + c.shape[2:], c.dtype)


@pytest.mark.parametrize("model, edit, match", [
    ("model", _as_int, r"load_model: parameter wte.embedding has dtype int32 but a floating dtype \(float32\) is "
                       r"expected \(in .*model.safetensors\)$"),
    ("ttm", _unchained, r"load_model: parameter h.0.mlp.c_fc.cores.1 has shape \(5, 4, 4, 4\) but \(4, 4, 4, 4\) is "
                        r"expected; a TT core's first and last axes are the ranks it shares with its neighbours"),
    ("ttm", _wrong_modes, r"load_model: parameter h.0.mlp.c_fc.cores.1 has shape \(4, 5, 4, 4\) but \(4, 4, 4, 4\) "
                          r"is expected"),
], ids=["float-stored-as-int", "tt-ranks-do-not-chain", "tt-mode-size"])
def test_a_model_file_that_does_not_match_its_config_is_refused_by_tensor(files, tmp_path, model, edit, match):
  """A float model stored as integers evaluated (ppl 1024, rc 0); unchained TT cores failed in dot_general; a wrong
  mode size said 'index can't contain negative values'."""
  with pytest.raises(ValueError, match=match):
    load_model(_corrupt_copy(files[model], tmp_path / "m", _rewrite(edit)))


def test_corrupt_hf_files(tmp_path):
  d = tmp_path / "hf"
  d.mkdir()
  (d / "config.json").write_text('{"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2}')
  (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
  with pytest.raises(ValueError, match=r"load_hf_gpt2: .*model.safetensors is not a readable safetensors file"):
    load_hf_gpt2(d)
  (d / "config.json").write_text("[1, 2")
  with pytest.raises(ValueError, match=r"load_hf_gpt2: .*config.json is not valid JSON"):
    load_hf_gpt2(d)


def test_non_finite_perplexity_is_an_error(files):
  from tnjax.eval import perplexity

  model = load_model(files["model"])
  model.ln_f.scale[...] = model.ln_f.scale[...] * np.nan
  with pytest.raises(ValueError, match=r"perplexity: the mean negative log-likelihood is nan .* finite value"):
    perplexity(model, np.arange(40) % 300, block_size=16)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
  target = tmp_path / "report.json"
  target.write_text("old")

  def half_then_fail(tmp):
    pathlib.Path(tmp).write_text("half")
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    atomic_write(target, half_then_fail)
  assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def _dead_pid() -> int:
  """The PID of a process of this host that has ended."""
  done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  return int(done.stdout)


def test_dir_lock_refuses_a_second_run_and_takes_over_a_dead_ones(tmp_path):
  lock = tmp_path / LOCK_NAME
  with dir_lock("compress", tmp_path):
    holder = json.loads(lock.read_text())
    assert (holder["pid"], holder["host"], holder["command"]) == (os.getpid(), socket.gethostname(), "compress")
    with pytest.raises(ValueError, match=rf"train: {re.escape(str(tmp_path))} is in use by another run \(pid "
                                         rf"{os.getpid()} on host .*, tnjax compress since .*; lock file .*; wait for "
                                         rf"it to end or choose another directory; if that process is gone, delete"):
      with dir_lock("train", tmp_path):
        pass
    assert json.loads(lock.read_text()) == holder  # the refused run leaves the holder's lock alone
  assert not lock.exists()
  for stop in (OSError("disk full"), KeyboardInterrupt()):  # removed on errors and Ctrl-C too
    with pytest.raises(type(stop)):
      with dir_lock("compress", tmp_path):
        raise stop
    assert not lock.exists()

  # A lock left by a process of this host that is gone (SIGKILL, a crash) is stale: taken over, then removed.
  lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "command": "train", "since": "x"}))
  with dir_lock("compress", tmp_path):
    assert json.loads(lock.read_text())["pid"] == os.getpid()
  assert [p.name for p in tmp_path.iterdir()] == []
  # Another host's processes cannot be checked, nor can a lock file be read: refused, saying how to clear it.
  for text, who in ((json.dumps({"pid": 1, "host": "elsewhere", "command": "train", "since": "x"}),
                     "pid 1 on host elsewhere"), ("", "holder unknown")):
    lock.write_text(text)
    with pytest.raises(ValueError, match=rf"is in use by another run \({who}.*delete {re.escape(str(lock))}$"):
      with dir_lock("compress", tmp_path):
        pass
    assert lock.read_text() == text


def _train_argv(f, out, *extra):
  sets = ['model_overrides={"n_layer": 1, "d_model": 32, "n_head": 2}', "layers={}", "vocab_size=300",
          "block_size=16", "batch_size=2", "eval_batches=1", "steps=2", "warmup=1", f"train_files=[\"{f['text']}\"]",
          f"valid_files=[\"{f['text']}\"]", f"out_dir={out}", *extra]
  return ["train", "--no-progress"] + [a for s in sets for a in ("--set", s)]


@pytest.mark.parametrize("field, content, match", [
    ("test_files", b"", r"train: test_files has '.*bad.txt', which is empty"),
    ("test_files", bytes(range(256)) * 4, r"train: test_files: token_cache: text file .*bad.txt is not UTF-8 text"),
    ("test_files", b"In the beginning", r"train: test_files \['.*bad.txt'\] hold \d+ tokens but block_size=16 needs "
                                        r"at least 18"),
    ("valid_files", b"In the beginning", r"train: valid_files \['.*bad.txt'\] hold \d+ tokens but block_size=16"),
    ("train_files", b"In the beginning", r"train: train_files \['.*bad.txt'\] hold \d+ tokens but block_size=16"),
    ("train_files", bytes(range(256)) * 4, r"train: train_files: train_tokenizer: text file .*bad.txt is not UTF-8"),
], ids=["test-empty", "test-binary", "test-short", "valid-short", "train-short", "train-binary"])
def test_train_refuses_every_bad_data_file_before_the_first_step(files, tmp_path, monkeypatch, capsys, field,
                                                                 content, match):
  """Test files too: found only after training, a bad one left a run without model or report, and not resumable."""
  from tnjax.train import Trainer

  bad = tmp_path / "bad.txt"
  bad.write_bytes(content)
  monkeypatch.setattr(Trainer, "__init__", lambda *a, **k: pytest.fail("a model was built before the refusal"))
  out = tmp_path / "run"
  before = _digest(files["dir"])
  assert main(_train_argv(files, out, f"{field}=[\"{bad}\"]")) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("tnjax train: ") and re.search(match, lines[0]), lines
  assert {k: v for k, v in _digest(files["dir"]).items() if k in before} == before and bad.read_bytes() == content
  # nothing that would block a corrected run: no checkpoints, no saved config, no lock
  assert not (out / "checkpoints").exists() and not (out / "train_config.json").exists()
  assert not (out / LOCK_NAME).exists()


def test_train_refuses_batches_larger_than_the_host_before_any_work(files, tmp_path, monkeypatch):
  """Before, --set batch_size=1000000000 trained a tokenizer and cached the data, then ran out of memory."""
  import tnjax.train.loop

  monkeypatch.setattr(tnjax.train.loop, "train_tokenizer", lambda *a: pytest.fail("work began before the refusal"))
  out = tmp_path / "run"
  cfg = resolve(None, _train_argv(files, out, "batch_size=1000000000")[3::2])
  with pytest.raises(ValueError, match=r"train: batch_size=1,000,000,000 \(and eval_batches=1 validation batches\) of "
                                       r"block_size=16 tokens need [\d,.]+ GiB of host memory .* but this host has "
                                       r"[\d,.]+ GiB; lower batch_size or eval_batches"):
    tnjax.train.train(cfg, progress=False)
  assert not out.exists()


def test_a_vocab_size_the_text_cannot_reach_is_said(files, tmp_path, monkeypatch, capsys):
  """Before, --set vocab_size=10000000 gave a 4,971-token tokenizer without a word; now it is said once every file
  has been checked (so that a refusal stays one line)."""
  from tnjax.train import Trainer

  monkeypatch.setattr(Trainer, "__init__", lambda *a, **k: pytest.fail("stop"))
  with pytest.raises(pytest.fail.Exception, match="stop"):
    main(_train_argv(files, tmp_path / "run", "vocab_size=100000"))
  size = load_tokenizer(tmp_path / "run" / "tokenizer.json").get_vocab_size()
  assert 257 < size < 100000
  assert capsys.readouterr().err == (f"train: the tokenizer trained on train_files has {size:,} tokens, fewer than "
                                     "vocab_size=100,000 (the text has no more merges seen twice); the model gets "
                                     f"{size:,}\n")


def _saved_run(files, out, *extra):
  """A run directory as `train` leaves it before its first step: ``train_config.json`` only."""
  cfg = resolve(None, _train_argv(files, out, 'layers.mlp.c_fc={"kind": "ttm", "rank": 4}', *extra)[3::2])
  out.mkdir(parents=True)
  (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
  return cfg


def test_resume_takes_the_saved_config_and_refuses_changes_to_the_model_or_data(files, tmp_path):
  """The README's `tnjax train --set steps=4000 --set out_dir=runs/x --resume`, after a run started with other
  --set options, exited 2 (`differs from the saved one in ['layers']`): every --set had to be repeated."""
  from tnjax.train import train

  out = tmp_path / "run"
  saved = _saved_run(files, out)
  cfg = resolve(None, ["steps=4000", f"out_dir={out}"], resume=True)
  assert cfg.to_dict() == {**saved.to_dict(), "steps": 4000}
  assert resolve(None, [f"out_dir={out}", "lr=0.001", "grad_accum=2"], resume=True).lr == 0.001  # RESUMABLE
  before = _digest(out)
  for change, fields in (("block_size=32", "['block_size']"), ('layers.mlp.c_fc="dense"', "['layers']"),
                         ("seed=3", "['seed']"), (f"valid_files=[\"{files['binary']}\"]", "['valid_files']")):
    changed = resolve(None, [f"out_dir={out}", "steps=10", change], resume=True)
    with pytest.raises(ValueError, match=rf"^train: --resume with a configuration that differs from the saved one in "
                                         rf"{re.escape(fields)} \({re.escape(str(out / 'train_config.json'))}\); they "
                                         r"set the model or the data it trains on"):
      train(changed, resume=True, progress=False)
  assert _digest(out) == before and not (out / LOCK_NAME).exists()


@pytest.mark.slow  # three short training runs in two processes (~25 s)
def test_the_readmes_resume_path_works_as_written(files, tmp_path):
  """A run started with extra --set options, then the README's `--set steps=N --set out_dir=DIR --resume`; a new run
  from the saved `--config RUN/train_config.json`; a garbled metrics.jsonl line named on the next resume."""
  out, again = tmp_path / "run", tmp_path / "again"
  first = _train_argv(files, out, 'layers.mlp.c_fc={"kind": "ttm", "rank": 4}', "steps=4", "eval_every=2",
                      "checkpoint_every=2", "warmup=2")
  resume = ["train", "--no-progress", "--set", "steps=8", "--set", f"out_dir={out}", "--resume"]
  new = ["train", "--no-progress", "--config", str(out / "train_config.json"), "--set", f"out_dir={again}"]
  results = cli_cases_in_a_process([first, resume, new], tmp_path)
  assert [r["rc"] for r in results] == [0, 0, 0], results
  assert "train: resuming at step 4 with steps=8 (the saved run had steps=4); the cosine learning-rate schedule " \
         "changes: at step 4 the rate is " in results[1]["err"] and "best_model/ keeps the model" in results[1]["err"]
  saved = json.loads((out / "train_config.json").read_text())
  assert saved["steps"] == 8 and saved["layers"]["mlp.c_fc"] == {"kind": "ttm", "rank": 4}
  assert json.loads((out / "report.json").read_text())["steps"] == 8
  assert json.loads((again / "train_config.json").read_text()) == {**saved, "out_dir": str(again)}
  from tnjax.data import tokenizer_fingerprint
  from tnjax.interop.native import saved_tokenizer

  fingerprint = tokenizer_fingerprint(load_tokenizer(out / "tokenizer.json"))
  for d in (out / "model", out / "best_model"):  # both load, with their tokenizer and its fingerprint
    assert load_model(d).config.spec("mlp.c_fc", 0).rank == 4 and saved_tokenizer(d)["fingerprint"] == fingerprint
    assert tokenizer_fingerprint(load_tokenizer(d)) == fingerprint

  with open(out / "metrics.jsonl", "a") as f:
    f.write('{"step": 9, "lo\n')
  before = _digest(out)
  (result,) = cli_cases_in_a_process([resume[:3] + ["steps=12"] + resume[4:]], tmp_path)
  assert_one_line(result, rf"train: {re.escape(str(out / 'metrics.jsonl'))} line \d+ is not valid JSON")
  assert _digest(out) == before


def test_a_run_config_json_is_a_config_file(files, tmp_path):
  """`tnjax train --config RUN/train_config.json` read TOML only."""
  out = tmp_path / "run"
  saved = _saved_run(files, out)
  again = resolve(str(out / "train_config.json"), [f"out_dir={tmp_path / 'new'}"])
  assert again.to_dict() == {**saved.to_dict(), "out_dir": str(tmp_path / "new")}
  for text, match in (('{"steps": 3', r"resolve: .*bad.json is not valid JSON"),
                      ("[1, 2]", r"resolve: config file .*bad.json holds list but a JSON object of TrainConfig"),
                      ('{"stepz": 3}', r"TrainConfig: unknown fields \['stepz'\]")):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(ValueError, match=match):
      resolve(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("text, match", [
    ('{"steps": 3', r"resolve: .*train_config.json is not valid JSON"),
    ("[]", r"resolve: .*train_config.json holds list but a JSON object of TrainConfig fields is expected"),
    ('{"stepz": 3}', r"resolve: .*train_config.json has unknown fields \['stepz'\]; it is not a tnjax run"),
    (b"\xff\xfe", r"resolve: JSON file .*train_config.json is not UTF-8 text"),
])
def test_resume_names_a_garbled_saved_config(tmp_path, text, match):
  (tmp_path / "train_config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
  with pytest.raises(ValueError, match=match):
    resolve(None, [f"out_dir={tmp_path}"], resume=True)


def test_garbled_run_files_are_named(files, tmp_path):
  """A garbled tokenizer.source.json or metrics.jsonl line raised a bare JSONDecodeError (no file named)."""
  from tnjax.train.loop import _tokenizer, read_metrics

  out = tmp_path / "run"
  cfg = _saved_run(files, out)
  _tokenizer(cfg, out, resume=False)
  (out / "tokenizer.source.json").write_text('{"vocab_size": 3')
  with pytest.raises(ValueError, match=r"^train: .*tokenizer.source.json is not valid JSON"):
    _tokenizer(cfg, out, resume=True)
  metrics = out / "metrics.jsonl"
  for text, why in (('{"step": 1, "loss": 2.0}\n{"step": 2, "lo', "line 2 is not valid JSON"),
                    ('{"step": 1}\n\n[3]\n', "line 3 is not a JSON object with an integer 'step'"),
                    ('{"loss": 2.0}\n', "line 1 is not a JSON object with an integer 'step'")):
    metrics.write_text(text)
    with pytest.raises(ValueError, match=rf"^train: {re.escape(str(metrics))} {re.escape(why)}.*the metrics log is "
                                         r"corrupt"):
      read_metrics("train", metrics)
  assert read_metrics("train", tmp_path / "none.jsonl") == []


def test_a_truncated_or_changed_token_cache_is_refused_naming_it(files, tmp_path):
  """A truncated cache trained on 100 tokens: its manifest recorded neither its size nor its hash."""
  from tnjax.data import token_cache

  tok, cache = load_tokenizer(files["model"]), tmp_path / "cache"
  n = len(token_cache([files["text"]], tok, cache, "train"))
  binary, meta = cache / "train.bin", cache / "train.json"
  assert json.loads(meta.read_text())["tokens"] == n
  data = binary.read_bytes()
  for edit, what in ((data[:200], r"holds 100 tokens \(200 bytes\)"),
                     (data[:-2] + bytes([data[-2] ^ 1, data[-1]]),
                      rf"holds {n:,} tokens whose SHA-256 differs from the recorded one")):
    binary.write_bytes(edit)
    with pytest.raises(ValueError, match=rf"^token_cache: {re.escape(str(binary))} {what} but its manifest "
                                         rf"{re.escape(str(meta))} records tokens={n} and their SHA-256; the cache is "
                                         r"truncated or was changed: delete it to rebuild it"):
      token_cache([files["text"]], tok, cache, "train")
    assert binary.read_bytes() == edit  # refused, not rewritten
  binary.write_bytes(data)
  assert len(token_cache([files["text"]], tok, cache, "train")) == n
  manifest = json.loads(meta.read_text())
  meta.write_text(json.dumps({k: v for k, v in manifest.items() if k not in ("tokens", "sha256")}))
  assert len(token_cache([files["text"]], tok, cache, "train")) == n  # a manifest of before: rebuilt once
  assert json.loads(meta.read_text()) == manifest
  meta.write_text('{"tokenizer": ')
  with pytest.raises(ValueError, match=r"^token_cache: .*train.json is not valid JSON .*; it is the manifest of the "
                                       r"token cache .*train.bin: delete both files to rebuild them$"):
    token_cache([files["text"]], tok, cache, "train")


def _gapped_tokenizer(path: pathlib.Path) -> pathlib.Path:
  """A word-level tokenizer of 3 tokens whose ids reach 4000 (a vocabulary with gaps)."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  tok = Tokenizer(models.WordLevel({"[UNK]": 0, "<|endoftext|>": 1, "the": 4000}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(path))
  return path


def test_ids_past_the_vocabulary_are_refused_before_training(files, tmp_path, monkeypatch, capsys):
  """Out-of-vocabulary ids made NaN losses, reported as 'training diverged; lower lr'."""
  from tnjax.train import Trainer

  monkeypatch.setattr(Trainer, "__init__", lambda *a, **k: pytest.fail("a model was built before the refusal"))
  tok = _gapped_tokenizer(tmp_path / "gapped.json")
  assert main(_train_argv(files, tmp_path / "run", f"tokenizer={tok}")) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  match = (r"^tnjax train: train: train_files \['.*text.txt'\] encode to id 4,000 but the tokenizer "
           rf"\({re.escape(str(tok))}\) has 3 tokens, the model's vocab_size; its ids are expected in 0..2")
  assert len(lines) == 1 and re.search(match, lines[0]), lines


@pytest.mark.slow  # a training process
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a file size limit (RLIMIT_FSIZE) stands in for a "
                    "full disk")
def test_a_full_disk_during_training_is_one_line(files, tmp_path):
  """A full disk printed the right last line after 22-72 orbax tracebacks (its save threads log each failure)."""
  out = tmp_path / "run"
  argv = _train_argv(files, out, "steps=4", "checkpoint_every=2", "eval_every=2")
  (result,) = cli_cases_in_a_process([argv], tmp_path, file_size_limit=100_000)  # the model files are larger
  assert_one_line(result, rf"train: saving a checkpoint in {re.escape(str(out / 'checkpoints'))} failed \(.*\); is "
                          r"the disk full\? Free space and run again with --resume, which continues from |"
                          rf"{re.escape(str(out))}/.*model.safetensors: writing it failed \(File too large; is the "
                          r"disk full\?\)")


def test_train_into_a_directory_in_use_is_refused_and_changes_nothing(files, tmp_path, capsys):
  out = tmp_path / "run"
  out.mkdir()
  with dir_lock("train", out):  # as a first `tnjax train` into out_dir holds it while it runs
    before = _digest(out)
    assert main(_train_argv(files, out)) == 2
    assert _digest(out) == before
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"tnjax train: train: {out} is in use by another run (pid "), lines
  assert list(out.iterdir()) == []


# --- compression ------------------------------------------------------------------------------------------------------

def test_compress_api_refusals(files, tmp_path):
  from tnjax.compress.report import parse_targets, run

  model = load_model(files["model"])
  with pytest.raises(ValueError, match=r"compress: no target given but one of --rank, --ratio, --rtol"):
    parse_targets(None, None, None)
  with pytest.raises(ValueError, match=r"compress: target \{'rank': None\} but one of rank, ratio, rtol"):
    run(model, "svd", tmp_path / "a", targets=[{"rank": None}])
  with pytest.raises(ValueError, match=r"svd_compress: rank=4096 would give layer 'h.0.attn.c_attn' 4,096 "
                                       r"parameters but it stores 3,072 now"):
    run(model, "svd", tmp_path / "b", targets=[{"rank": 4096}])
  ttm = GPT(preset("tiny", **SMALL_MODEL, layers={"mlp.c_fc": {"kind": "ttm", "rank": 4}}), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"compress: method='modegpt' but layers \['h.0.mlp.c_fc'\] are not dense"):
    run(ttm, "modegpt", tmp_path / "c", targets=[{"ratio": 0.9}], calib_ids=list(range(300)) * 4)
  before = _digest(files["model"])
  with pytest.raises(ValueError, match=r"compress: out_dir .*model already holds \['config.json', "
                                       r"'model.safetensors'\]; choose a new directory or pass --overwrite"):
    run(model, "svd", files["model"], targets=[{"ratio": 0.5}])
  assert _digest(files["model"]) == before


def test_compress_refuses_a_layer_with_nan_naming_it(files):
  """svd_compress of a layer holding NaN gave NaN factors (mpo raised, naming no layer)."""
  from tnjax.compress import mpo_compress, svd_compress, svdllm_compress

  model = load_model(files["model"])
  model.h[0].mlp.c_fc.kernel[...] = model.h[0].mlp.c_fc.kernel[...].at[3, 5].set(np.nan)
  calib = np.arange(4 * 64).reshape(4, 64) % 300
  for name, compress in (("svd_compress", lambda: svd_compress(model, ratio=0.5)),
                         ("svdllm_compress", lambda: svdllm_compress(model, calib, ratio=0.5)),
                         ("mpo_compress", lambda: mpo_compress(model, rank=4))):
    with pytest.raises(ValueError, match=rf"^{name}: layer 'h.0.mlp.c_fc' has non-finite values \(NaN or Inf\); "
                                         "expected finite input$"):
      compress()


def test_a_model_directory_refuses_another_tokenizer(files, tmp_path, capsys):
  """A tokenizer trained on other text, with the same vocabulary size, evaluated to nonsense (ppl 1256): nothing
  tied a tokenizer to its model. Directories written before models recorded one keep working."""
  from tnjax.data import tokenizer_fingerprint
  from tnjax.interop.native import saved_tokenizer

  tok = load_tokenizer(files["model"])
  d = save_model(load_model(files["model"]), tmp_path / "m", tokenizer=tok)
  assert saved_tokenizer(d) == {"fingerprint": tokenizer_fingerprint(tok), "vocab_size": 300}
  assert tokenizer_fingerprint(load_tokenizer(d)) == tokenizer_fingerprint(tok)  # written and read back: the same
  assert saved_tokenizer(files["model"]) is None  # written without one: nothing is checked
  other = tmp_path / "other.json"  # the same size, from other text
  train_tokenizer([SAMPLE_DIR / "valid.txt"], 300).save(str(other))
  text = str(files["text"])
  before = _digest(d)
  assert main(["eval", "--model", str(d), "--text", text, "--tokenizer", str(other)]) == 2
  fp, theirs = tokenizer_fingerprint(load_tokenizer(other))[:12], tokenizer_fingerprint(tok)[:12]
  assert capsys.readouterr().err == (
      f"tnjax eval: --tokenizer: the tokenizer {other} (300 tokens, fingerprint {fp}) is not the one {d} was written "
      f"with (300 tokens, fingerprint {theirs}; its config.json records it): its ids would mean other text; give "
      "that tokenizer\n")
  (d / "tokenizer.json").write_bytes(other.read_bytes())  # the directory's own tokenizer replaced
  assert main(["generate", "--model", str(d), "--prompt", "In the beginning"]) == 2
  assert re.fullmatch(rf"tnjax generate: --model: the tokenizer {re.escape(str(d))}/tokenizer.json \(300 tokens, "
                      rf"fingerprint {fp}\) is not the one .*\n", capsys.readouterr().err)
  assert {k: v for k, v in _digest(d).items() if not k.endswith("tokenizer.json")} == \
      {k: v for k, v in before.items() if not k.endswith("tokenizer.json")}
  assert main(["eval", "--model", str(files["model"]), "--text", text, "--tokenizer", str(other)]) == 0


def test_compress_api_warns_when_its_default_layers_re_factor_tensorized_ones(files):
  """svd/svdllm on a TT-matrix model re-factored every layer into low-rank ones without a word (ppl 262 at 90% kept
  against 47.6, and 20-50x slower than on dense)."""
  import warnings

  from tnjax.compress import projection_names, svd_compress
  from tnjax.compress.methods import refactored

  model = load_model(files["ttm"])
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the warning comes before any work: raised, it stops the call there
    with pytest.raises(UserWarning, match=r"^svd_compress: the default layers include 4 ttm layers \(h.0.attn.c_attn, "
                                          r"h.0.attn.c_proj, h.0.mlp.c_fc, h.0.mlp.c_proj\), which it re-factors "
                                          r"into lowrank layers from their dense reconstruction .*name them with "
                                          r"layers="):
      svd_compress(model, ratio=0.5)
    svd_compress(model, rank=2, layers=["h.0.mlp.c_fc"])  # named: consent
  # TT-matrix layers into TT-matrix layers (mpo) is a rounding, not a re-factoring; dense ones are never re-factored
  assert refactored(model.config, projection_names(model.config), "ttm") == {}
  assert refactored(load_model(files["model"]).config, projection_names(model.config), "lowrank") == {}


def test_compress_cli_refuses_to_re_factor_tensorized_layers_unless_asked(files, tmp_path, capsys):
  m = str(files["ttm"])
  argv = ["compress", "--model", m, "--method", "svd", "--ratio", "0.5", "--out", str(tmp_path / "o")]
  before = _digest(files["ttm"])
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("tnjax compress: compress: the default layers include 4 ttm layers "
                                                 "(h.0.attn.c_attn, h.0.attn.c_proj, h.0.mlp.c_fc, h.0.mlp.c_proj), "
                                                 "which --method svd re-factors into lowrank layers"), err
  assert "pass --refactor-tensorized to do so, or name the layers to compress with --layers" in err
  assert not (tmp_path / "o").exists() and _digest(files["ttm"]) == before
  assert main(argv + ["--refactor-tensorized"]) == 0
  assert main(argv[:-1] + [str(tmp_path / "named"), "--layers", "mlp.c_fc"]) == 0
  assert "re-factors" not in capsys.readouterr().err
  from tnjax.data import tokenizer_fingerprint
  from tnjax.interop.native import saved_tokenizer

  # the compressed model records its tokenizer's fingerprint
  fingerprint = tokenizer_fingerprint(load_tokenizer(files["ttm"]))
  assert saved_tokenizer(tmp_path / "named" / "model")["fingerprint"] == fingerprint


def _readme_commands(*docs: pathlib.Path) -> list[list[str]]:
  """The ``tnjax`` command lines of the docs' bash blocks, but training runs (the docs' train lines run for minutes;
  `tnjax train --list-fields` is kept)."""
  import shlex

  lines = []
  for doc in docs:
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
      for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv[:1] == ["tnjax"] and (argv[1] != "train" or "--list-fields" in argv):
          lines.append(argv[1:])
  return lines


@pytest.mark.slow  # every eval, generate and compress line of the README and the getting-started page (~1 min)
def test_the_readmes_commands_run_on_the_models_the_readme_trains(tmp_path):
  """Two README lines failed on the model the README had just trained (a 64-token TT-matrix GPT): `eval --stride
  512`, and the modegpt compression. Each line runs here on models of the shapes the docs' train lines make
  (random weights, at the docs' paths), from a directory holding the docs' sample paths."""
  from tnjax.train import TrainConfig

  tok = train_tokenizer([SAMPLE_DIR / "train.txt"], TrainConfig().vocab_size)
  for run, layers in (("tiny-ttm", TrainConfig().layers), ("dense", {}), ("tiny-dense", {})):
    cfg = TrainConfig(layers=layers).model_config(tok.get_vocab_size())
    for name in ("model", "best_model"):
      save_model(GPT(cfg, rngs=nnx.Rngs(0)), tmp_path / "runs" / run / name)
      tok.save(str(tmp_path / "runs" / run / name / "tokenizer.json"))
  (tmp_path / "tnjax" / "data").mkdir(parents=True)
  (tmp_path / "tnjax" / "data" / "sample").symlink_to(SAMPLE_DIR)
  (tmp_path / "prompts.txt").write_text("In the beginning\nAnd God said\n")  # the README's printf line
  commands = _readme_commands(ROOT / "README.md", ROOT / "docs" / "getting-started.md")
  assert len(commands) >= 8 and {c[0] for c in commands} == {"eval", "generate", "compress", "train"}
  for result in cli_cases_in_a_process(commands, tmp_path):
    assert result["rc"] == 0, result


# --- the CLI, in process: exit code 2 and one line -------------------------------------------------------------------

def _cli_cases(f):
  m, t, b, a, nowhere = str(f["model"]), str(f["text"]), str(f["binary"]), str(f["adir"]), str(f["dir"] / "nowhere")
  return [
      (["eval", "--model", m, "--text", nowhere], r"eval: --text file .*nowhere does not exist"),
      (["eval", "--model", m, "--text", a], r"eval: --text file .*adir is not a regular file"),
      (["eval", "--model", m, "--text", b], r"eval: --text file .*binary.bin is not UTF-8 text"),
      (["eval", "--model", nowhere, "--text", t], r"--model .*nowhere is not a directory"),
      (["eval", "--model", t, "--text", t], r"--model .*text.txt is not a directory"),
      (["eval", "--model", a, "--text", t], r"load_hf: .*adir/config.json does not exist"),
      (["eval", "--model", m, "--text", t, "--tokenizer", b], r"load_tokenizer: .*binary.bin is not a readable"),
      (["eval", "--model", m, "--text", t, "--block-size", "1000"], r"perplexity: block_size=1000 but 2 <="),
      (["eval", "--model", m, "--text", t, "--tokenizer", str(f["big"])],
       r"eval: --text file .*text.txt encodes to id \d{3} but the model has vocab_size=300; the tokenizer is not the "
       r"model's \(--tokenizer\)"),
      (["compress", "--model", m, "--method", "svd", "--ratio", "0.5", "--tokenizer", str(f["big"]), "--valid", t,
        "--out", str(f["dir"] / "o5")], r"compress: --valid file .*text.txt encodes to id \d{3} but the model has"),
      (["generate", "--model", m, "--prompt", "the firmament of heaven", "--tokenizer", str(f["big"])],
       r"generate: --prompt 'the firmament of heaven' encodes to id \d{3} but the model has vocab_size=300"),
      (["generate", "--model", m, "--prompt", ""], r"--prompt '' encodes to no tokens"),
      (["generate", "--model", m, "--prompt", "the", "--max-new-tokens", "100"], r"but block_size=64"),
      (["generate", "--model", m, "--prompts", nowhere], r"generate: --prompts file .*nowhere does not exist"),
      (["generate", "--model", m, "--prompts", str(f["gap"])],
       r"generate: --prompts file .*gap.txt line 2 \(''\) encodes to no tokens"),
      (["generate", "--model", m, "--prompts", str(f["empty"])], r"--prompts file .*empty.txt has no lines"),
      (["generate", "--model", m, "--prompts", str(f["prompts"]), "--max-new-tokens", "100"],
       r"generate: prompt length \d+ \+ max_new_tokens 100 = \d+ but block_size=64"),
      (["generate", "--model", m, "--prompt", "the", "--stop-id", "300"], r"generate: stop_tokens contain 300"),
      (["compress", "--model", m, "--method", "svd", "--out", str(f["dir"] / "o1")], r"compress: no target given"),
      (["compress", "--model", m, "--method", "svd", "--ratio", "0.5", "--out", m], r"already holds \['config.json'"),
      (["compress", "--model", m, "--method", "svd", "--rank", "4096", "--out", str(f["dir"] / "o2")],
       r"svd_compress: rank=4096 would give layer .* but it stores 3,072 now"),
      (["compress", "--model", m, "--method", "svd", "--ratio", "0.5", "--valid", nowhere, "--out",
        str(f["dir"] / "o3")], r"compress: --valid file .*nowhere does not exist"),
      (["compress", "--model", m, "--method", "modegpt", "--ratio", "0.5", "--calib", b, "--out",
        str(f["dir"] / "o4")], r"compress: --calib file .*binary.bin is not UTF-8 text"),
      (["train", "--config", nowhere], r"resolve: config file .*nowhere does not exist"),
      (["train", "--config", b], r"resolve: config file .*binary.bin is not valid UTF-8 TOML"),
      (["train", "--set", "lr=abc"], r"TrainConfig: lr='abc' \(str\) but float is expected"),
      (["train", "--set", "grad_clip=-1"], r"grad_clip=-1 but finite grad_clip > 0"),
      (["train", "--set", 'layers.mlp.c_fc={"kind": ttm}'], r"--set: layers.mlp.c_fc=.* is not valid JSON"),
      (["train", "--set", f"train_files=[\"{nowhere}\"]", "--set", f"out_dir={f['dir'] / 'run1'}"],
       r"train: train_files has .*nowhere.*, which does not exist"),
      (["train", "--set", f"train_files=[\"{b}\"]", "--set", f"valid_files=[\"{t}\"]",
        "--set", f"out_dir={f['dir'] / 'run2'}"], r"train_tokenizer: text file .*binary.bin is not UTF-8 text"),
      (["train", "--resume", "--set", f"out_dir={f['dir'] / 'run3'}"], r"--resume but .*train_config.json does not"),
  ]


def test_cli_expected_failures_exit_2_with_one_line(files, capsys):
  before = _digest(files["dir"])
  for argv, match in _cli_cases(files):
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tnjax {argv[0]}: "), (argv, err)
    assert re.search(match, lines[0]), (argv, match, lines[0])
  after = _digest(files["dir"])
  assert {k: v for k, v in after.items() if k in before} == before  # no input file changed


@pytest.mark.parametrize("argv, match", [
    (["eval", "--model", "m", "--text", "t", "--block-size", "1"], r"--block-size: 1 but an integer >= 2"),
    (["eval", "--model", "m", "--text", "t", "--max-tokens", "abc"], r"--max-tokens: 'abc' but an integer >= 2"),
    (["eval", "--model", "m", "--text", "t", "--stride", "0"], r"--stride: 0 but an integer >= 1"),
    (["generate", "--model", "m", "--prompt", "p", "--temperature", "-1"], r"--temperature: -1.0 but a number >= 0"),
    (["generate", "--model", "m", "--prompt", "p", "--top-k", "0"], r"--top-k: 0 but an integer >= 1"),
    (["generate", "--model", "m", "--prompt", "p", "--max-new-tokens", "0"], r"--max-new-tokens: 0 but an integer"),
    (["generate", "--model", "m", "--prompt", "p", "--top-p", "0"], r"--top-p: 0.0 but a number in \(0, 1\]"),
    (["generate", "--model", "m", "--prompt", "p", "--top-p", "1.5"], r"--top-p: 1.5 but a number in \(0, 1\]"),
    (["generate", "--model", "m", "--prompt", "p", "--top-p", "nan"], r"--top-p: nan but a number in \(0, 1\]"),
    (["generate", "--model", "m", "--prompt", "p", "--temperature", "nan"], r"--temperature: nan but a number >= 0"),
    (["generate", "--model", "m", "--prompts", "f", "--batch-size", "0"], r"--batch-size: 0 but an integer >= 1"),
    (["generate", "--model", "m", "--prompt", "p", "--prompts", "f"], r"--prompts: not allowed with argument"),
    (["generate", "--model", "m"], r"one of the arguments --prompt --prompts is required"),
    (["compress", "--model", "m", "--method", "svd", "--out", "o", "--heal-lr", "0"],
     r"--heal-lr: 0.0 but a number > 0"),
    (["compress", "--model", "m", "--method", "svd", "--out", "o", "--heal-lr", "nan"], r"--heal-lr: nan but"),
    (["compress", "--model", "m", "--method", "svd", "--out", "o", "--heal-steps", "-2"], r"--heal-steps: -2 but"),
    (["compress", "--model", "m", "--method", "lora", "--out", "o"], r"--method: invalid choice: 'lora'"),
])
def test_cli_argument_values_exit_2(argv, match, capsys):
  with pytest.raises(SystemExit) as e:
    main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err and re.search(match, err), err


def test_a_lock_whose_contents_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
  """A full disk (or Ctrl-C) between creating the lock and writing it: an empty lock would never be stale."""
  import os

  def full(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "fdopen", full)
  with pytest.raises(OSError, match="No space left"):
    with dir_lock("compress", tmp_path):
      pass
  monkeypatch.undo()
  assert not (tmp_path / LOCK_NAME).exists()
  with dir_lock("compress", tmp_path):  # the directory is usable
    assert (tmp_path / LOCK_NAME).exists()


# --- a model too large for the memory: refused from its config before any tensor is read ----------------------------

def _huge_hf_dir(path: pathlib.Path) -> pathlib.Path:
  """A Llama directory whose config.json claims 4 blocks of width 65536 (1.1 TB in float32) beside one tiny tensor."""
  from safetensors.numpy import save_file

  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(dict(
      model_type="llama", vocab_size=32000, hidden_size=65536, intermediate_size=4 * 65536, num_hidden_layers=4,
      num_attention_heads=512, num_key_value_heads=512, max_position_embeddings=2048)))
  save_file({"model.norm.weight": np.ones(4, np.float32)}, str(path / "model.safetensors"))
  return path


def _no_tensor_read(monkeypatch):
  from tnjax._io import LazyTensor

  monkeypatch.setattr(LazyTensor, "__array__", lambda *a, **k: pytest.fail("a tensor was read before refusing"))


def test_a_checkpoint_too_large_for_memory_is_refused_before_any_tensor_is_read(tmp_path, monkeypatch):
  from tnjax.interop import load_hf

  _no_tensor_read(monkeypatch)
  d = _huge_hf_dir(tmp_path / "hf")
  with pytest.raises(ValueError, match=r"load_hf: the parameters need 1\.1 TB but the host has [0-9.]+ [KMGT]?B "
                                       r"available \(MemAvailable in /proc/meminfo; at most 90% of it may hold "
                                       r"parameters\); use a machine with more memory or a smaller model \(still "
                                       r"55\d\.\d GB in bfloat16\)"):
    load_hf(d)
  # native: the config of a saved model edited to claim 4 blocks of width 65536 (824 GB in float32)
  save_model(GPT(preset("tiny", **SMALL_MODEL), rngs=nnx.Rngs(0)), tmp_path / "native")
  meta = json.loads((tmp_path / "native" / "config.json").read_text())
  meta["config"].update(n_layer=4, d_model=65536, n_head=512)
  (tmp_path / "native" / "config.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"load_model: the parameters need 82\d\.\d GB but the host has"):
    load_model(tmp_path / "native")


def test_the_memory_check_names_bfloat16_when_it_helps_and_passes_what_fits(tmp_path, monkeypatch):
  """Against a given amount of memory (host or device): a model that fits within the margin loads; float32
  parameters that would fit in bfloat16 name that option."""
  from tests.hf_fixtures import make_hf_llama
  from tnjax.interop import load_hf, native

  need = 4 * make_hf_llama(tmp_path).num_parameters()  # float32
  monkeypatch.setattr(native, "available_memory", lambda: [("host", int(need / 0.9) + 1, "a test")])
  assert load_hf(tmp_path).num_params * 4 == need  # just fits: 90% of what is available
  for where in ("host", "device NVIDIA H200"):
    monkeypatch.setattr(native, "available_memory", lambda w=where: [(w, int(need / 0.9) - 1000, "a test")])
    with pytest.raises(ValueError, match=rf"load_hf: the parameters need [0-9.]+ KB but the {where} has [0-9.]+ KB "
                                         r"available \(a test; at most 90% of it may hold parameters\); pass "
                                         r'param_dtype="bfloat16" \(--param-dtype bfloat16\): it stores the float32 '
                                         r"parameters in half the bytes"):
      load_hf(tmp_path)
  assert load_hf(tmp_path, param_dtype="bfloat16").num_params * 4 == need  # which then fits


_TOO_LARGE = (r"tnjax eval: load_hf: the parameters need 1\.1 TB but the host has .* available .*; use a machine "
              r"with more memory or a smaller model \(still 55\d\.\d GB in bfloat16\)\n")


def test_cli_refuses_a_checkpoint_too_large_for_memory_with_one_line(tmp_path, monkeypatch, capsys):
  _no_tensor_read(monkeypatch)
  d = _huge_hf_dir(tmp_path / "hf")
  (tmp_path / "t.txt").write_text(TEXT)
  assert main(["eval", "--model", str(d), "--text", str(tmp_path / "t.txt")]) == 2
  assert re.fullmatch(_TOO_LARGE, capsys.readouterr().err)


@pytest.mark.slow  # a subprocess (the case above runs in process by default)
def test_cli_refuses_a_checkpoint_too_large_for_memory_in_a_subprocess(tmp_path):
  d = _huge_hf_dir(tmp_path / "hf")
  (tmp_path / "t.txt").write_text(TEXT)
  root = pathlib.Path(__file__).resolve().parents[1]
  done = subprocess.run([sys.executable, "-m", "tnjax", "eval", "--model", str(d), "--text", str(tmp_path / "t.txt")],
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 2, done.stderr[-2000:]
  assert re.fullmatch(_TOO_LARGE, done.stderr), done.stderr


@pytest.mark.slow  # one process running ~20 commands, after preparing their inputs (~1 min)
def test_cli_refusals_in_a_real_process(files, tmp_path, monkeypatch):
  """The refusals of issue 27, each a command line in a real process: exit 2, one line naming the file or field, no
  traceback (whatever reached the terminal, logging included), and the inputs as they were."""
  from tnjax.interop import save_hf_gpt2
  from tnjax.train import Trainer

  d, t = tmp_path / "in", str(files["text"])
  d.mkdir()
  hf = save_hf_gpt2(GPT(preset("tiny", **SMALL_MODEL), rngs=nnx.Rngs(0)), d / "hf")
  (hf / "config.json").write_text(json.dumps({**json.loads((hf / "config.json").read_text()),
                                              "layer_norm_epsilon": "1e-5"}))
  (hf / "tokenizer.json").write_bytes((files["model"] / "tokenizer.json").read_bytes())
  as_int = _corrupt_copy(files["model"], d / "as-int", _rewrite(_as_int))
  unchained = _corrupt_copy(files["ttm"], d / "unchained", _rewrite(_unchained))
  tok = load_tokenizer(files["model"])
  signed = save_model(load_model(files["model"]), d / "signed", tokenizer=tok)
  other = d / "other.json"
  train_tokenizer([SAMPLE_DIR / "valid.txt"], 300).save(str(other))
  short = d / "short.txt"
  short.write_text("In the beginning God created the heaven")
  (d / "tiny.txt").write_text("In the beginning")
  gapped = _gapped_tokenizer(d / "gapped.json")
  (d / "list.json").write_text("[1, 2]")

  # Run directories as a first `tnjax train` leaves them just before its first step: tokenizer, caches, config.
  monkeypatch.setattr(Trainer, "__init__", lambda *a, **k: pytest.fail("stop"))
  runs = {}
  for name in ("cache", "source", "config", "changed"):
    runs[name] = d / name
    with pytest.raises(pytest.fail.Exception):
      main(_train_argv(files, runs[name], 'layers.mlp.c_fc={"kind": "ttm", "rank": 4}'))
  monkeypatch.undo()
  (runs["cache"] / "cache" / "train.bin").write_bytes((runs["cache"] / "cache" / "train.bin").read_bytes()[:100])
  (runs["source"] / "tokenizer.source.json").write_text('{"vocab_size": ')
  (runs["config"] / "train_config.json").write_text('{"steps": 4')

  before = _digest(tmp_path)
  m, ttm, o = str(files["model"]), str(files["ttm"]), tmp_path / "out"
  cases = [
      (["eval", "--model", str(hf), "--text", t], r"GPTConfig: layer_norm_eps='1e-5' \(str\) but a finite number > 0 "
                                                  r"is expected \(in .*hf/config.json\)"),
      (["eval", "--model", str(as_int), "--text", t], r"parameter wte.embedding has dtype int32 but a floating "
                                                      r"dtype \(float32\) is expected"),
      (["eval", "--model", str(unchained), "--text", t], r"parameter h.0.mlp.c_fc.cores.1 has shape \(5, 4, 4, 4\)"),
      (["eval", "--model", str(signed), "--text", t, "--tokenizer", str(other)],
       rf"--tokenizer: the tokenizer {re.escape(str(other))} .* is not the one {re.escape(str(signed))} was written "
       r"with"),
      (["eval", "--model", ttm, "--text", t, "--stride", "512"], r"perplexity: stride=512 but 1 <= stride <= "
                                                                 r"block_size=64 is expected"),
      (["eval", "--model", m, "--text", t, "--tokenizer", str(files["big"])], r"encodes to id \d+ but the model has "
                                                                              r"vocab_size=300"),
      (["compress", "--model", ttm, "--method", "svdllm", "--ratio", "0.5", "--calib", t, "--out", str(o / "1")],
       r"the default layers include 4 ttm layers .* which --method svdllm re-factors into lowrank layers"),
      (["compress", "--model", m, "--method", "svdllm", "--ratio", "0.5", "--calib", str(short), "--out",
        str(o / "2")], r"calib has \d+ tokens but layer '.*' reads \d+ features; .*more text in calib, --calib"),
      (_train_argv(files, o / "3", "warmup=100000", "steps=20"), r"TrainConfig: warmup=100000 but steps=20"),
      (_train_argv(files, o / "4", "batch_size=1000000000"), r"train: batch_size=1,000,000,000 .* GiB of host memory"),
      (_train_argv(files, o / "5", "model_overrides.layer_norm_eps=-1"), r"GPTConfig: layer_norm_eps=-1 \(int\) but"),
      (_train_argv(files, o / "6", f"valid_files=[\"{d / 'tiny.txt'}\"]"),
       r"train: valid_files \['.*tiny.txt'\] hold \d+ tokens but block_size=16 needs at least 18"),
      (_train_argv(files, o / "7", f"tokenizer={gapped}"), r"train_files .* encode to id 4,000 but the tokenizer"),
      (_train_argv(files, runs["cache"], 'layers.mlp.c_fc={"kind": "ttm", "rank": 4}'),
       rf"token_cache: {re.escape(str(runs['cache'] / 'cache' / 'train.bin'))} holds 50 tokens"),
      (["train", "--resume", "--set", f"out_dir={runs['source']}", "--set", "steps=3"],
       rf"train: {re.escape(str(runs['source'] / 'tokenizer.source.json'))} is not valid JSON"),
      (["train", "--resume", "--set", f"out_dir={runs['config']}"],
       rf"resolve: {re.escape(str(runs['config'] / 'train_config.json'))} is not valid JSON"),
      (["train", "--resume", "--set", f"out_dir={runs['changed']}", "--set", "block_size=32"],
       r"--resume with a configuration that differs from the saved one in \['block_size'\]"),
      (["train", "--config", str(d / "list.json")], r"resolve: config file .*list.json holds list but a JSON object"),
  ]
  for result, (_, match) in zip(cli_cases_in_a_process([argv for argv, _ in cases], tmp_path), cases):
    assert_one_line(result, match)
  assert {k: v for k, v in _digest(tmp_path).items() if k in before} == before
  assert not (o / "4").exists() and not (o / "1").exists()
