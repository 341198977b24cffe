"""Progress bars for compression's long loops: calibration passes and fits, block by block.

Off by default, so library calls print nothing. ``tnjax compress`` turns them
on for a terminal; in Python, wrap a call in `progress_bars`:

    with tnjax.compress.progress_bars():
        small = svdllm_compress(model, ids, ratio=0.8)

The bars (tqdm, on stderr) count blocks, layers, batches or steps; at 1-8B
one block of calibration and fitting takes seconds to a minute.
"""

from __future__ import annotations

import contextlib
import contextvars

_ENABLED: contextvars.ContextVar[bool | None] = contextvars.ContextVar("tnjax_compress_progress", default=False)


@contextlib.contextmanager
def progress_bars(enabled: bool | None = True):
  """Shows compression's progress bars inside the ``with`` block.

  Args:
    enabled: True (always), None (when stderr is a terminal, tqdm's rule) or False (never).

  Examples:
    >>> with progress_bars(False):
    ...   list(bar(range(3), "fit", unit="layer"))
    [0, 1, 2]
  """
  token = _ENABLED.set(enabled)
  try:
    yield
  finally:
    _ENABLED.reset(token)


def bar(iterable, desc: str, *, unit: str, total: int | None = None):
  """``iterable``, counted by a bar when `progress_bars` is on, else as it is."""
  enabled = _ENABLED.get()
  if enabled is False:
    return iterable
  from tqdm import tqdm

  return tqdm(iterable, desc=desc, unit=unit, total=total, disable=None if enabled is None else False)
