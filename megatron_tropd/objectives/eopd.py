"""EOPD (Jin et al., arXiv 2603.07079): PPO-clipped OPD + an entropy-gated top-k forward KL."""
from __future__ import annotations

import torch

from .common import TermMetrics, entropy_metrics, safe, select_topk, topk_forward_kl
from .config import ObjectiveConfig
from .inputs import Requirements, TokenInputs
from .opd import opd_term


def eopd(inputs: TokenInputs, cfg: ObjectiveConfig) -> tuple[torch.Tensor, TermMetrics]:
    """EOPD: L_t = L_OPD,clip(eps=0.2) + alpha * 1[H_T >= tau] * FKL_k,

    FKL_k = sum_{v in TopK_T} q_v (log q_v - sk_lp_v), q = teacher top-k renormalised (k = 16, tau = 0.8,
    alpha = 1). The FKL is differentiated directly w.r.t. the student's top-k log-probs (not a reward).
    The gate is inclusive (H_T == tau is on), as in the official EOPD code; H_T is the teacher's entropy over the
    full (real) vocabulary at the rollout temperature (`ent_t`, from ops.entropy on the teacher's logits shards).
    """
    mask = inputs.on_policy_mask
    opd_loss, m = opd_term(inputs.lp_s, inputs.lp_old, inputs.lp_t, mask, cfg.ppo_clip_range)
    gate = mask & (safe(inputs.ent_t.detach(), mask) >= cfg.eopd_tau)
    tk_lp, sk_lp = select_topk(inputs.tk_lp, inputs.sk_lp, cfg.eopd_topk)
    fkl = topk_forward_kl(tk_lp, sk_lp, gate, renormalize=True)
    loss = opd_loss + cfg.eopd_alpha * fkl
    dt = inputs.lp_old.dtype
    m.update({
        "loss/fkl_topk": ((cfg.eopd_alpha * fkl).detach(), mask),
        "eopd_gate_frac": (gate.to(dt), mask),
        "fkl_topk_gated": (fkl.detach(), gate),  # mean FKL_k on gated tokens
    })
    return loss, {**m, **entropy_metrics(inputs, mask)}


def eopd_requirements(cfg: ObjectiveConfig) -> Requirements:
    return Requirements(teacher_topk=cfg.eopd_topk, student_at_teacher_topk=True, teacher_entropy=True)
