"""Shared per-token building blocks. All are pure functions of [b, s] (or [b, s, k]) tensors.

NaN safety: a masked-out position may hold -inf / nan (teacher -inf log-prob, padding). `torch.where` blocks
such values in the forward pass but NOT in the backward pass of the arithmetic that produced them
(nan * 0 = nan), so every input is sanitised with `safe()` BEFORE any arithmetic.
"""
from __future__ import annotations

import torch

# A term's output: per-token loss [b, s] (zero off its mask) and metrics name -> (values [b, s], mask [b, s]).
TermMetrics = dict[str, tuple[torch.Tensor, torch.Tensor]]


def safe(x: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """x where mask else fill; gradient flows only where mask (and never sees the masked-out values)."""
    return torch.where(mask, x, torch.full_like(x, fill))


def ratio(lp_s: torch.Tensor, lp_old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """rho_t = exp(lp_s - lp_old) on `mask` (1 elsewhere); differentiable w.r.t. lp_s."""
    return torch.exp(safe(lp_s, mask) - safe(lp_old.detach(), mask))


def policy_gradient_term(rho: torch.Tensor, reward: torch.Tensor, clip: tuple[float, float] | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """L = -rho * R, or with PPO clip L = max(-rho * R, -clip(rho, 1 - eps_lo, 1 + eps_hi) * R).

    `reward` R is detached (a reward, not differentiated). Returns (loss, clipped) where `clipped` marks tokens
    whose clipped branch is strictly active (zero gradient).
    """
    reward = reward.detach()
    unclipped = -rho * reward
    if clip is None:
        return unclipped, torch.zeros_like(reward, dtype=torch.bool)
    clipped_loss = -torch.clamp(rho, 1.0 - clip[0], 1.0 + clip[1]) * reward
    return torch.maximum(unclipped, clipped_loss), clipped_loss > unclipped


def teacher_topk_probs(tk_lp: torch.Tensor, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher top-k (probabilities p_v, log-probabilities log p_v), -inf entries -> p = 0, log p = 0.

    renormalize: p_v = pi_T,v / sum_{u in TopK} pi_T,u (a proper distribution on the top-k); else p_v = pi_T,v.
    """
    tk_lp = tk_lp.detach()
    fin = torch.isfinite(tk_lp)
    lp = safe(tk_lp, fin)
    p = torch.where(fin, torch.exp(lp), torch.zeros_like(lp))
    if renormalize:
        z = p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
        p = p / z
        lp = safe(lp - torch.log(z), fin)
    return p, lp


def topk_forward_kl(tk_lp: torch.Tensor, sk_lp: torch.Tensor, mask: torch.Tensor, renormalize: bool
                    ) -> torch.Tensor:
    """FKL_k = sum_{v in TopK_T} p_v (log p_v - sk_lp_v)  [b, s], differentiated directly w.r.t. sk_lp.

    d FKL_k / d sk_lp_v = -p_v, i.e. the gradient is sum_v p_v * d(-log pi_S,v): a real forward-KL gradient,
    not a detached reward. Zero off `mask`.
    """
    p, lp = teacher_topk_probs(tk_lp, renormalize)
    m3 = mask.unsqueeze(-1) & (p > 0)
    p = safe(p, m3)
    s = safe(sk_lp, m3)
    return (p * (safe(lp, m3) - s)).sum(-1)


def select_topk(tk_lp: torch.Tensor, sk_lp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k highest teacher entries of a larger top-k (order not assumed); identity when sizes match."""
    if tk_lp.shape[-1] == k:
        return tk_lp, sk_lp
    if tk_lp.shape[-1] < k:
        raise ValueError(f"teacher top-k has k = {tk_lp.shape[-1]} < {k}; raise the teacher top-k")
    idx = torch.topk(torch.nan_to_num(tk_lp.detach(), nan=float("-inf")), k, dim=-1).indices
    return tk_lp.gather(-1, idx), sk_lp.gather(-1, idx)


def reward(lp_t: torch.Tensor, lp_ref: torch.Tensor) -> torch.Tensor:
    """r_t = lp_t - lp_ref (detached); -inf when the teacher gives the token probability 0."""
    return (lp_t - lp_ref).detach()


def entropy_metrics(inputs, mask: torch.Tensor) -> TermMetrics:
    """Mean teacher / student entropy on `mask` when the step computed them."""
    out: TermMetrics = {}
    if inputs.ent_t is not None:
        out["entropy/teacher"] = (inputs.ent_t.detach(), mask)
    if inputs.ent_s is not None:
        out["entropy/student"] = (inputs.ent_s.detach(), mask)
    return out


def reward_metrics(r: torch.Tensor, mask: torch.Tensor) -> TermMetrics:
    """mean r, K1 reverse-KL estimate (-r) over finite r, and the fraction of non-finite teacher log-probs."""
    fin = torch.isfinite(r) & mask
    r0 = safe(r, fin)
    return {"reward/mean_r": (r0, fin), "reward/k1_rkl": (-r0, fin),
            "reward/nonfinite_frac": ((~torch.isfinite(r)).to(r.dtype), mask)}
