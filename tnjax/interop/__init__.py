"""Model files: Hugging Face directories (GPT-2, Llama, Qwen2) in and out, and tnjax's own format that keeps TT
cores."""

from tnjax.interop import hf
from tnjax.interop.hf import load_hf, save_hf
from tnjax.interop.hf_gpt2 import config_from_hf, hf_config, load_hf_gpt2, save_hf_gpt2
from tnjax.interop.native import is_native, load_model, model_from_tensors, model_tensors, save_model

# Deprecated paths: GPT-2's entry points lived in tnjax.interop.hf before families had mapping files; set here, so
# that hf (which hf_gpt2 builds on) imports nothing back.
hf.config_from_hf, hf.hf_config = config_from_hf, hf_config
hf.load_hf_gpt2, hf.save_hf_gpt2 = load_hf_gpt2, save_hf_gpt2

__all__ = ["load_hf", "save_hf", "load_hf_gpt2", "save_hf_gpt2", "config_from_hf", "hf_config", "save_model",
           "load_model", "is_native", "load_any", "model_tensors", "model_from_tensors"]


def load_any(path, *, param_dtype: str | None = None, **kwargs):
  """A model from a tnjax directory (`save_model`) or a Hugging Face GPT-2, Llama or Qwen2 directory;
  ``param_dtype`` as in `load_hf`."""
  if is_native(path):
    return load_model(path, param_dtype=param_dtype)
  return load_hf(path, param_dtype=param_dtype, **kwargs)
