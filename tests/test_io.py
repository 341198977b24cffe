"""The streaming safetensors writer against the safetensors library (its reader, and torch's)."""

import os
import stat

import jax.numpy as jnp
import numpy as np
import pytest

from tnjax._io import write_safetensors


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
