"""TrOPD's trust region: M_t ~ Bernoulli(P_trust), P_trust = min(1, exp(r_t)), from a counter-based RNG."""
from __future__ import annotations

import torch

from . import rng


def trust_probability(lp_t: torch.Tensor, lp_ref: torch.Tensor) -> torch.Tensor:
    """P_trust = min(1, exp(lp_t - lp_ref)) [b, s] (detached); lp_t = -inf -> 0, nan -> 0."""
    r = (lp_t - lp_ref).detach()
    return torch.nan_to_num(torch.exp(torch.clamp(r, max=0.0)), nan=0.0)


def trust_uniforms(seed: int, step: int, sample_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """u_t ~ U[0, 1) [b, s] (float64), a pure function of (seed, step, sample id, position).

    The same token gets the same u on any DP / micro-batch split and in any sample order.
    """
    return rng.uniform(seed, rng.STREAM_TRUST, step, sample_ids.to(torch.int64).unsqueeze(-1),
                       positions.to(torch.int64))


def trust_mask(p_trust: torch.Tensor, seed: int, step: int, sample_ids: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
    """M_t = 1[u_t < P_trust]  [b, s] bool (P_trust = 1 -> always in the region, 0 -> never)."""
    u = trust_uniforms(seed, step, sample_ids, positions).to(p_trust.device)
    return u < p_trust.to(torch.float64)
