"""GPT-2 in Flax NNX, numerically the function of Hugging Face ``GPT2LMHeadModel``, with per-layer tensorization.

Pre-LayerNorm blocks, tanh-approximated GELU, causal attention through
``jax.nn.dot_product_attention`` (so GPU backends can use fused attention),
learned position embeddings and a head tied to the token embedding unless
the config unties it. Each projection is ``nnx.Linear`` (kernel laid out
(in, out), like GPT-2's Conv1D), [`TTMLinear`][tnjax.nn.TTMLinear],
[`BTTLinear`][tnjax.nn.BTTLinear] or [`LowRankLinear`][tnjax.nn.LowRankLinear], as the config's ``layers`` say.

Dropout applies to embeddings and to the attention and MLP outputs; fused
attention has no dropout on attention probabilities, so GPT-2's ``attn_pdrop``
is not reproduced during training (inference is unaffected).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

from tnjax.models.config import GPTConfig
from tnjax.models.decoder import (
    CausalAttention,
    Decoder,
    PreNormBlock,
    balance_of,
    dense_kernel,
    dtype_of,
    linear_flops,
    make_embedding,
    make_head,
    make_linear,
)
from tnjax.models.decoder import positions as decoder_positions

__all__ = ["GPT", "make_linear", "dense_kernel", "linear_flops"]


class Attention(CausalAttention):
  """GPT-2's attention: queries, keys and values from one fused projection ``c_attn``, no rotary embedding."""

  OUTPUT = "c_proj"

  def make_projections(self, cfg: GPTConfig, index: int, rngs: nnx.Rngs) -> None:
    d, dtype, h = cfg.d_model, dtype_of(cfg), cfg.n_head
    self.c_attn = make_linear(cfg.spec("attn.c_attn", index), d, h * (2 * self.qk_dim + self.v_dim),
                              std=cfg.projection_std, use_bias=True, dtype=dtype, rngs=rngs, balance=balance_of(cfg))
    self.c_proj = make_linear(cfg.spec("attn.c_proj", index), h * self.v_dim, d,
                              std=cfg.projection_std / math.sqrt(2 * cfg.n_layer), use_bias=True, dtype=dtype,
                              rngs=rngs, balance=balance_of(cfg))

  def split(self, z):
    """The query, key and value columns of c_attn's output, kernel or bias, NumPy or JAX (the fused layout, in
    one place)."""
    qk = self.n_head * self.qk_dim
    return z[..., :qk], z[..., qk:2 * qk], z[..., 2 * qk:]

  def project(self, x):
    return self.split(self.c_attn(x))


class MLP(nnx.Module):
  def __init__(self, cfg: GPTConfig, index: int, rngs: nnx.Rngs):
    d, f, dtype = cfg.d_model, cfg.block_dims(index)[0], dtype_of(cfg)
    self.c_fc = make_linear(cfg.spec("mlp.c_fc", index), d, f, std=cfg.projection_std, use_bias=True, dtype=dtype,
                            rngs=rngs, balance=balance_of(cfg))
    self.c_proj = make_linear(cfg.spec("mlp.c_proj", index), f, d, std=cfg.projection_std / math.sqrt(2 * cfg.n_layer),
                              use_bias=True, dtype=dtype, rngs=rngs, balance=balance_of(cfg))
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

  def __call__(self, x, *, deterministic: bool = True):
    return self.dropout(self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True)), deterministic=deterministic)


class Block(PreNormBlock):
  def __init__(self, cfg: GPTConfig, index: int, rngs: nnx.Rngs):
    d, dtype = cfg.d_model, dtype_of(cfg)
    self.ln_1 = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
    self.attn = Attention(cfg, index, rngs)
    self.ln_2 = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
    self.mlp = MLP(cfg, index, rngs)

  def trace(self, x) -> tuple[jax.Array, dict]:
    """The block's output and what calibration reads: attention input (b, t, d), queries and keys
    (b, t, n_head, qk_dim), MLP activations (b, t, d_ff), and ``"inputs"``: each projection's input by name."""
    a = self.ln_1(x)
    q, k, _ = self.attn.qkv(a)
    ctx = self.attn.context(a)[0]
    mid = x + self.attn.c_proj(ctx)
    m = self.ln_2(mid)
    act = jax.nn.gelu(self.mlp.c_fc(m), approximate=True)
    return mid + self.mlp.c_proj(act), {
        "attn_in": a, "q": q, "k": k, "mlp_act": act,
        "inputs": {"attn.c_attn": a, "attn.c_proj": ctx, "mlp.c_fc": m, "mlp.c_proj": act}}

  def parts(self) -> dict:
    """Dense (kernel, bias) of the attention and MLP matrices: "q", "k", "v" (slices of c_attn), "o", "up"
    (a list: c_fc), "down"."""
    a, m = self.attn, self.mlp
    (wq, wk, wv), (bq, bk, bv) = a.split(np.asarray(dense_kernel(a.c_attn))), a.split(np.asarray(a.c_attn.bias[...]))
    return {"q": (wq, bq), "k": (wk, bk), "v": (wv, bv),
            "o": (np.asarray(dense_kernel(a.c_proj)), np.asarray(a.c_proj.bias[...])),
            "up": [(np.asarray(dense_kernel(m.c_fc)), np.asarray(m.c_fc.bias[...]))],
            "down": (np.asarray(dense_kernel(m.c_proj)), np.asarray(m.c_proj.bias[...]))}

  @staticmethod
  def projections(parts: dict) -> dict:
    """The inverse of `parts`: {projection name: {"kernel", "bias"}}."""
    (wq, bq), (wk, bk), (wv, bv) = parts["q"], parts["k"], parts["v"]
    return {"attn.c_attn": {"kernel": np.concatenate([wq, wk, wv], axis=1), "bias": np.concatenate([bq, bk, bv])},
            "attn.c_proj": dict(zip(("kernel", "bias"), parts["o"])),
            "mlp.c_fc": dict(zip(("kernel", "bias"), parts["up"][0])),
            "mlp.c_proj": dict(zip(("kernel", "bias"), parts["down"]))}


class GPT(Decoder):
  """GPT-2 language model.

  Call ``model(ids)`` for logits of shape (batch, time, vocab_size); use
  `init_cache` and `step` (or [`generate`][tnjax.models.generate]) for
  KV-cached decoding.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny", layers={"mlp.c_fc": {"kind": "ttm", "rank": 8}}), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 16), jnp.int32)).shape
    (2, 16, 512)
  """

  MODULE_AXES = {**Decoder.MODULE_AXES, "wpe": (None, "embed")}  # positions: never sharded

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    cfg, dtype = config, dtype_of(config)
    self.config = cfg
    self.wte = make_embedding(cfg, rngs)
    self.wpe = nnx.Embed(cfg.block_size, cfg.d_model, dtype=dtype,
                         embedding_init=nnx.initializers.normal(cfg.init_std / 2), rngs=rngs)
    self.drop = nnx.Dropout(cfg.dropout, rngs=rngs)
    self.h = nnx.List([Block(cfg, i, rngs) for i in range(cfg.n_layer)])
    self.ln_f = nnx.LayerNorm(cfg.d_model, epsilon=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
    self.lm_head = make_head(cfg, rngs)

  def embed(self, ids, positions=None, deterministic: bool = True) -> jax.Array:
    x = self.wte(ids) + self.wpe(decoder_positions(None, ids.shape[1]) if positions is None else positions)
    return self.drop(x, deterministic=deterministic)

