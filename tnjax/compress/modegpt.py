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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tnjax.compress import _model
from tnjax.core import _checks
from tnjax.models.config import PROJECTIONS, LayerSpec
from tnjax.models.gpt import GPT, dense_kernel

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
def _masked_refit(c, w_down, mask, ridge):
  """Solves (C[S,S] + eps I) X = C[S,:] W_D as a full-size system: identity outside S, so X is 0 there."""
  eps = 1e-6 * ridge * jnp.trace(c) / c.shape[0]
  both = mask[:, None] & mask[None, :]
  eye = jnp.eye(c.shape[0], dtype=c.dtype)
  system = jnp.where(both, c + eps * eye, eye)
  rhs = jnp.where(mask[:, None], jnp.matmul(c, w_down, precision=_HIGH), 0)
  return jnp.linalg.solve(system, rhs)


def nystrom_select(c, w_down, k: int, *, ridge: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
  """Type I: the k columns of a correlation ``c`` (f, f) with the largest ridge leverage scores, and the refit.

  Args:
    c: ``H^T H`` of the intermediate activations H (tokens, f).
    w_down: the following matrix (f, out).
    k: columns kept.
    ridge: lambda as a fraction of mean(diag(c)), for the scores (the solve adds 1e-6 of it).

  Returns:
    ``(s, w)``: sorted kept indices (k,) and ``w = (c[s,s] + eps)^-1 c[s,:] w_down``
    (k, out), the least-squares fit of ``H w_down`` by ``H[:, s] w``.

  Example:
    >>> import numpy as np
    >>> h = np.random.default_rng(0).normal(size=(100, 6)); w = np.ones((6, 2))
    >>> keep, w_new = nystrom_select(h.T @ h, w, 6)
    >>> keep.tolist(), bool(np.allclose(h[:, keep] @ w_new, h @ w, atol=1e-4))
    ([0, 1, 2, 3, 4, 5], True)
  """
  c = jnp.asarray(c)
  scores = np.asarray(_leverage_scores(c, ridge))
  s = np.sort(np.argsort(-scores, kind="stable")[:k])
  mask = np.zeros(c.shape[0], bool)
  mask[s] = True
  return s, np.asarray(_masked_refit(c, jnp.asarray(w_down, c.dtype), jnp.asarray(mask), ridge))[s]


def cr_select(q_norm2, k_norm2, k: int) -> np.ndarray:
  """Type II: per head, the k query/key columns with the largest ``||q_i|| * ||k_i||``.

  Args:
    q_norm2, k_norm2: (n_head, head_dim) sums of squares of each query and key
      column over the calibration tokens.
    k: columns kept per head.

  Returns:
    (n_head, k) sorted column indices within each head.

  Example:
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


def whitened_svd(c, w_v, w_o, k: int, *, ridge: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
  """Type III: the rank-k ``W_V' W_O'`` closest to ``W_V W_O`` in the data norm ``||X (.)||_F`` with ``C = X^T X``.

  Args:
    c: input correlation (d, d).
    w_v: (d, h) value matrix of one head; w_o: (h, d) its output rows.
    k: rank kept.
    ridge: lambda added to c as a fraction of mean(diag(c)) (0: exact, c must be invertible).

  Returns:
    ``(w_v', w_o')`` of shapes (d, k) and (k, d).

  Complexity:
    One eigendecomposition of c, QRs of (d, h) matrices and an (h, h) SVD.

  Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x, wv, wo = rng.normal(size=(50, 8)), rng.normal(size=(8, 3)), rng.normal(size=(3, 8))
    >>> a, b = whitened_svd(x.T @ x, wv, wo, 3, ridge=0.0)  # full rank: exact
    >>> a.shape, b.shape, bool(np.allclose(x @ a @ b, x @ wv @ wo, atol=1e-3))
    ((8, 3), (3, 8), True)
  """
  c = jnp.asarray(c)
  a, b = _value_output_factors(c, jnp.asarray(w_v, c.dtype)[None], jnp.asarray(w_o, c.dtype)[None], ridge)
  return np.asarray(a[0])[:, :k], np.asarray(b[0])[:k]


def _block_stats(model: GPT, ids):
  """Per-block calibration statistics for one batch of ids (batch, time)."""
  cfg = model.config
  t = ids.shape[1]
  x = (model.wte(ids) + model.wpe(jnp.arange(t))[None]).astype(jnp.float32)
  out = []
  for i, block in enumerate(model.h):
    _, qk, _ = cfg.block_dims(i)
    h1 = block.ln_1(x)
    a = h1.reshape(-1, h1.shape[-1]).astype(jnp.float32)
    qkv = block.attn.c_attn(h1)
    qkv = qkv.reshape(-1, qkv.shape[-1])
    q = qkv[:, : cfg.n_head * qk].astype(jnp.float32)
    k = qkv[:, cfg.n_head * qk : 2 * cfg.n_head * qk].astype(jnp.float32)
    mid = x + block.attn(h1)[0]
    act = jax.nn.gelu(block.mlp.c_fc(block.ln_2(mid)), approximate=True)
    y = mid + block.mlp.c_proj(act)
    act = act.reshape(-1, act.shape[-1]).astype(jnp.float32)
    cos = jnp.sum(x * y, -1) / (jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1) + 1e-12)
    out.append({"attn_in": jnp.matmul(a.T, a, precision=_HIGH),
                "q_norm2": jnp.sum(q * q, 0).reshape(cfg.n_head, qk),
                "k_norm2": jnp.sum(k * k, 0).reshape(cfg.n_head, qk),
                "mlp_act": jnp.matmul(act.T, act, precision=_HIGH),
                "cos": jnp.sum(cos), "tokens": jnp.asarray(cos.size, jnp.float32)})
    x = y.astype(x.dtype)
  return out


@functools.partial(jax.jit, static_argnums=0)
def _jit_stats(graphdef, state, ids):
  return _block_stats(nnx.merge(graphdef, state), ids)


def calibrate(model: GPT, batches) -> list[dict]:
  """Sums the statistics MoDeGPT needs over calibration batches, per block.

  Args:
    model: the model to compress.
    batches: integer id arrays (batch, time), or one such array.

  Returns:
    One dict per block: "attn_in" (d, d) = X^T X of the attention input,
    "q_norm2" / "k_norm2" (n_head, qk_dim) column sums of squares, "mlp_act"
    (d_ff, d_ff) = H^T H of the MLP activations, and "importance"
    (1 - mean cosine similarity of the block's input and output).

  Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from tnjax.models import GPT, preset
    >>> model = GPT(preset("tiny"), rngs=nnx.Rngs(0))
    >>> stats = calibrate(model, np.zeros((2, 16), np.int32))
    >>> first = stats[0]
    >>> len(stats), first["attn_in"].shape, first["mlp_act"].shape
    (2, (128, 128), (512, 512))
  """
  if isinstance(batches, (np.ndarray, jax.Array)) and np.ndim(batches) == 2:
    batches = [batches]
  batches = [jnp.asarray(b) for b in batches]
  if not batches or any(b.ndim != 2 or not jnp.issubdtype(b.dtype, jnp.integer) or b.size == 0 for b in batches):
    raise ValueError("calibrate: batches must be one or more non-empty integer id arrays of shape (batch, time)")
  graphdef, state = nnx.split(model)
  total = None
  for b in batches:
    model._check_ids(b)
    stats = _jit_stats(graphdef, state, b)
    total = stats if total is None else jax.tree_util.tree_map(jnp.add, total, stats)
  return [{"attn_in": s["attn_in"], "q_norm2": s["q_norm2"], "k_norm2": s["k_norm2"], "mlp_act": s["mlp_act"],
           "importance": float(1 - s["cos"] / s["tokens"])} for s in total]


def allocate(importance, ratio: float, *, temperature: float = 1.0, max_cut: float = 0.95) -> list[float]:
  """Per-block kept fractions averaging ``ratio``: cut_l proportional to softmax(-importance_l / eps).

  ``eps = temperature * mean(importance)``; no block loses more than ``max_cut``
  (the excess goes to the others in proportion). Blocks are the same size,
  so the mean kept fraction is the overall one.

  Example:
    >>> [round(r, 3) for r in allocate([0.4, 0.1, 0.1], 0.7)]  # the important first block keeps more
    [0.91, 0.595, 0.595]
  """
  s = np.asarray(importance, np.float64)
  n, cut = len(s), 1.0 - ratio
  eps = temperature * max(float(np.mean(s)), 1e-12)
  w = np.exp(-(s - s.min()) / eps)
  cuts, free = np.zeros(n), np.ones(n, bool)
  for _ in range(n):
    remaining = n * cut - cuts[~free].sum()
    cuts[free] = remaining * w[free] / w[free].sum()
    over = free & (cuts > max_cut)
    if not over.any():
      break
    cuts[over], free = max_cut, free & ~over
  return [float(1 - c) for c in cuts]


def _check_calib(fn, calib):
  if calib is None:
    raise ValueError(f"{fn}: calib=None but MoDeGPT needs calibration ids (batch, time) or statistics from "
                     "calibrate(); pass a few batches of text")


def modegpt_compress(model: GPT, calib, *, ratio: float, allocation: str = "global", temperature: float = 1.0,
                     ridge: float = 1e-4, multiple_of: int = 1) -> GPT:
  """Compresses every block's attention and MLP to about ``ratio`` of their weights (MoDeGPT).

  Args:
    model: the model (projections may be dense or tensorized; the result is dense).
    calib: calibration ids, (batch, time) arrays, or the list `calibrate` returns.
    ratio: overall fraction of attention and MLP weights kept, in (0, 1].
    allocation: "global" (per-block fractions from importance, as the paper)
      or "uniform" (every block the same).
    temperature: sharpness of the global allocation (see `allocate`).
    ridge: regularization of the correlations (fraction of their mean diagonal).
    multiple_of: round kept widths to multiples of this (8 suits GPU tensor
      cores and fused attention); widths never exceed the original.

  Returns:
    A model with ``config.dims`` set per block (d_ff, qk_dim, v_dim); block
    i keeps about ``ratio_i`` of its MLP neurons and per-head widths.

  Raises:
    ValueError: without calibration data, for ratio outside (0, 1], or an
      unknown allocation.

  Example:
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
  ratio = _model.check_ratio(fn, ratio)
  multiple_of = _checks.check_positive_int(fn, "multiple_of", multiple_of)
  if allocation not in ("global", "uniform"):
    raise ValueError(f"{fn}: allocation={allocation!r} but 'global' or 'uniform' is expected")
  cfg = model.config
  stats = calib if isinstance(calib, list) and calib and isinstance(calib[0], dict) else calibrate(model, calib)
  if len(stats) != cfg.n_layer:
    raise ValueError(f"{fn}: statistics for {len(stats)} blocks but the model has n_layer={cfg.n_layer}")
  if allocation == "global":
    ratios = allocate([s["importance"] for s in stats], ratio, temperature=temperature)
  else:
    ratios = [ratio] * cfg.n_layer
  h = cfg.n_head
  replaced, specs, dims = {}, {}, dict(cfg.dims)
  for i, (st, rho) in enumerate(zip(stats, ratios)):
    ff, qk, vd = cfg.block_dims(i)
    k_ff, k_qk, k_v = (min(n, max(multiple_of, multiple_of * round(rho * n / multiple_of))) for n in (ff, qk, vd))
    if (k_ff, k_qk, k_v) == (ff, qk, vd):
      continue
    block = model.h[i]
    # Type I: MLP neurons by Nystrom.
    keep, w_down = nystrom_select(st["mlp_act"], dense_kernel(block.mlp.c_proj), k_ff, ridge=ridge)
    replaced[f"h.{i}.mlp.c_fc"] = {"kernel": np.asarray(dense_kernel(block.mlp.c_fc))[:, keep],
                                    "bias": np.asarray(block.mlp.c_fc.bias[...])[keep]}
    replaced[f"h.{i}.mlp.c_proj"] = {"kernel": w_down, "bias": block.mlp.c_proj.bias[...]}
    # Type II: query/key columns per head by CR.
    w_attn, b_attn = np.asarray(dense_kernel(block.attn.c_attn)), np.asarray(block.attn.c_attn.bias[...])
    cols = cr_select(st["q_norm2"], st["k_norm2"], k_qk)
    cols = (cols + qk * np.arange(h)[:, None]).reshape(-1)
    wq, wk, wv = np.split(w_attn, [h * qk, 2 * h * qk], axis=1)
    bq, bk, bv = np.split(b_attn, [h * qk, 2 * h * qk])
    # Type III: value/output per head by whitened SVD; the value bias folds into the output bias.
    w_o = np.asarray(dense_kernel(block.attn.c_proj))
    b_o = np.asarray(block.attn.c_proj.bias[...]) + bv @ w_o
    c = jnp.asarray(st["attn_in"])
    heads_v = jnp.asarray(wv.reshape(wv.shape[0], h, vd).transpose(1, 0, 2), c.dtype)
    a, b = _value_output_factors(c, heads_v, jnp.asarray(w_o.reshape(h, vd, -1), c.dtype), ridge)
    a, b = np.asarray(a)[:, :, :k_v], np.asarray(b)[:, :k_v]
    replaced[f"h.{i}.attn.c_attn"] = {
        "kernel": np.concatenate([wq[:, cols], wk[:, cols], a.transpose(1, 0, 2).reshape(a.shape[1], -1)], axis=1),
        "bias": np.concatenate([bq[cols], bk[cols], np.zeros((h * k_v,), b_attn.dtype)])}
    replaced[f"h.{i}.attn.c_proj"] = {"kernel": b.reshape(h * k_v, -1), "bias": b_o}
    dims[f"h.{i}"] = {"d_ff": k_ff, "qk_dim": k_qk, "v_dim": k_v}
    specs.update({f"h.{i}.{p}": LayerSpec() for p in PROJECTIONS})
  new_cfg = _model.with_specs(cfg, specs).replace(dims=dims)
  return _model.rebuild(model, new_cfg, replaced)
