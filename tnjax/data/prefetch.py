"""Prefetching: the items of a range of steps made ahead on a background thread, in order, through a bounded queue.

The training loop makes each step's batch (drawn on the host, put on the
devices) with a `Prefetcher`, so the devices never wait for the host between
steps. The items and their order are those of making them in the loop: only
when they are made changes.
"""

from __future__ import annotations

import numbers
import queue
import threading
import warnings
from collections.abc import Callable
from typing import Any

THREAD_NAME = "tnjax-prefetch"  # the producer thread's name (what tests look for after a run)
_POLL_S = 0.1  # how often a blocked put or get looks whether the other side has gone
_JOIN_S = 60.0  # how long `close` waits for a ``make`` call in progress


class _Failure:
  """What the producer queues when ``make`` raises: the exception, raised again by the consumer."""

  def __init__(self, error: BaseException):
    self.error = error


class Prefetcher:
  """``make(i)`` for ``i`` in ``range(start, stop)``, in order, each made on a background thread while earlier ones
  are consumed: at most ``depth`` finished items wait in a bounded queue. ``depth=0`` makes each item when it is
  asked for, on the caller's thread (no thread at all).

  An exception raised by ``make`` (or a Ctrl-C landing in it) is raised again, the same object with its traceback,
  by the ``next`` call that would have returned that item; later items are not made. Use it as a context manager:
  leaving the block (at the end, on an error, on Ctrl-C) stops the thread and waits for it, so no thread outlives
  the block (a ``make`` call in progress finishes first; one that takes over a minute is left behind, a daemon
  thread, with a warning).

  Args:
    make: the item of index ``i``; called from the producer thread when ``depth > 0``.
    start, stop: the range of indices.
    depth: items made ahead (>= 0).

  Raises:
    ValueError: for a ``depth`` that is not an integer >= 0, or ``start``/``stop`` that are not integers.

  Examples:
    >>> with Prefetcher(lambda i: i * i, 2, 6, depth=2) as items:
    ...   list(items)
    [4, 9, 16, 25]
  """

  def __init__(self, make: Callable[[int], Any], start: int, stop: int, depth: int = 2):
    fn = "Prefetcher"
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 0:
      raise ValueError(f"{fn}: depth={depth!r} but an integer >= 0 is expected (0: make each item when asked)")
    for name, value in (("start", start), ("stop", stop)):
      if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{fn}: {name}={value!r} but an integer is expected")
    self._make, self._next, self._stop = make, int(start), int(stop)
    self._closed = threading.Event()
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
    self._thread = None
    if depth and start < stop:
      self._thread = threading.Thread(target=self._produce, args=(self._next,), name=THREAD_NAME, daemon=True)
      self._thread.start()

  def _produce(self, start: int) -> None:
    for i in range(start, self._stop):
      if self._closed.is_set():
        return
      try:
        item = self._make(i)
      except BaseException as e:  # a Ctrl-C or SystemExit in make is the consumer's to raise
        item = _Failure(e)
      if not self._put(item) or isinstance(item, _Failure):
        return

  def _put(self, item) -> bool:
    """Queues ``item`` unless the consumer has closed first; whether it was queued."""
    while not self._closed.is_set():
      try:
        self._queue.put(item, timeout=_POLL_S)
        return True
      except queue.Full:
        pass
    return False

  def _get(self):
    while True:
      try:
        return self._queue.get(timeout=_POLL_S)
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():  # it queues a _Failure before it ends early
          raise RuntimeError("Prefetcher: the producer thread ended without making the next item") from None

  def __iter__(self) -> Prefetcher:
    return self

  def __next__(self):
    if self._next >= self._stop or self._closed.is_set():
      raise StopIteration
    item = self._make(self._next) if self._thread is None else self._get()
    self._next += 1
    if isinstance(item, _Failure):
      self.close()
      raise item.error
    return item

  def close(self) -> None:
    """Stops the producer and waits for it (a ``make`` call in progress finishes first); drops queued items."""
    self._closed.set()
    if self._thread is not None:
      self._thread.join(_JOIN_S)
      if self._thread.is_alive():
        warnings.warn(f"Prefetcher: the producer thread is still in make() after {_JOIN_S:.0f} s; leaving it "
                      "(a daemon thread, which does not keep the process alive)", RuntimeWarning, stacklevel=2)
    while not self._queue.empty():  # release the items (device buffers) nobody will take
      self._queue.get_nowait()

  def __enter__(self) -> Prefetcher:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
