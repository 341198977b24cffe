"""Flax NNX layers: TT-matrix (MPO) linear, TT embedding with a tied head, low-rank linear."""

from tnjax.core.linear import H100, CostModel, choose_path, path_costs
from tnjax.nn.layers import LowRankLinear, TTEmbedding, TTMLinear, TTParam

__all__ = ["TTMLinear", "TTEmbedding", "LowRankLinear", "TTParam", "CostModel", "H100", "choose_path",
           "path_costs"]
