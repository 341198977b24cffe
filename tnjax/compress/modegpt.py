"""MoDeGPT (Lin et al., 2024): modular decomposition of each block into smaller dense matrices.

Each transformer block is three modules, each a pair of matrices around a
nonlinearity or a bilinear form, and each is narrowed from calibration
activations without gradients:

* **MLP** (c_fc, c_proj; Type I, Nystrom): keep the k intermediate neurons
  with the largest ridge leverage scores of the activation correlation
  ``C = H^T H`` (H = gelu(c_fc(x))), and refit c_proj by least squares:
  ``W_D' = C[S,S]^-1 C[S,:] W_D``, the Nystrom approximation of C.
* **Query/key** (Type II, CR decomposition): ``q.k`` is a sum over head
  columns ``sum_i q_i k_i``; per head keep the k columns with the largest
  ``||q_i|| ||k_i||`` over the calibration data.
* **Value/output** (Type III, SVD): per head the product ``W_V W_O`` (rank
  head_dim) is truncated in the data norm: SVD of ``C^(1/2) W_V W_O`` with
  ``C = X^T X``, then ``W_V' = C^(-1/2) U_k S_k``, ``W_O' = V_k^T``. The
  value bias passes through attention unchanged (softmax rows sum to 1) and
  is folded into c_proj's bias exactly.

The result has narrower dense matrices (``GPTConfig.dims``), no extra
factors, so it runs faster than the original as well as being smaller; the KV
cache narrows too. Compression is allocated across blocks from each block's
importance score (1 - cosine similarity of its input and output, averaged over
tokens): important blocks keep more.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tnjax.compress import _model
from tnjax.compress._progress import bar
from tnjax.compress.calibration import as_batches
from tnjax.compress.targets import Target, allocate, check_choice, least_fraction
from tnjax.core import _checks
from tnjax.models.config import LayerSpec
from tnjax.models.decoder import Decoder
from tnjax.models.names import block_key, layer_key

_HIGH = jax.lax.Precision.HIGHEST


# The selections give each block its own widths. The heavy algebra runs in jitted functions of fixed shapes (one
# compilation per layer shape) and the width-dependent slicing in NumPy: eager slicing and solves of a new width
# each compile, which cost minutes on a GPU for GPT-2 124M.


@jax.jit
def _leverage_scores(c, ridge):
  """diag(C (C + lam I)^-1) with lam = ridge * mean(diag(C)), from one eigendecomposition."""
  lam = ridge * jnp.trace(c) / c.shape[0]
  e, v = jnp.linalg.eigh(c)
  e = jnp.maximum(e, 0)
  return jnp.sum(v * v * (e / (e + lam))[None, :], axis=1)


@jax.jit
def _masked_refit(c, w_down, mask, refit_ridge):
  """Solves (C[S,S] + eps I) X = C[S,:] W_D as a full-size system: identity outside S, so X is 0 there."""
  eps = refit_ridge * jnp.trace(c) / c.shape[0]
  both = mask[:, None] & mask[None, :]
  eye = jnp.eye(c.shape[0], dtype=c.dtype)
  system = jnp.where(both, c + eps * eye, eye)
  rhs = jnp.where(mask[:, None], jnp.matmul(c, w_down, precision=_HIGH), 0)
  return jnp.linalg.solve(system, rhs)


def nystrom_select(c, w_down, k: int, *, ridge: float = 1e-4,
                   refit_ridge: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
  """Type I: the k columns of a correlation ``c`` (f, f) with the largest ridge leverage scores, and the refit.

  Args:
    c: ``H^T H`` of the intermediate activations H (tokens, f).
    w_down: the following matrix (f, out).
    k: columns kept.
    ridge: lambda as a fraction of mean(diag(c)), for the scores.
    refit_ridge: eps as a fraction of mean(diag(c)), for the refit's solve.
      It bounds the refit's weights when kept neurons are near-duplicates
      (``c[s,s]`` ill conditioned), at a small fit error. Near-exact solves
      (1e-10, the rule before) gave weights that the model's bfloat16
      products could not carry: on a 12 x 768 GPT, MoDeGPT at 0.9 kept went
      from 1.61x to 1.02x dense test perplexity with 1e-4
      (docs/results/compression.md).

  Returns:
    ``(s, w)``: sorted kept indices (k,) and ``w = (c[s,s] + eps)^-1 c[s,:] w_down``
    (k, out), the least-squares fit of ``H w_down`` by ``H[:, s] w``.

  Examples:
    >>> import numpy as np
    >>> h = np.random.default_rng(0).normal(size=(100, 6)); w = np.ones((6, 2))
    >>> keep, w_new = nystrom_select(h.T @ h, w, 6, refit_ridge=0.0)  # every column kept, no ridge: exact
    >>> keep.tolist(), bool(np.allclose(h[:, keep] @ w_new, h @ w, atol=1e-4))
    ([0, 1, 2, 3, 4, 5], True)
  """
  c = jnp.asarray(c)
  scores = np.asarray(_leverage_scores(c, ridge))
  s = np.sort(np.argsort(-scores, kind="stable")[:k])
  mask = np.zeros(c.shape[0], bool)
  mask[s] = True
  return s, np.asarray(_masked_refit(c, jnp.asarray(w_down, c.dtype), jnp.asarray(mask), refit_ridge))[s]


def cr_select(q_norm2, k_norm2, k: int) -> np.ndarray:
  """Type II: per head, the k query/key columns with the largest ``||q_i|| * ||k_i||``.

  Args:
    q_norm2, k_norm2: (n_head, head_dim) sums of squares of each query and key
      column over the calibration tokens.
    k: columns kept per head.

  Returns:
    (n_head, k) sorted column indices within each head.

  Examples:
    >>> cr_select([[1.0, 9.0, 4.0]], [[1.0, 1.0, 4.0]], 2).tolist()  # products 1, 9, 16
    [[1, 2]]
  """
  scores = np.sqrt(np.asarray(q_norm2) * np.asarray(k_norm2))
  return np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :k], axis=1)


@jax.jit
def _value_output_factors(c, w_v, w_o, ridge):
  """Full-rank whitened factors of every head at once: w_v (h, d, dv), w_o (h, dv, d) -> same shapes, columns
  ordered by singular value, so keeping the first k is the rank-k truncation."""
  d = c.shape[0]
  e, v = jnp.linalg.eigh(c + ridge * jnp.trace(c) / d * jnp.eye(d, dtype=c.dtype))
  root = jnp.sqrt(jnp.maximum(e, jnp.finfo(c.dtype).tiny))[None, :]
  sqrt_c, inv_sqrt_c = (v * root) @ v.T, (v / root) @ v.T

  def head(wv, wo):
    qa, ra = jnp.linalg.qr(jnp.matmul(sqrt_c, wv, precision=_HIGH))
    qb, rb = jnp.linalg.qr(wo.T)
    u, sv, vt = jnp.linalg.svd(ra @ rb.T)
    return jnp.matmul(inv_sqrt_c, qa @ u, precision=_HIGH) * sv[None, :], (qb @ vt.T).T

  return jax.vmap(head)(w_v, w_o)


def whitened_vo_svd(c, w_v, w_o, k: int, *, ridge: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
  """Type III: the rank-k ``W_V' W_O'`` closest to ``W_V W_O`` in the data norm ``||X (.)||_F`` with ``C = X^T X``.

  A joint fit of one head's value-output product (its SVD in the metric of ``C``), where
  [`whitened_svd`][tnjax.core.whitening.whitened_svd] fits a single layer's weight.

  Args:
    c: input correlation (d, d).
    w_v: (d, h) value matrix of one head; w_o: (h, d) its output rows.
    k: rank kept.
    ridge: lambda added to c as a fraction of mean(diag(c)) (0: exact, c must be invertible).

  Returns:
    ``(w_v', w_o')`` of shapes (d, k) and (k, d).

  Complexity:
    One eigendecomposition of c, QRs of (d, h) matrices and an (h, h) SVD.

  Examples:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x, wv, wo = rng.normal(size=(50, 8)), rng.normal(size=(8, 3)), rng.normal(size=(3, 8))
    >>> a, b = whitened_vo_svd(x.T @ x, wv, wo, 3, ridge=0.0)  # full rank: exact
    >>> a.shape, b.shape, bool(np.allclose(x @ a @ b, x @ wv @ wo, atol=1e-3))
    ((8, 3), (3, 8), True)
  """
  c = jnp.asarray(c)
  a, b = _value_output_factors(c, jnp.asarray(w_v, c.dtype)[None], jnp.asarray(w_o, c.dtype)[None], ridge)
  return np.asarray(a[0])[:, :k], np.asarray(b[0])[:k]


def _block_stats(model: Decoder, ids):
  """Per-block calibration statistics for one batch of ids (batch, time), from each block's ``trace``."""
  x = model.embed(ids).astype(jnp.float32)
  out = []
  for block in model.h:
    y, acts = block.trace(x)
    a = acts["attn_in"].reshape(-1, x.shape[-1]).astype(jnp.float32)
    q, k, act = (acts[n].astype(jnp.float32) for n in ("q", "k", "mlp_act"))
    act = act.reshape(-1, act.shape[-1])
    cos = jnp.sum(x * y, -1) / (jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1) + 1e-12)
    out.append({"attn_in": jnp.matmul(a.T, a, precision=_HIGH), "attn_sum": jnp.sum(a, 0),
                "q_norm2": jnp.sum(q * q, (0, 1)), "k_norm2": jnp.sum(k * k, (0, 1)),
                "mlp_act": jnp.matmul(act.T, act, precision=_HIGH),
                "cos": jnp.sum(cos), "tokens": jnp.asarray(cos.size, jnp.float32)})
    x = y.astype(x.dtype)
  return out


