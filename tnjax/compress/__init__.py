"""Compression of trained GPTs: pure model -> model functions.

* `svd_compress` — truncated SVD per projection, the baseline.
* `svdllm_compress` — SVD-LLM: the SVD of each projection in its input data metric (output error).
* `mpo_compress` — MPO (TT-matrix) per projection, fitted to the weights or to the outputs.
* `btt_compress` — Block-TT per projection, fitted to the weights or to the outputs.
* `layer_sensitivity`, `choose_layers`,
  `heal`, `quantize_int8` — CompactifAI (MPO, profiling, healing, int8).
* `tensorgpt_embedding` — TensorGPT (an MPS per token row, or one TT-matrix).
* `modegpt_compress`, `calibrate` — MoDeGPT (Nystrom, CR, whitened SVD).
* `input_grams` — every projection's input Gram ``X^T X`` (for the output-error fits of `tnjax.core.whitening`).
* `compress`, `REGISTRY` — every method by name, with the targets, calibration and allocations it takes
  (`tnjax.compress.registry`); one meaning of a target (`tnjax.compress.targets`).
* [`run`][tnjax.compress.report.run] — what ``tnjax compress`` runs.
* `progress_bars` — per-block progress bars (calibration, fits, healing) inside a ``with`` block.
"""

from tnjax.compress._model import count_bytes, count_params, get_layer, projection_names, resolve_layers
from tnjax.compress._progress import progress_bars
from tnjax.compress.calibration import Calibration, input_grams
from tnjax.compress.methods import (
    btt_compress,
    mpo_compress,
    quantize_int8,
    svd_compress,
    svdllm_compress,
    tensorgpt_embedding,
)
from tnjax.compress.modegpt import calibrate, cr_select, modegpt_compress, nystrom_select, whitened_vo_svd
from tnjax.compress.registry import REGISTRY, Method, compress, register
from tnjax.compress.targets import Target, allocate
from tnjax.compress.tuning import choose_layers, heal, layer_sensitivity

__all__ = [
    "svd_compress", "svdllm_compress", "mpo_compress", "btt_compress", "tensorgpt_embedding", "quantize_int8",
    "modegpt_compress",
    "layer_sensitivity", "choose_layers", "heal", "calibrate", "allocate", "nystrom_select", "cr_select",
    "whitened_vo_svd", "input_grams", "Calibration", "Target", "compress", "REGISTRY", "Method", "register",
    "progress_bars", "count_params", "count_bytes", "get_layer", "projection_names", "resolve_layers",
]


def __getattr__(name: str):
  """Deprecated names: ``whitened_svd`` was MoDeGPT's joint value-output fit, now `whitened_vo_svd` (the name is
  `tnjax.core.whitening.whitened_svd`'s, a different problem)."""
  if name == "whitened_svd":
    import warnings

    warnings.warn("tnjax.compress.whitened_svd is deprecated: it is tnjax.compress.whitened_vo_svd (MoDeGPT's "
                  "joint value-output fit); tnjax.core.whitening.whitened_svd is the single-matrix fit",
                  DeprecationWarning, stacklevel=2)
    return whitened_vo_svd
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
