"""JSD(beta) as in TrOPD Table 1: a direct top-k term plus a sampled-token reward term."""
from __future__ import annotations

import math

import torch

from .common import (TermMetrics, entropy_metrics, policy_gradient_term, ratio, reward, reward_metrics, safe,
                     select_topk, teacher_topk_probs)
from .config import ObjectiveConfig
from .inputs import Requirements, TokenInputs


def jsd(inputs: TokenInputs, cfg: ObjectiveConfig) -> tuple[torch.Tensor, TermMetrics]:
    """JSD(beta), m = beta * pi_T + (1 - beta) * pi_S, beta = 0.5:

        L_t = beta * sum_{v in TopK_T} pi_T,v (log pi_T,v - log m_v)          (direct, grad via sk_lp in m_v)
            + (1 - beta) * rho_t * (lp_old - log m_{x_t})                       (reward term)

    log m_v = logaddexp(log beta + tk_lp_v, log(1 - beta) + sk_lp_v); for the sampled token
    log m_x = logaddexp(log beta + lp_t, log(1 - beta) + lp_old) is detached, so the second term is the
    REINFORCE form of (1 - beta) * KL(pi_S || m) with reward R = -(lp_old - log m_x), like OPD's -r.
    Top-k size `topk` (64); teacher probabilities renormalised only with `renormalize`.
    A teacher log-prob of -inf is fine here (m_x > 0).
    """
    mask = inputs.on_policy_mask
    beta = cfg.jsd_beta
    lb, l1b = math.log(beta), math.log1p(-beta)
    tk_lp, sk_lp = select_topk(inputs.tk_lp, inputs.sk_lp, cfg.topk)
    p, lp = teacher_topk_probs(tk_lp, cfg.renormalize)
    m3 = mask.unsqueeze(-1) & (p > 0)
    p, lp, s = safe(p, m3), safe(lp, m3), safe(sk_lp, m3)
    log_m = torch.logaddexp(lp + lb, s + l1b)
    direct = beta * (p * (lp - safe(log_m, m3))).sum(-1)

    lp_old = safe(inputs.lp_old.detach(), mask)
    lp_t = safe(inputs.lp_t.detach(), mask & ~torch.isnan(inputs.lp_t))
    log_m_x = torch.logaddexp(lp_t + lb, lp_old + l1b)
    r_jsd = -(lp_old - log_m_x)
    pg, clipped = policy_gradient_term(ratio(inputs.lp_s, inputs.lp_old, mask), r_jsd, cfg.ppo_clip_range)
    pg = (1.0 - beta) * safe(pg, mask)
    loss = safe(direct, mask) + pg
    dt = inputs.lp_old.dtype
    m: TermMetrics = {
        **reward_metrics(reward(inputs.lp_t, inputs.lp_old), mask),
        "loss/jsd_topk": (direct.detach(), mask),
        "loss/jsd_reward": (pg.detach(), mask),
        "jsd_reward_mean": (r_jsd, mask),
    }
    if cfg.use_ppo_clip:
        m["clipped_frac"] = ((clipped & mask).to(dt), mask)
    return loss, {**m, **entropy_metrics(inputs, mask)}


def jsd_requirements(cfg: ObjectiveConfig) -> Requirements:
    return Requirements(teacher_topk=cfg.topk, student_at_teacher_topk=True)
