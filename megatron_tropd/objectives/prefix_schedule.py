"""TrOPD off-policy guidance: which rollouts start from a teacher prefix, and how long the prefix is.

    L_max(t) = floor(L * (1 + cos(pi * t / T)) / 2)        (L at step 0, 0 at the last step T)
    l ~ Uniform{1 .. L_max(t)} for round(prefix_fraction * n) of the n rollouts of each prompt
      (project default; the paper leaves the distribution open. length_dist="max": l = L_max(t) always)

Deterministic from (seed, step, prompt id, rollout index) via the counter-based RNG, so any rank / worker
computes the same plan. A prefix that ends at EOS is kept whole and the sample is scored as teacher-only
(the rollout code does this: it knows where EOS is).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import rng


PREFIX_LENGTH_DISTS = ("uniform", "max")


@dataclass(frozen=True)
class PrefixOptions:
    total_steps: int  # T: the last step, where L_max reaches 0
    max_response_len: int  # L: L_max at step 0
    prefix_fraction: float = 0.5  # fraction of each prompt's rollouts that start from a teacher prefix
    seed: int = 0  # RNG seed (with step, prompt id, rollout index)
    enabled: bool = True  # False: no prefixes (plain on-policy baselines)
    length_dist: str = "uniform"  # "uniform": l ~ Uniform{1..L_max(t)} | "max": l = L_max(t)

    def __post_init__(self) -> None:
        if self.length_dist not in PREFIX_LENGTH_DISTS:
            raise ValueError(f"unknown prefix length distribution {self.length_dist!r}; valid: "
                             f"{', '.join(PREFIX_LENGTH_DISTS)}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if self.max_response_len < 0:
            raise ValueError(f"max_response_len must be >= 0, got {self.max_response_len}")
        if not 0.0 <= self.prefix_fraction <= 1.0:
            raise ValueError(f"prefix_fraction must be in [0, 1], got {self.prefix_fraction}")


def max_prefix_len(step: int, total_steps: int, max_response_len: int) -> int:
    """L_max(t) = floor(L * (1 + cos(pi * t / T)) / 2); steps past T are clamped to T (L_max = 0)."""
    if total_steps < 1 or step < 0:
        raise ValueError(f"need total_steps >= 1 and step >= 0, got step={step}, total_steps={total_steps}")
    t = min(step, total_steps)
    return int(math.floor(max_response_len * (1.0 + math.cos(math.pi * t / total_steps)) / 2.0 + 1e-9))


def num_prefixed(n_rollouts: int, prefix_fraction: float) -> int:
    """round-half-up(prefix_fraction * n): 0.5 of 4 rollouts -> 2."""
    return int(math.floor(prefix_fraction * n_rollouts + 0.5))


def sample_prefix_lengths(prompt_id: int, n_rollouts: int, step: int, opts: PrefixOptions) -> list[int]:
    """Prefix length per rollout of one prompt (0 = plain on-policy rollout).

    The first round(prefix_fraction * n) rollouts get l = 1 + floor(u * L_max(t)) ~ Uniform{1..L_max(t)}
    (length_dist "max": l = L_max(t)); all get 0 when L_max(t) = 0 or the schedule is disabled.
    """
    if n_rollouts < 0:
        raise ValueError(f"n_rollouts must be >= 0, got {n_rollouts}")
    l_max = max_prefix_len(step, opts.total_steps, opts.max_response_len)
    n_pre = num_prefixed(n_rollouts, opts.prefix_fraction) if opts.enabled and l_max > 0 else 0
    if n_pre == 0:
        return [0] * n_rollouts
    if opts.length_dist == "max":
        return [l_max] * n_pre + [0] * (n_rollouts - n_pre)
    u = rng.uniform(opts.seed, rng.STREAM_PREFIX, step, prompt_id, torch.arange(n_pre, dtype=torch.int64))
    lengths = (1 + torch.floor(u * l_max).to(torch.int64)).clamp(1, l_max).tolist()
    return lengths + [0] * (n_rollouts - n_pre)
