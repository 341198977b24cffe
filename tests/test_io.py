"""The streaming safetensors writer against the safetensors library (its reader, and torch's); sharded
checkpoints: layout, stale files, failures mid-save."""

import json
import os
import re
import stat

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tnjax._io import LazyTensor, write_safetensors
from tnjax.interop import load_model, model_tensors, save_model
from tnjax.models import GPT, preset


def test_written_file_reads_back_with_safetensors_and_torch(tmp_path):
  import torch
  from safetensors.numpy import load_file
  from safetensors.torch import load_file as torch_load

  rng = np.random.default_rng(0)
  tensors = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.bfloat16), "b": rng.normal(size=7).astype(np.float32),
             "i": np.arange(6, dtype=np.int8).reshape(3, 2), "scalar": np.float32(2.5) * np.ones((), np.float32),
             "empty": np.zeros((0, 4), np.float32), "h": rng.normal(size=(2, 2)).astype(np.float16)}
  path = tmp_path / "t.safetensors"
  write_safetensors(path, tensors, metadata={"format": "pt"})
  back = load_file(str(path))
  assert set(back) == set(tensors)
  for name, value in tensors.items():
    assert back[name].dtype == np.asarray(value).dtype and back[name].shape == np.shape(value)
    np.testing.assert_array_equal(back[name], np.asarray(value))
  t = torch_load(str(path))
  assert t["w"].dtype == torch.bfloat16
  np.testing.assert_array_equal(t["w"].float().numpy(), np.asarray(tensors["w"], np.float32))
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~_umask()  # not save_file's owner-only 0600


def test_dtype_converts_each_tensor_and_bad_dtypes_are_refused(tmp_path):
  from safetensors.numpy import load_file

  write_safetensors(tmp_path / "f.safetensors", {"w": jnp.ones((2, 2), jnp.bfloat16)}, dtype=np.float32)
  assert load_file(str(tmp_path / "f.safetensors"))["w"].dtype == np.float32
  with pytest.raises(ValueError, match=r"write_safetensors: tensor c has dtype complex64, which safetensors cannot"):
    write_safetensors(tmp_path / "c.safetensors", {"c": np.ones(2, np.complex64)})


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_model_files_have_the_permissions_of_every_other_file(tmp_path):
  from flax import nnx

  from tnjax.interop import load_model, save_hf, save_model
  from tnjax.models import GPT, preset

  model = GPT(preset("tiny", n_layer=1), rngs=nnx.Rngs(0))
  for where in (save_model(model, tmp_path / "native"), save_hf(model, tmp_path / "hf")):
    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in where.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes
  assert load_model(tmp_path / "native").num_params == model.num_params


def test_big_endian_arrays_are_written_little_endian(tmp_path):
  """The format is little-endian: a '>f4' array's bytes are swapped, not stored as they are under an F32 tag."""
  from safetensors.numpy import load_file

  write_safetensors(tmp_path / "e.safetensors", {"x": np.arange(3, dtype=">f4")})
  np.testing.assert_array_equal(load_file(str(tmp_path / "e.safetensors"))["x"], [0.0, 1.0, 2.0])


# --- sharded checkpoints ---------------------------------------------------------------------------------------------

def _tensors(n=5, size=1000):
  """``n`` float32 tensors of ``size`` entries (4 KB each), one of them a zero-argument function."""
  rng = np.random.default_rng(0)
  out = {f"t{i}": rng.normal(size=size).astype(np.float32) for i in range(n)}
  out["t0"] = (lambda v: lambda: jnp.asarray(v))(out["t0"])
  return out


def _values(tensors):
  return {k: np.asarray(v() if callable(v) else v) for k, v in tensors.items()}


def test_write_checkpoint_shards_as_transformers_does(tmp_path):
  from tnjax._io import read_checkpoint, write_checkpoint

  tensors = _tensors()
  tensors["big"] = np.zeros(3000, np.float32)  # 12 KB: larger than a shard, alone in its own
  written = write_checkpoint(tmp_path, tensors, max_shard_size="9KB")
  assert written == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)] + ["model.safetensors.index.json"]
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert index["metadata"]["total_size"] == 5 * 4000 + 12000
  shard = {k: int(v[6:11]) for k, v in index["weight_map"].items()}
  assert shard == {"t0": 1, "t1": 1, "t2": 2, "t3": 2, "t4": 3, "big": 4}  # filled in order, each <= 9 KB
  assert all((tmp_path / f).stat().st_size < 9000 + 200 for f in written[:3])  # + the header
  back = read_checkpoint("f", tmp_path)
  assert set(back) == set(tensors)
  for k, v in _values(tensors).items():
    np.testing.assert_array_equal(np.asarray(back[k]), v)