@functools.partial(jax.jit, static_argnums=0)
def _jit_stats(graphdef, state, ids):
  return _block_stats(nnx.merge(graphdef, state), ids)


def calibrate(model: Decoder, batches) -> list[dict]:
  """Sums the statistics MoDeGPT needs over calibration batches, per block.

  Args:
    model: the model to compress.
    batches: integer id arrays (batch, time), or one such array.

  Returns:
    One dict per block: "attn_in" (d, d) = X^T X of the attention input and
    "attn_sum" (d,) its column sums, "tokens" their count, "q_norm2"
    (n_head, qk_dim) / "k_norm2" (kv_heads, qk_dim) column sums of squares of
    queries and keys (before rotary embeddings), "mlp_act" (d_ff, d_ff) = H^T H
    of the MLP activations, and "importance" (1 - mean cosine similarity of
    the block's input and output).

  Examples:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
    >>> stats = calibrate(model, np.zeros((2, 16), np.int32))
    >>> first = stats[0]
    >>> len(stats), first["attn_in"].shape, first["mlp_act"].shape
    (2, (128, 128), (512, 512))
  """
  batches = as_batches("calibrate", batches)
  graphdef, state = nnx.split(model)
  total = None
  for b in bar(batches, "calibrate: batches", unit="batch"):
    model._check_ids(b)
    stats = _jit_stats(graphdef, state, b)
    total = stats if total is None else jax.tree_util.tree_map(jnp.add, total, stats)
  keys = ("attn_in", "attn_sum", "q_norm2", "k_norm2", "mlp_act", "tokens")
  return [{**{k: s[k] for k in keys}, "importance": float(1 - s["cos"] / s["tokens"])} for s in total]


