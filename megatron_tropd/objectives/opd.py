"""OPD (K1 reverse KL as a detached reward) and entropy-OPD (OPD on the highest-entropy tokens)."""
from __future__ import annotations

import torch

from .common import TermMetrics, entropy_metrics, policy_gradient_term, ratio, reward, reward_metrics, safe
from .config import ObjectiveConfig
from .inputs import Requirements, TokenInputs


def opd_term(lp_s: torch.Tensor, lp_old: torch.Tensor, lp_t: torch.Tensor, mask: torch.Tensor,
             clip: tuple[float, float] | None = None) -> tuple[torch.Tensor, TermMetrics]:
    """OPD: L_t = -rho_t * r_t, r_t = lp_t - lp_old, rho_t = exp(lp_s - lp_old)  (gradient -r_t * grad lp_s).

    PPO clip (optional): L_t = max(-rho r, -clip(rho, 1 - eps_lo, 1 + eps_hi) r).
    Tokens with a non-finite r (teacher log-prob -inf) have no finite K1 reward: they contribute 0 and are
    counted in `reward/nonfinite_frac`.
    """
    r = reward(lp_t, lp_old)
    valid = mask & torch.isfinite(r)
    loss, clipped = policy_gradient_term(ratio(lp_s, lp_old, valid), safe(r, valid), clip)
    m = reward_metrics(r, mask)
    m["loss/opd"] = (safe(loss, valid).detach(), mask)
    if clip is not None:
        m["clipped_frac"] = ((clipped & valid).to(r.dtype), mask)
    return safe(loss, valid), m


def opd(inputs: TokenInputs, cfg: ObjectiveConfig) -> tuple[torch.Tensor, TermMetrics]:
    """OPD on the on-policy tokens (see `opd_term`)."""
    mask = inputs.on_policy_mask
    loss, m = opd_term(inputs.lp_s, inputs.lp_old, inputs.lp_t, mask, cfg.ppo_clip_range)
    return loss, {**m, **entropy_metrics(inputs, mask)}


def entropy_selection(ent: torch.Tensor, threshold: float, mask: torch.Tensor) -> torch.Tensor:
    """1[H_t >= h] on mask, h = the step's global top-`entropy_frac` threshold (aggregation.entropy_threshold)."""
    return mask & (safe(ent.detach(), mask, float("-inf")) >= threshold)


def entropy_opd(inputs: TokenInputs, cfg: ObjectiveConfig) -> tuple[torch.Tensor, TermMetrics]:
    """Entropy-OPD: L_t = 1[H_t >= h] * (-rho_t r_t), h = threshold of the top `entropy_frac` (20%) tokens.

    H is the student entropy (entropy_source="student", default) or the teacher's; h is computed once per step
    over the global batch and passed in `inputs.entropy_threshold`. Unselected tokens still count in the
    token-mean denominator.
    """
    mask = inputs.on_policy_mask
    ent = inputs.ent_s if cfg.entropy_source == "student" else inputs.ent_t
    sel = entropy_selection(ent, inputs.entropy_threshold, mask)
    loss, m = opd_term(inputs.lp_s, inputs.lp_old, inputs.lp_t, sel, cfg.ppo_clip_range)
    m = {k: (v, mask) if k.startswith("loss/") else (v, vm) for k, (v, vm) in m.items()}
    m["entropy_selected_frac"] = (sel.to(inputs.lp_old.dtype), mask)
    return loss, {**m, **entropy_metrics(inputs, mask)}


def opd_requirements(cfg: ObjectiveConfig) -> Requirements:
    return Requirements(rollout_logprobs=False)


def entropy_opd_requirements(cfg: ObjectiveConfig) -> Requirements:
    return Requirements(student_entropy=cfg.entropy_source == "student",
                        teacher_entropy=cfg.entropy_source == "teacher",
                        entropy_threshold=cfg.entropy_source, entropy_frac=cfg.entropy_frac)
