"""Decoder model families (GPT-2, Llama-style) with per-layer tensorization, behind one interface; generation."""

from tnjax.models import config
from tnjax.models.config import DecoderConfig, GPTConfig, LayerSpec
from tnjax.models.decoder import Decoder
from tnjax.models.family import FAMILIES, ModelFamily, build, family, preset
from tnjax.models.generate import generate
from tnjax.models.gpt import GPT, dense_kernel, make_linear
from tnjax.models.llama import Llama, LlamaConfig

# Deprecated path: ``tnjax.models.config.preset`` is the family registry's `tnjax.models.family.preset`, set here so
# that config (which the registry builds on) imports nothing back.
config.preset = preset

PRESETS = {name: dict(overrides) for fam in FAMILIES.values() for name, overrides in fam.presets.items()}

__all__ = ["GPT", "GPTConfig", "Llama", "LlamaConfig", "Decoder", "DecoderConfig", "LayerSpec", "PRESETS", "preset",
           "FAMILIES", "ModelFamily", "family", "build", "generate", "make_linear", "dense_kernel"]
