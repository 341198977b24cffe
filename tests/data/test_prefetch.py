import threading
import time

import pytest

from tnjax.data import Prefetcher
from tnjax.data.prefetch import THREAD_NAME


def _producers():
  return [t for t in threading.enumerate() if t.name == THREAD_NAME]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_items_in_order_and_no_thread_after(depth):
  with Prefetcher(lambda i: (i, i * i), 3, 11, depth=depth) as items:
    assert (len(_producers()) == 1) == (depth > 0)
    assert list(items) == [(i, i * i) for i in range(3, 11)]
  assert not _producers()
  with Prefetcher(lambda i: i, 5, 5, depth=2) as items:  # an empty range starts no thread
    assert list(items) == [] and not _producers()


def test_makes_at_most_depth_items_ahead():
  made, depth = [], 2
  with Prefetcher(lambda i: made.append(i) or i, 0, 20, depth=depth) as items:
    for i in range(5):
      assert next(items) == i
      # as far ahead as the queue lets it: depth items waiting, one more made and blocked on the full queue
      ahead = i + 1 + depth + 1
      deadline = time.time() + 5
      while len(made) < ahead and time.time() < deadline:
        time.sleep(0.01)
      time.sleep(0.02)
      assert len(made) == ahead, made


def test_depth_zero_makes_each_item_when_asked():
  made = []
  with Prefetcher(lambda i: made.append(i) or i, 0, 4, depth=0) as items:
    assert made == [] and next(items) == 0 and made == [0]


@pytest.mark.parametrize("depth", [0, 2])
def test_an_error_in_make_is_raised_as_it_was_at_its_item(depth):
  made = []

  def make(i):
    made.append(i)
    if i == 3:
      raise ValueError("train_batch: the shard for step 3 is unreadable")
    return i

  got = []
  with pytest.raises(ValueError, match=r"^train_batch: the shard for step 3 is unreadable$") as caught:
    with Prefetcher(make, 0, 10, depth=depth) as items:
      for item in items:
        got.append(item)
  assert got == [0, 1, 2] and max(made) == 3  # nothing made after the failing item
  assert any(frame.name == "make" for frame in __import__("traceback").extract_tb(caught.value.__traceback__))
  assert not _producers()


def test_leaving_early_or_on_ctrl_c_stops_the_thread():
  started = threading.Event()

  def make(i):
    started.set()
    return i

  with Prefetcher(make, 0, 1000, depth=2) as items:
    next(items)
  assert not _producers()
  with pytest.raises(KeyboardInterrupt):
    with Prefetcher(make, 0, 1000, depth=2) as items:
      started.wait(5)
      next(items)
      raise KeyboardInterrupt
  assert not _producers()
  items = Prefetcher(make, 0, 1000, depth=2)
  items.close()
  assert not _producers() and list(items) == []  # closed: nothing more


@pytest.mark.parametrize("kwargs, match", [
    ({"depth": -1}, r"Prefetcher: depth=-1 but an integer >= 0 is expected"),
    ({"depth": True}, r"Prefetcher: depth=True but an integer >= 0"),
    ({"depth": 1.5}, r"Prefetcher: depth=1.5 but an integer >= 0"),
    ({"start": "0"}, r"Prefetcher: start='0' but an integer is expected"),
])
def test_bad_arguments(kwargs, match):
  args = {"make": lambda i: i, "start": 0, "stop": 3, "depth": 1, **kwargs}
  with pytest.raises(ValueError, match=match):
    Prefetcher(**args)
