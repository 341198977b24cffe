"""GPT-2 models with per-layer tensorization, generation and evaluation helpers."""

from tnjax.models.config import PRESETS, GPTConfig, LayerSpec, preset
from tnjax.models.generate import generate
from tnjax.models.gpt import GPT, dense_kernel, make_linear

__all__ = ["GPT", "GPTConfig", "LayerSpec", "PRESETS", "preset", "generate", "make_linear", "dense_kernel"]