def _check_calib(fn, calib):
  if calib is None:
    raise ValueError(f"{fn}: calib=None but MoDeGPT needs calibration ids (batch, time) or statistics from "
                     "calibrate(); pass a few batches of text")


def modegpt_compress(model: Decoder, calib, *, ratio: float, allocation: str = "importance", temperature: float = 1.0,
                     ridge: float = 1e-4, refit_ridge: float = 1e-4, multiple_of: int = 1) -> Decoder:
  """Compresses every block's attention and MLP to about ``ratio`` of their weights (MoDeGPT).

  Args:
    model: the model (projections may be dense or tensorized; the result is dense).
    calib: calibration ids, (batch, time) arrays, or the list `calibrate` returns.
    ratio: overall fraction of attention and MLP weights kept, in (0, 1].
    allocation: "importance" (per-block fractions from block importance, as the paper's global
      allocation) or "uniform" (every block the same).
    temperature: sharpness of the global allocation (see `allocate`).
    ridge: regularization of the correlations (fraction of their mean diagonal).
    refit_ridge: regularization of the MLP refit's solve (see `nystrom_select`).
    multiple_of: round kept widths to multiples of this (8 suits GPU tensor
      cores and fused attention); widths never exceed the original.

  Returns:
    A model with ``config.dims`` set per block (d_ff, qk_dim, v_dim); block
    i keeps about ``ratio_i`` of its MLP neurons and per-head widths.

  Raises:
    ValueError: without calibration data, for ratio outside (0, 1], or an
      unknown allocation.

  Examples:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
    >>> calib = np.random.default_rng(0).integers(0, 512, (4, 32))
    >>> small = modegpt_compress(model, calib, ratio=0.5, allocation="uniform")
    >>> small.config.block_dims(0), small.num_params < model.num_params
    ((256, 16, 16), True)
  """
  fn = "modegpt_compress"
  _check_calib(fn, calib)
  ratio = Target.of(fn, ratio=ratio, accepted=("ratio",)).value
  multiple_of = _checks.check_positive_int(fn, "multiple_of", multiple_of)
  check_choice(fn, "allocation", allocation, ("importance", "uniform"))
  cfg = model.config
  stats = calib if isinstance(calib, list) and calib and isinstance(calib[0], dict) else calibrate(model, calib)
  if len(stats) != cfg.n_layer:
    raise ValueError(f"{fn}: statistics for {len(stats)} blocks but the model has n_layer={cfg.n_layer}")
  if allocation == "importance":
    ratios = allocate([s["importance"] for s in stats], ratio, temperature=temperature)
  else:
    ratios = [ratio] * cfg.n_layer
  replaced, specs, dims = {}, {}, dict(cfg.dims)
  for i, (st, rho) in bar(enumerate(zip(stats, ratios)), f"{fn}: blocks", unit="block", total=cfg.n_layer):
    parts, block_dims = _narrow_block(cfg, i, model.h[i].parts(), st, rho, ridge, refit_ridge, multiple_of)
    if parts is None:
      continue
    replaced.update({layer_key(i, name): t for name, t in type(model.h[i]).projections(parts).items()})
    dims[block_key(i)] = block_dims
    specs.update({layer_key(i, p): LayerSpec() for p in cfg.PROJECTIONS})
  new_cfg = _model.with_specs(cfg, specs).replace(dims=dims)
  return _model.rebuild(model, new_cfg, replaced)


