"""The model seam: one registry of decoder families, each a config class, a model class and presets.

Everything above `tnjax.models` (compression, training, Hugging Face and
native files, evaluation, the CLI) reaches a model only through this
interface:

* the config (`DecoderConfig`): ``PROJECTIONS`` (names of one block's
  projections), `projection_shape`, `spec` / `spec_of` (a projection's
  `LayerSpec`), `block_dims`, ``kv_heads``, JSON round trips;
* the model (`Decoder`): ``model(ids)``, `embed`, `step` / `init_cache` (generation),
  `layer` (a projection by name; replacing one is rebuilding from tensors, see
  `tnjax.compress._model.rebuild`), `num_params`, `flops_per_token`, and per
  block ``model.h[i].trace(x)`` (a block-by-block forward for calibration),
  ``.parts()`` and ``type(block).projections(parts)`` (its matrices in
  MoDeGPT's terms: q, k, v, o, up, down);
* `FAMILIES` here (presets, building a model of a config);
* the Hugging Face name mapping, one file per family in `tnjax.interop`.

See the docs page "Add a model family".
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from tnjax.models.config import PRESETS as GPT_PRESETS
from tnjax.models.config import DecoderConfig, GPTConfig
from tnjax.models.decoder import Decoder
from tnjax.models.gpt import GPT
from tnjax.models.llama import Llama, LlamaConfig


@dataclasses.dataclass(frozen=True)
class ModelFamily:
  """One decoder family: its registry name, config and model classes, named presets (config overrides), and
  the module that maps it to and from Hugging Face checkpoints (named, not imported: interop sits above
  models)."""

  name: str
  config: type[DecoderConfig]
  model: type[Decoder]
  presets: dict[str, dict]
  hf_mapping: str


LLAMA_PRESETS = {
    # SmolLM-135M's public shape: 30 blocks, width 576, 9 query and 3 key/value heads, tied head.
    "smollm-135m": dict(vocab_size=49152, block_size=2048, n_layer=30, n_head=9, n_kv_head=3, d_model=576,
                        d_ff=1536, rope_theta=10000.0),
    # SmolLM-360M's: 32 blocks, width 960, 15 query and 5 key/value heads, tied head.
    "smollm-360m": dict(vocab_size=49152, block_size=2048, n_layer=32, n_head=15, n_kv_head=5, d_model=960,
                        d_ff=2560, rope_theta=10000.0),
    "llama-tiny": dict(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_kv_head=2, d_model=128, d_ff=256),
}

FAMILIES = {
    "gpt2": ModelFamily("gpt2", GPTConfig, GPT, GPT_PRESETS, "tnjax.interop.hf_gpt2"),
    "llama": ModelFamily("llama", LlamaConfig, Llama, LLAMA_PRESETS, "tnjax.interop.hf_llama"),
}


def family(name_or_config) -> ModelFamily:
  """The family of a registry name, a config or a model.

  Examples:
    >>> family(preset("llama-tiny")).model.__name__, family("gpt2").config.__name__
    ('Llama', 'GPTConfig')
  """
  if isinstance(name_or_config, Decoder):
    name_or_config = name_or_config.config
  name = name_or_config.FAMILY if isinstance(name_or_config, DecoderConfig) else name_or_config
  if name not in FAMILIES:
    raise ValueError(f"family: {name!r} but one of {sorted(FAMILIES)} is expected")
  return FAMILIES[name]


def build(config: DecoderConfig, *, rngs: nnx.Rngs) -> Decoder:
  """The model of ``config``'s family."""
  return family(config).model(config, rngs=rngs)


def config_from_dict(d: dict, family_name: str = "gpt2") -> DecoderConfig:
  """A config of family ``family_name`` from its `to_dict` form."""
  return family(family_name).config.from_dict(d)


def preset_names() -> list[str]:
  return sorted(name for f in FAMILIES.values() for name in f.presets)


def preset(name: str, **overrides) -> DecoderConfig:
  """A named configuration with overrides: GPT-2's "gpt2" (124M), "gpt2-medium", "gpt2-large", "tiny", and
  Llama-style "smollm-135m", "smollm-360m" (public SmolLM shapes) and "llama-tiny" (for CPU tests).

  Examples:
    >>> cfg = preset("gpt2", n_layer=6)
    >>> cfg.n_layer, cfg.d_model, cfg.vocab_size
    (6, 768, 50257)
    >>> type(preset("smollm-135m")).__name__
    'LlamaConfig'
  """
  for fam in FAMILIES.values():
    if name in fam.presets:
      return fam.config(**{**fam.presets[name], **overrides})
  raise ValueError(f"preset: name={name!r} but one of {preset_names()} is expected")
