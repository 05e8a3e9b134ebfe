"""pass@k against brute-force subset enumeration; avg@k; aggregation; bad input."""
import itertools
import math
from fractions import Fraction

import pytest

from megatron_tropd.evaluation.passk import aggregate, avg_at_k, pass_at_k


def brute_pass_at_k(correct: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_matches_subset_enumeration(n):
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(correct, k), abs=1e-12), (n, c, k)


def test_pass_at_k_closed_form_large_n_is_stable():
    # exact rational 1 - C(n-c,k)/C(n,k) versus the product form at sizes where binomials overflow floats
    for n, c, k in [(500, 3, 100), (1000, 1, 1), (1000, 999, 500), (2000, 10, 1000), (64, 0, 32)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c/n


def test_avg_at_k_uses_first_k_samples():
    s = [True, False, True, True]
    assert avg_at_k(s, 1) == 1.0
    assert avg_at_k(s, 2) == 0.5
    assert avg_at_k(s, 4) == 0.75


def test_aggregate_means_over_problems():
    per = [[True, False, False, False], [False, False, False, False], [True, True, True, True]]
    m = aggregate(per, [1, 2, 4])
    assert m["pass@1"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert m["pass@2"] == pytest.approx((0.5 + 0 + 1) / 3)  # 1 - C(3,2)/C(4,2) = 0.5
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["avg@1"] == pytest.approx(2 / 3)
    assert m["avg@4"] == pytest.approx((0.25 + 0 + 1) / 3)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="--n >= --k"):
        pass_at_k(2, 1, 3)
    with pytest.raises(ValueError, match="number correct"):
        pass_at_k(2, 3, 1)
    with pytest.raises(ValueError, match="same n"):
        aggregate([[True], [True, False]], [1])
    with pytest.raises(ValueError, match="no problems"):
        aggregate([], [1])