def test_small_checkpoint_is_one_file_and_later_saves_remove_stale_files(tmp_path):
  from tnjax._io import read_checkpoint, write_checkpoint

  def names():
    return sorted(p.name for p in tmp_path.iterdir())

  other = tmp_path / "tokenizer.json"
  other.write_text("{}")
  write_checkpoint(tmp_path, _tensors(6), max_shard_size=8000)
  assert names() == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + ["model.safetensors.index.json",
                                                                                  "tokenizer.json"]
  write_checkpoint(tmp_path, _tensors(4), max_shard_size=8000)  # fewer shards: the third of the old save goes
  assert names() == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json", "tokenizer.json"]
  assert sorted(read_checkpoint("f", tmp_path)) == ["t0", "t1", "t2", "t3"]
  write_checkpoint(tmp_path, _tensors(2))  # default 5 GB: one file, the index and shards go
  assert names() == ["model.safetensors", "tokenizer.json"]
  write_checkpoint(tmp_path, _tensors(3), max_shard_size="4KB")  # and back: the single file goes
  assert names() == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + ["model.safetensors.index.json",
                                                                                  "tokenizer.json"]
  assert other.read_text() == "{}"


def test_a_failed_sharded_save_leaves_the_old_model_or_none(tmp_path, monkeypatch):
  """A failure while the shards are written leaves the old model as it was; one while they are renamed into place
  leaves a directory no loader accepts (never a mix of two saves)."""
  from tnjax._io import write_checkpoint

  model = GPT(preset("tiny", n_layer=1), rngs=nnx.Rngs(0))
  save_model(model, tmp_path, max_shard_size="100KB")
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  tensors = model_tensors(model)

  def fail():
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    write_checkpoint(tmp_path, {**tensors, "zz": fail}, max_shard_size="100KB")
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file left either
  replace, calls = os.replace, []

  def replace_once(src, dst):
    calls.append(dst)
    if len(calls) == 2:
      raise OSError("killed")
    replace(src, dst)

  monkeypatch.setattr(os, "replace", replace_once)
  with pytest.raises(OSError, match="killed"):
    write_checkpoint(tmp_path, tensors, max_shard_size="100KB")
  monkeypatch.undo()
  with pytest.raises(ValueError, match=r"load_model: .*model.safetensors does not exist \(nor "
                                       r"model.safetensors.index.json\)"):
    load_model(tmp_path)
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_native_model_saves_sharded_and_loads_lazily(tmp_path, monkeypatch):
  model = GPT(preset("tiny", layers={"mlp.c_fc": {"kind": "ttm", "rank": 4}}), rngs=nnx.Rngs(0))
  save_model(model, tmp_path, max_shard_size=100_000)
  shards = sorted(tmp_path.glob("model-*.safetensors"))
  assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
  read = []
  monkeypatch.setattr(LazyTensor, "__array__", (lambda f: lambda self, *a, **k: read.append(self.name) or f(
      self, *a, **k))(LazyTensor.__array__))
  again = load_model(tmp_path)
  assert sorted(read) == sorted(model_tensors(model))  # each read once, as it was placed
  ids = jnp.ones((1, 8), jnp.int32)
  np.testing.assert_array_equal(again(ids), model(ids))


@pytest.mark.parametrize("value, match", [(0, "0"), ("5 GB!", "'5 GB!'"), ("5XB", "'5XB'"), (True, "True"),
                                          ("0.1B", "'0.1B'")])
def test_bad_max_shard_size_is_refused(tmp_path, value, match):
  with pytest.raises(ValueError, match=rf"save_model: max_shard_size={re.escape(match)} but a positive number of "
                                       r"bytes or a size such as '5GB', '500MB' or '2GiB' is expected"):
    save_model(GPT(preset("tiny", n_layer=1), rngs=nnx.Rngs(0)), tmp_path, max_shard_size=value)
  assert not list(tmp_path.iterdir())
