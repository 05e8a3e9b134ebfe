"""pass@k and avg@k over n samples per problem.

pass@k (Chen et al. 2021, unbiased): draw k of the n samples without replacement; the chance that at least one of
them is correct when c of the n are correct is

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

The product form avoids huge binomials (and float overflow) for n in the hundreds.

avg@k: the mean correctness of the first k samples of each problem (the paper's "average over 32 samples" is
avg@32 with n = 32); it equals c/n when k = n.
"""
from __future__ import annotations

from typing import Sequence


def _check(n: int, c: int, k: int) -> None:
    if n < 1:
        raise ValueError(f"pass@k needs n >= 1 samples per problem, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"number correct c={c} must be in [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, n={n}]: draw at least as many samples as the largest k (--n >= --k)")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k)/C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i)."""
    _check(n, c, k)
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(correct: Sequence[bool], k: int) -> float:
    """Mean correctness of the first k samples of one problem (samples are in generation order)."""
    _check(len(correct), sum(map(bool, correct)), k)
    return sum(map(bool, correct[:k])) / k


def aggregate(per_problem_correct: Sequence[Sequence[bool]], k_list: Sequence[int]) -> dict[str, float]:
    """Benchmark metrics: mean over problems of pass@k and avg@k for every k in k_list.

    Returns {"pass@1": ..., "avg@1": ..., ...}; every problem must have the same n >= max(k_list).
    """
    if not per_problem_correct:
        raise ValueError("no problems to aggregate (empty benchmark or --limit 0)")
    ns = {len(c) for c in per_problem_correct}
    if len(ns) != 1:
        raise ValueError(f"problems have different numbers of samples {sorted(ns)}; pass@k needs the same n")
    out: dict[str, float] = {}
    m = len(per_problem_correct)
    for k in sorted(set(k_list)):
        out[f"pass@{k}"] = sum(pass_at_k(len(c), sum(map(bool, c)), k) for c in per_problem_correct) / m
        out[f"avg@{k}"] = sum(avg_at_k(c, k) for c in per_problem_correct) / m
    return out
