"""Offline distillation: a dense divergence on rollouts the teacher wrote (supervised KD, GKD-style mixing).

On the tokens of a teacher-written rollout (`TokenInputs.offline_mask`) the loss is the full-vocabulary divergence
between teacher and student at that position, whatever the run's on-policy objective:

    forward (default): KL(pi_T || pi_S) = sum_v pi_T,v (log pi_T,v - log pi_S,v)   (supervised KD; GKD lambda = 0)
    reverse:           KL(pi_S || pi_T) = sum_v pi_S,v (log pi_S,v - log pi_T,v)
    jsd:               beta KL(pi_T || m) + (1 - beta) KL(pi_S || m),  m = beta pi_T + (1 - beta) pi_S

computed on the vocabulary shards by ops.kl_divergence from both models' full logits (exact, not top-k) and
differentiated directly. The on-policy objective covers the student's own tokens only (`on_policy_mask` excludes
offline tokens); both share the token-mean denominator (every non-prefix response token of the step), so a mixed
batch is the token mean of the divergence on teacher text and the objective on student text, as in GKD.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import TermMetrics, safe
from .config import FULL_VOCAB_KINDS
from .inputs import TokenInputs


@dataclass(frozen=True)
class OfflineTerm:
    divergence: str = "forward"  # "forward" | "reverse" | "jsd" (ops.kl_divergence kinds)
    jsd_beta: float = 0.5  # m = beta * pi_T + (1 - beta) * pi_S for "jsd", in (0, 1)

    def __post_init__(self) -> None:
        if self.divergence not in FULL_VOCAB_KINDS:
            raise ValueError(f"unknown offline divergence {self.divergence!r}; valid: {', '.join(FULL_VOCAB_KINDS)}")
        if self.divergence == "jsd" and not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"offline jsd_beta must be in (0, 1), got {self.jsd_beta}")


def offline_term(inputs: TokenInputs, term: OfflineTerm) -> tuple[torch.Tensor, TermMetrics]:
    """L_t = D(pi_T, pi_S)(t) on `inputs.offline_mask` (0 elsewhere) from `inputs.offline_kl` [b, s].

    A batch without teacher-written tokens may leave `offline_kl` None (the step skips the teacher's logits);
    the metrics are still reported, with zero counts, so every rank reports the same names.
    """
    dt = inputs.lp_old.dtype
    mask = inputs.offline_mask & inputs.response_mask if inputs.offline_mask is not None \
        else torch.zeros_like(inputs.response_mask)
    if inputs.offline_kl is None:
        if mask.any():
            raise ValueError("TokenInputs.offline_kl is None but the batch has teacher-written tokens "
                             "(offline_mask); the step must compute it with ops.kl_divergence")
        loss, finite = torch.zeros_like(inputs.lp_s), mask
    else:
        finite = mask & torch.isfinite(inputs.offline_kl.detach())
        loss = safe(inputs.offline_kl, finite)
    nll = -safe(inputs.lp_s.detach(), mask)
    return loss, {
        f"loss/offline_{term.divergence}": (loss.detach(), mask),  # mean divergence on teacher-written tokens
        "offline/student_nll": (nll, mask),  # student NLL of the teacher's tokens (cross-entropy on its samples)
        "offline/token_frac": (mask.to(dt), inputs.response_mask),  # share of response tokens the teacher wrote
        "offline/nonfinite_frac": ((mask & ~finite).to(dt), mask),
    }
