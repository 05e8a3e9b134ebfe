"""REOPOLD (Ko et al., arXiv 2603.11137): OPD with the reward clipped from below."""
from __future__ import annotations

import torch

from .common import TermMetrics, entropy_metrics, policy_gradient_term, ratio, reward, reward_metrics, safe
from .config import ObjectiveConfig
from .inputs import Requirements, TokenInputs
from .opd import entropy_selection


def reopold(inputs: TokenInputs, cfg: ObjectiveConfig) -> tuple[torch.Tensor, TermMetrics]:
    """REOPOLD: L_t = -rho_t * max(r_t, floor), floor = log(lambda) / (1 - lambda) (lambda = 0.1: -2.558).

    mask_clipped: tokens with r_t < floor are dropped instead of clipped ("Mask Outlier").
    Two-stage (switch_step set): from step >= switch_step only tokens with H_S >= h (the step's global
    top-`entropy_frac` threshold, `inputs.entropy_threshold`) keep their term. Dropped tokens stay in the
    token-mean denominator. A teacher log-prob of -inf gives r = -inf < floor: clipped to the floor (or masked).
    """
    mask = inputs.on_policy_mask
    floor = cfg.reward_floor
    r = reward(inputs.lp_t, inputs.lp_old)
    r_ok = mask & ~torch.isnan(r)
    below = r_ok & (safe(r, r_ok) < floor)
    keep = r_ok & ~below if cfg.mask_clipped else r_ok
    if cfg.switch_step is not None and inputs.step >= cfg.switch_step:
        keep = keep & entropy_selection(inputs.ent_s, inputs.entropy_threshold, mask)
    r_hat = torch.clamp(safe(r, keep), min=floor)  # -inf -> floor
    loss, clipped = policy_gradient_term(ratio(inputs.lp_s, inputs.lp_old, keep), r_hat, cfg.ppo_clip_range)
    loss = safe(loss, keep)
    dt = inputs.lp_old.dtype
    m = reward_metrics(r, mask)
    m.update({
        "loss/reopold": (loss.detach(), mask),
        "reward_clipped_frac": (below.to(dt), mask),  # r_t < floor (clipped, or masked with mask_clipped)
        "kept_frac": (keep.to(dt), mask),
    })
    if cfg.use_ppo_clip:
        m["clipped_frac"] = ((clipped & keep).to(dt), mask)
    return loss, {**m, **entropy_metrics(inputs, mask)}


def reopold_requirements(cfg: ObjectiveConfig) -> Requirements:
    two_stage = cfg.switch_step is not None
    return Requirements(student_entropy=two_stage, entropy_threshold="student" if two_stage else None,
                        entropy_frac=cfg.entropy_frac)
