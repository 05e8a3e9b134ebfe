"""Standalone top-k forward KL on the student's own samples (TrOPD paper, Table 1: the baseline that collapses)."""
from __future__ import annotations

import torch

from .common import TermMetrics, entropy_metrics, select_topk, topk_forward_kl
from .config import ObjectiveConfig
from .inputs import Requirements, TokenInputs


def topk_fkl(inputs: TokenInputs, cfg: ObjectiveConfig) -> tuple[torch.Tensor, TermMetrics]:
    """Top-k forward KL on every on-policy token, nothing else:

        L_t = sum_{v in TopK_T} q_v (log q_v - sk_lp_v)     (k = topk = 64)
        q = pi_T on its top-k (renormalize=False, the paper's TrOPD outlier term) or renormalised over it.

    TrOPD's outlier term with the trust region forced empty; differentiated directly w.r.t. the student's
    log-probs at the teacher's top-k (no policy gradient, no reward). The paper reports that this objective
    alone collapses: it ignores the sampled token, so nothing pulls the student's own mass off tokens outside
    the teacher's top-k.
    """
    mask = inputs.on_policy_mask
    tk_lp, sk_lp = select_topk(inputs.tk_lp, inputs.sk_lp, cfg.topk)
    loss = topk_forward_kl(tk_lp, sk_lp, mask, cfg.renormalize)
    return loss, {"loss/fkl_topk": (loss.detach(), mask), **entropy_metrics(inputs, mask)}


def topk_fkl_requirements(cfg: ObjectiveConfig) -> Requirements:
    return Requirements(teacher_topk=cfg.topk, student_at_teacher_topk=True)
