import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tnjax


@pytest.mark.parametrize(
    "n, d, expected",
    [(768, 3, (8, 8, 12)), (3072, 3, (12, 16, 16)), (2304, 3, (12, 12, 16)), (1024, 2, (32, 32)),
     (768, 1, (768,)), (1, 3, (1, 1, 1))],
)
def test_factorize_gpt2_sizes(n, d, expected):
  assert tnjax.factorize(n, d) == expected


def test_factorize_pads_vocab_with_all_factors():
  for d in (2, 3, 4):
    f = tnjax.factorize(50257, d)
    assert len(f) == d  # never silently fewer factors
    assert 50257 <= math.prod(f) <= 50257 * 1.01


def _least_padded_product(n, d):
  bound = max(2, math.ceil(1.5 * n ** (1 / d)))
  return min(math.prod(c) for c in itertools.combinations_with_replacement(range(1, bound + 1), d)
             if math.prod(c) >= n)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), d=st.integers(2, 4))
def test_factorize_least_padding_brute_force(n, d):
  f = tnjax.factorize(n, d)
  assert len(f) == d and list(f) == sorted(f)
  assert max(f) <= max(2, math.ceil(1.5 * n ** (1 / d)))
  assert math.prod(f) == _least_padded_product(n, d)


@pytest.mark.parametrize("n, d, match", [(0, 3, r"factorize: n=0 but a positive integer"),
                                         (10, 0, r"factorize: d=0 but a positive integer"),
                                         (10.5, 2, r"factorize: n=10.5 but a positive integer")])
def test_factorize_errors(n, d, match):
  with pytest.raises(ValueError, match=match):
    tnjax.factorize(n, d)
