"""Flax NNX layers: TT-matrix (MPO) and Block-TT (Monarch) linear, TT, MPS and low-rank embeddings with a tied head,
low-rank linear."""

from tnjax.core.contraction import H100, CostModel, Plan, choose_path, choose_plan, path_costs, product_costs
from tnjax.nn.kinds import LayerKind, hidden_fan_ins, kind_names, register
from tnjax.nn.layers import (
    BTTLinear,
    LowRankEmbedding,
    LowRankLinear,
    MPSEmbedding,
    TTEmbedding,
    TTMLinear,
    TTParam,
)
from tnjax.nn.quant import Int8Linear, dequantize, quantize

__all__ = ["TTMLinear", "BTTLinear", "TTEmbedding", "MPSEmbedding", "LowRankEmbedding", "LowRankLinear", "Int8Linear",
           "TTParam", "quantize", "dequantize", "CostModel", "H100", "Plan", "choose_path", "choose_plan", "path_costs",
           "product_costs", "hidden_fan_ins", "LayerKind", "register", "kind_names"]
