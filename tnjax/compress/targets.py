"""One meaning of a compression target, and how a ratio is spread over layers.

A target is exactly one of:

* ``rank``: a rank cap for every layer (the bond dimension of an MPO, the
  inner width of a low-rank factorization, the TT rank of an embedding);
* ``ratio``: the fraction of the compressed part's stored parameters that
  remains, in (0, 1]; the part is the layers a method rewrites (attention and
  MLP projections, or the embedding), counted as they are stored now (a layer
  already tensorized counts its cores), biases excluded;
* ``rtol``: a per-layer relative error bound (of the weights, or of the
  outputs on calibration text for the data-aware fits).

A ratio is spread over layers by an allocation (`layer_budgets`):
``"uniform"`` (every layer keeps ``ratio`` of itself), ``"importance"``
(MoDeGPT's: blocks whose output differs most from their input keep more,
`allocate`) or ``"loss"`` (the per-layer budgets that minimize the summed
relative truncation loss, from each layer's singular values, in the data
metric when calibrated; SVD-LLM v2 allocates by truncation loss too).
Whatever the allocation, the part never keeps more than ``ratio`` of its
parameters (ranks round down).

A layer whose result would not be smaller than it is now is refused
(``if_larger="error"``, the default), left as it is (``"keep"``), or written
anyway (``"allow"``: an exact full-rank conversion, to train or truncate
later). A model is never made larger silently.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

from tnjax.core import _checks
from tnjax.models.names import parse_layer_key

TARGETS = ("rank", "ratio", "rtol")
ALLOCATIONS = ("uniform", "importance", "loss")
IF_LARGER = ("error", "keep", "allow")


@dataclasses.dataclass(frozen=True)
class Target:
  """One validated target: ``key`` in ``TARGETS`` and its value.

  Examples:
    >>> Target.of("svd_compress", ratio=0.5)
    Target(key='ratio', value=0.5)
    >>> str(Target.of("f", rank=8))
    'rank=8'
  """

  key: str
  value: float

  def __str__(self) -> str:
    return f"{self.key}={self.value}"

  @classmethod
  def of(cls, fn: str, *, rank=None, ratio=None, rtol=None, accepted=TARGETS) -> Target:
    """The single target given, validated; ``accepted``: the keys the caller takes.

    Raises:
      ValueError: for none or more than one target, a key not accepted, a rank that is not a positive
        integer, a ratio outside (0, 1], or an rtol that is not a finite number >= 0.
    """
    given = {k: v for k, v in (("rank", rank), ("ratio", ratio), ("rtol", rtol)) if v is not None}
    if not given:
      raise ValueError(f"{fn}: no target; give exactly one of {', '.join(accepted)} (without one a decomposition "
                       "keeps full rank and the model grows)")
    if len(given) > 1:
      raise ValueError(f"{fn}: {' and '.join(f'{k}={v!r}' for k, v in given.items())} but exactly one of "
                       f"{', '.join(accepted)} is expected")
    (key, value), = given.items()
    if key not in accepted:
      raise ValueError(f"{fn}: {key}={value!r} but this method takes only {' or '.join(accepted)}")
    if key == "rank":
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{fn}: rank={value!r} but a positive integer is expected")
      value = int(value)
    elif key == "ratio":
      if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
        raise ValueError(f"{fn}: ratio={value!r} but 0 < ratio <= 1 (the fraction of the compressed part's "
                         "parameters kept) is expected")
      value = float(value)
    else:
      value = _checks.check_rtol(fn, value)
    return cls(key, value)


def check_choice(fn: str, name: str, value, choices) -> str:
  if value not in choices:
    raise ValueError(f"{fn}: {name}={value!r} but one of {tuple(choices)} is expected")
  return value


MAX_CUT = 0.95  # the largest fraction of a block `allocate` removes


def allocate(importance, ratio: float, *, temperature: float = 1.0, max_cut: float = MAX_CUT) -> list[float]:
  """MoDeGPT's per-block kept fractions averaging ``ratio``: cut_l proportional to softmax(-importance_l / eps).

  ``eps = temperature * mean(importance)``; no block loses more than ``max_cut``
  (the excess goes to the others in proportion). Blocks are the same size,
  so the mean kept fraction is the overall one.

  Examples:
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


