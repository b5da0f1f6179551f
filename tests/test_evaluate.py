"""Refusal statistics: Wilson intervals hold the observed rate and stay inside [0, 1]."""

import pytest

from cdelta.evaluate import wilson_interval


@pytest.mark.parametrize("k,n", [(0, 5), (5, 5), (1, 3), (20, 20), (0, 1), (7, 100)])
def test_wilson_interval_contains_rate_and_is_exact_at_the_ends(k, n):
    low, high = wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0
    assert (low == 0.0) == (k == 0) and (high == 1.0) == (k == n)


def test_wilson_interval_known_value():
    low, high = wilson_interval(16, 20)
    assert low == pytest.approx(0.584, abs=1e-3) and high == pytest.approx(0.919, abs=1e-3)
