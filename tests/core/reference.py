"""Dense float64 NumPy references, written independently of tnjax's contraction code."""

import numpy as np


def tt_full(cores):
  """Dense tensor from TT cores (r, n, r') by an explicit matrix product per entry index."""
  cores = [np.asarray(c, np.float64) for c in cores]
  dims = [c.shape[1] for c in cores]
  out = np.empty(dims)
  for idx in np.ndindex(*dims):
    m = np.ones((1, 1))
    for c, i in zip(cores, idx):
      m = m @ c[:, i, :]
    out[idx] = m[0, 0]
  return out


def ttm_full(cores):
  """Dense matrix from TTM cores (r, i, o, r'): W[(i1..id), (o1..od)] = prod_k G_k[:, i_k, o_k, :]."""
  cores = [np.asarray(c, np.float64) for c in cores]
  ins = [c.shape[1] for c in cores]
  outs = [c.shape[2] for c in cores]
  w = np.empty((int(np.prod(ins)), int(np.prod(outs))))
  for row, i_idx in enumerate(np.ndindex(*ins)):
    for col, o_idx in enumerate(np.ndindex(*outs)):
      m = np.ones((1, 1))
      for c, i, o in zip(cores, i_idx, o_idx):
        m = m @ c[:, i, o, :]
      w[row, col] = m[0, 0]
  return w


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def low_rank_tensor(rng, dims, rank, noise=0.0):
  """A tensor with exact TT ranks <= rank (plus optional noise): a real-valued test input."""
  cores, r = [], 1
  for k, n in enumerate(dims):
    r_next = 1 if k == len(dims) - 1 else rank
    cores.append(rng.standard_normal((r, n, r_next)))
    r = r_next
  x = tt_full(cores)
  return x + noise * np.linalg.norm(x) / np.sqrt(x.size) * rng.standard_normal(dims)