def loss_ranks(spectra: dict[str, np.ndarray], unit: dict[str, int], stored: dict[str, int],
               budget: float) -> dict[str, int]:
  """Per-layer ranks minimizing the summed relative truncation loss within ``budget`` parameters.

  Layer i at rank r costs ``r * unit[i]`` parameters and loses
  ``sum(s_i[r:]^2) / sum(s_i^2)``; ranks start at 1 and grow greedily by the
  largest loss removed per parameter (steps that no longer fit are skipped,
  and a layer stops at its first skipped step), never to a size at or above
  the layer's ``stored`` parameters. Since each layer's gains fall with r, the
  result is at least as good as the optimum with ``max(unit)`` fewer
  parameters.

  Raises:
    ValueError: when rank 1 everywhere already exceeds the budget.

  Examples:
    >>> loss_ranks({"a": np.array([3.0, 1, 1]), "b": np.array([2.0, 2, 2])}, {"a": 2, "b": 2},
    ...            {"a": 9, "b": 9}, 8)
    {'a': 1, 'b': 3}
  """
  ranks = {name: 1 for name in spectra}
  used = sum(unit.values())
  if used > budget:
    raise ValueError(f"layer_budgets: allocation='loss' needs {used:,} parameters for rank 1 in every layer but "
                     f"the ratio leaves {budget:,.0f}; choose a larger ratio or fewer layers")
  gains, costs, names = [], [], []
  for name, s in spectra.items():
    e = np.asarray(s, np.float64) ** 2
    top = min(len(e), (stored[name] - 1) // unit[name])  # the largest rank still smaller than the layer
    if top > 1:
      g = e[1:top] / max(e.sum(), 1e-300)
      gains.append(g / unit[name])
      costs.append(np.full(len(g), unit[name]))
      names += [name] * len(g)
  if not names:
    return ranks
  gain, cost = np.concatenate(gains), np.concatenate(costs)
  order = np.argsort(-gain, kind="stable")  # within a layer, gains fall with rank: prefixes are taken
  left, stopped = budget - used, set()
  for k in order:
    if names[k] in stopped:
      continue
    if cost[k] > left:
      stopped.add(names[k])
      continue
    ranks[names[k]] += 1
    left -= cost[k]
  return ranks


def layer_budgets(fn: str, target: Target, allocation: str, stored: dict[str, int], *, unit=None, spectra=None,
                  importance=None) -> dict[str, float]:
  """Per-layer parameter budgets for a ratio target (see the module docstring).

  Args:
    fn: the caller, for errors.
    target: a ratio target.
    allocation: one of ``ALLOCATIONS``.
    stored: each layer's stored weight parameters now.
    unit: parameters per unit of rank of each layer's low-rank form (m + n), for "loss".
    spectra: a callable giving a layer's singular values, for "loss".
    importance: per-block importance (`Calibration.importance`), for "importance".

  Examples:
    >>> t = Target.of("f", ratio=0.5)
    >>> layer_budgets("f", t, "importance", {"h.0.mlp.c_fc": 100, "h.1.mlp.c_fc": 100}, importance=[0.4, 0.1])
    {'h.0.mlp.c_fc': 76.85..., 'h.1.mlp.c_fc': 23.14...}
  """
  check_choice(fn, "allocation", allocation, ALLOCATIONS)
  if allocation != "uniform" and target.key != "ratio":
    raise ValueError(f"{fn}: allocation={allocation!r} with {target} but an allocation spreads a ratio; give "
                     "ratio= (or allocation='uniform')")
  if target.key != "ratio":
    return {}
  if allocation == "uniform":
    return {name: target.value * n for name, n in stored.items()}
  if allocation == "importance":
    if importance is None:
      raise ValueError(f"{fn}: allocation='importance' but no calibration; it needs calib= (block importance is "
                       "measured on text)")
    rho = allocate(importance, target.value)
    return {name: (target.value if parse_layer_key(name)[0] is None else rho[parse_layer_key(name)[0]]) * n
            for name, n in stored.items()}
  ranks = loss_ranks({name: spectra(name) for name in stored}, unit, stored, target.value * sum(stored.values()))
  return {name: ranks[name] * unit[name] for name in stored}


def least_fraction(allocation: str, name: str) -> float:
  """The smallest fraction of its stored weights layer ``name`` is budgeted under ``allocation``, whatever the
  ratio: ``1 - MAX_CUT`` for a block's layer under "importance" (`allocate` cuts no block by more), else 0 (a
  layer then gets the method's smallest form, rank 1).

  Examples:
    >>> round(least_fraction("importance", "h.0.mlp.c_fc"), 2), least_fraction("uniform", "h.0.mlp.c_fc")
    (0.05, 0.0)
  """
  return 1 - MAX_CUT if allocation == "importance" and parse_layer_key(name)[0] is not None else 0.0


def largest_rank(params_at, budget: float, hi: int) -> int:
  """The largest r in [1, hi] with ``params_at(r) <= budget`` (params_at increasing); 1 when none fits.

  Examples:
    >>> largest_rank(lambda r: 10 * r, 55, 100)
    5
  """
  lo = 1
  if params_at(hi) <= budget:
    return hi
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if params_at(mid) <= budget:
      lo = mid
    else:
      hi = mid - 1
  return lo


def rank_within(budget: float, unit: int) -> int:
  """The rank a low-rank layer of ``unit`` parameters per rank gets from ``budget`` (at least 1)."""
  return max(math.floor(budget / unit + 1e-9), 1)