def _kept(n: int, rho: float, multiple_of: int) -> int:
  return min(n, max(multiple_of, multiple_of * round(rho * n / multiple_of)))


def _kept_widths(cfg, i: int, rho: float, multiple_of: int) -> tuple[int, int, int]:
  """(d_ff, qk_dim, v_dim) block ``i`` keeps at ``rho``. Rotary models keep whole pairs (column j and j + qk/2
  share one frequency): their query/key widths count pairs."""
  ff, qk, vd = cfg.block_dims(i)
  k_qk = 2 * _kept(qk // 2, rho, multiple_of) if hasattr(cfg, "rope_pairs") else _kept(qk, rho, multiple_of)
  return _kept(ff, rho, multiple_of), k_qk, _kept(vd, rho, multiple_of)


def least_weights(model: Decoder, *, allocation: str = "importance", multiple_of: int = 1) -> int:
  """The projection weights `modegpt_compress` keeps at its smallest, from the shapes alone: every block at the
  least fraction the allocation gives one (`least_fraction`: a block keeps 5% of its widths under "importance",
  ``multiple_of`` columns under "uniform"), or as it is where that would not narrow it.

  Examples:
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> least_weights(GPT(preset("tiny"), rngs=nnx.Rngs(0)), allocation="uniform")  # 1 neuron, 1 column per head
    4608
  """
  cfg = model.config
  total = 0
  for i in range(cfg.n_layer):
    widths = _kept_widths(cfg, i, least_fraction(allocation, layer_key(i, cfg.PROJECTIONS[0])), multiple_of)
    total += sum(math.prod(s) for s in cfg.block_shapes(i, widths if widths != cfg.block_dims(i) else None).values())
  return total


def _narrow_block(cfg, i: int, parts: dict, st: dict, rho: float, ridge: float, refit_ridge: float,
                  multiple_of: int):
  """One block's matrices narrowed to about ``rho`` of its widths, and its new ``dims`` (None, None when nothing
  would change). ``parts`` are the block's q, k, v, o, up (a list) and down (kernel, bias or None)."""
  h, kv = cfg.n_head, cfg.kv_heads
  group = h // kv
  ff, qk, vd = cfg.block_dims(i)
  rotary = hasattr(cfg, "rope_pairs")
  k_ff, k_qk, k_v = _kept_widths(cfg, i, rho, multiple_of)
  if (k_ff, k_qk, k_v) == (ff, qk, vd):
    return None, None
  out = {}
  # Type I: MLP neurons by Nystrom; SwiGLU's gate and up projections keep the same neurons.
  w_down, b_down = parts["down"]
  keep, w_down = nystrom_select(st["mlp_act"], w_down, k_ff, ridge=ridge, refit_ridge=refit_ridge)
  out["up"] = [(w[:, keep], None if b is None else b[keep]) for w, b in parts["up"]]
  out["down"] = (w_down, b_down)
  # Type II: query/key columns by CR, scored per key head over the query heads that read it.
  q_norm = np.sqrt(np.asarray(st["q_norm2"])).reshape(kv, group, qk).sum(1) ** 2
  k_norm = np.asarray(st["k_norm2"])
  new_dims = {"d_ff": k_ff, "qk_dim": k_qk, "v_dim": k_v}
  if rotary:
    # Whole rotary pairs, the same ones in every head (the block keeps one list of frequencies): RoPE stays exact.
    half = qk // 2
    score = np.sum(np.sqrt((q_norm[:, :half] + q_norm[:, half:]) * (k_norm[:, :half] + k_norm[:, half:])), 0)
    pairs = cr_select(score[None] ** 2, np.ones((1, half)), k_qk // 2)[0]
    cols = np.tile(np.concatenate([pairs, pairs + half]), (kv, 1))
    new_dims["rope_pairs"] = [int(p) for p in np.asarray(cfg.rope_pairs(i))[pairs]]
  else:
    cols = cr_select(q_norm, k_norm, k_qk)
  k_cols = (cols + qk * np.arange(kv)[:, None]).reshape(-1)
  q_cols = (np.repeat(cols, group, axis=0) + qk * np.arange(h)[:, None]).reshape(-1)
  for name, c in (("q", q_cols), ("k", k_cols)):
    w, b = parts[name]
    out[name] = (w[:, c], None if b is None else b[c])
  out["v"], out["o"] = _narrow_value_output(parts["v"], parts["o"], st, kv, group, k_v, ridge)
  return out, new_dims


def _narrow_value_output(v, o, st, kv: int, group: int, k_v: int, ridge: float):
  """Type III: per key/value head, the whitened SVD of W_V [W_O of every query head reading it]."""
  (w_v, b_v), (w_o, b_o) = v, o
  d, vd = w_v.shape[0], w_v.shape[1] // kv
  heads_v = w_v.reshape(d, kv, vd).transpose(1, 0, 2)
  heads_o = w_o.reshape(kv, group, vd, -1).transpose(0, 2, 1, 3).reshape(kv, vd, -1)
  c = np.asarray(st["attn_in"])
  augmented = b_v is not None and b_o is None
  if augmented:
    # No output bias to fold the value bias into (Qwen2): fit [W_V; b_V] on inputs [X, 1] instead.
    s, n = np.asarray(st["attn_sum"]), float(st["tokens"])
    c = np.block([[c, s[:, None]], [s[None, :], np.full((1, 1), n)]]).astype(c.dtype)
    heads_v = np.concatenate([heads_v, b_v.reshape(kv, 1, vd)], axis=1)
  elif b_v is not None:
    # The value bias passes through attention unchanged (softmax rows sum to 1): fold it into the output bias.
    b_o = b_o + np.repeat(b_v.reshape(kv, 1, vd), group, axis=1).reshape(-1) @ w_o
  c = jnp.asarray(c)
  a, b = _value_output_factors(c, jnp.asarray(heads_v, c.dtype), jnp.asarray(heads_o, c.dtype), ridge)
  a, b = np.asarray(a)[:, :, :k_v], np.asarray(b)[:, :k_v]
  w_o = b.reshape(kv, k_v, group, -1).transpose(0, 2, 1, 3).reshape(kv * group * k_v, -1)
  new_b_v = None if b_v is None else (a[:, d] if augmented else np.zeros((kv, k_v), b_v.dtype)).reshape(-1)
  return (a[:, :d].transpose(1, 0, 2).reshape(d, kv * k_v), new_b_v), (w_o, b_o)
