"""TrOPD (arXiv 2606.01249): OPD inside a stochastic trust region, an outlier term outside it."""
from __future__ import annotations

import torch

from .common import (TermMetrics, entropy_metrics, policy_gradient_term, ratio, reward, reward_metrics, safe,
                     select_topk, topk_forward_kl)
from .config import ObjectiveConfig
from .inputs import Requirements, TokenInputs
from .trust_region import trust_mask, trust_probability


def tropd(inputs: TokenInputs, cfg: ObjectiveConfig) -> tuple[torch.Tensor, TermMetrics]:
    """TrOPD on the on-policy tokens (the prefix term is added by the registry for every objective):

        P_t = min(1, exp(lp_t - lp_x))   lp_x = lp_old (trust_logprob="old") or lp_roll ("rollout")
        M_t = 1[u_t < P_t],  u_t = U(seed, step, sample id, position)
        L_t = M_t * (-rho_t r_t) + (1 - M_t) * O_t,    r_t = lp_t - lp_old
        O_t = fkl:  sum_{v in TopK_T} pi_T,v (tk_lp_v - sk_lp_v)   (k = 64, not renormalised; direct gradient)
              clip: -rho_t * max(r_t, floor)                        (floor = log(0.1)/0.9 unless `floor`)
              mask: 0
    With P_t = 1 everywhere this is exactly OPD. The in-region and outlier terms share the denominator
    (all on-policy tokens).
    """
    mask = inputs.on_policy_mask
    r = reward(inputs.lp_t, inputs.lp_old)
    lp_ref = inputs.lp_roll if cfg.trust_logprob == "rollout" else inputs.lp_old
    p_trust = safe(trust_probability(inputs.lp_t, lp_ref), mask)
    in_region = mask & trust_mask(p_trust, cfg.seed, inputs.step, inputs.sample_ids, inputs.positions)
    in_region = in_region & torch.isfinite(r)  # P > u >= 0 already implies r > -inf; guards nan lp_ref
    outlier = mask & ~in_region
    clip = cfg.ppo_clip_range

    rho_in = ratio(inputs.lp_s, inputs.lp_old, in_region)
    opd_loss, clipped = policy_gradient_term(rho_in, safe(r, in_region), clip)
    opd_loss = safe(opd_loss, in_region)

    dt = inputs.lp_old.dtype
    m: TermMetrics = {}
    if cfg.outlier == "fkl":
        tk_lp, sk_lp = select_topk(inputs.tk_lp, inputs.sk_lp, cfg.topk)
        out_loss = topk_forward_kl(tk_lp, sk_lp, outlier, cfg.renormalize)
        m["fkl_outlier"] = (out_loss.detach(), outlier)  # mean forward KL (top-k) on outliers
    elif cfg.outlier == "clip":
        ok = outlier & ~torch.isnan(r)
        r_hat = torch.clamp(safe(r, ok), min=cfg.reward_floor)
        out_loss, _ = policy_gradient_term(ratio(inputs.lp_s, inputs.lp_old, ok), r_hat, clip)
        out_loss = safe(out_loss, ok)
        m["outlier_reward_clipped_frac"] = ((ok & (safe(r, ok) < cfg.reward_floor)).to(dt), outlier)
    else:  # mask
        out_loss = torch.zeros_like(opd_loss)
    loss = opd_loss + out_loss

    m.update(reward_metrics(r, mask))
    m.update({
        "loss/opd_trust": (opd_loss.detach(), mask),
        f"loss/outlier_{cfg.outlier}": (out_loss.detach(), mask),
        "trust/p_mean": (p_trust, mask),
        "trust/frac": (in_region.to(dt), mask),
        "trust/outlier_frac": (outlier.to(dt), mask),
    })
    if inputs.lp_roll is not None:
        m["rollout_logprob_absdiff"] = (safe((inputs.lp_old - inputs.lp_roll).abs().detach(), mask), mask)
    if clip is not None:
        m["clipped_frac"] = ((clipped & in_region).to(dt), mask)
    return loss, {**m, **entropy_metrics(inputs, mask)}


def tropd_requirements(cfg: ObjectiveConfig) -> Requirements:
    fkl = cfg.outlier == "fkl"
    return Requirements(teacher_topk=cfg.topk if fkl else 0, student_at_teacher_topk=fkl,
                        rollout_logprobs=cfg.trust_logprob == "rollout")
