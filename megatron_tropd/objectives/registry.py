"""Objectives by name, and the callable the training step uses.

    objective = build_objective(cfg)
    objective.requirements                      # what the teacher / student passes must compute
    loss, metrics = objective(inputs, weights)  # loss = sum(weights * per_token), metrics name -> (sum, count)

Every objective adds the off-policy prefix term on teacher-prefix tokens:  L_t = prefix_beta * (-lp_s)
(K1 forward KL on teacher samples, beta = 1e-3); the objective's own term covers the on-policy tokens.
`build_objective(cfg, offline=OfflineTerm(...))` adds the offline term on teacher-written rollouts
(objectives/offline.py: a dense full-vocabulary divergence).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from .aggregation import Metrics
from .common import TermMetrics, safe
from .config import ObjectiveConfig
from .eopd import eopd, eopd_requirements
from .full_vocab import full_vocab, full_vocab_requirements
from .inputs import Requirements, TokenInputs
from .jsd import jsd, jsd_requirements
from .offline import OfflineTerm, offline_term
from .opd import entropy_opd, entropy_opd_requirements, opd, opd_requirements
from .reopold import reopold, reopold_requirements
from .topk_fkl import topk_fkl, topk_fkl_requirements
from .tropd import tropd, tropd_requirements

TermFn = Callable[[TokenInputs, ObjectiveConfig], tuple[torch.Tensor, TermMetrics]]

OBJECTIVES: dict[str, tuple[TermFn, Callable[[ObjectiveConfig], Requirements]]] = {
    "opd": (opd, opd_requirements),
    "reopold": (reopold, reopold_requirements),
    "eopd": (eopd, eopd_requirements),
    "entropy_opd": (entropy_opd, entropy_opd_requirements),
    "jsd": (jsd, jsd_requirements),
    "tropd": (tropd, tropd_requirements),
    "full_vocab": (full_vocab, full_vocab_requirements),
    "topk_fkl": (topk_fkl, topk_fkl_requirements),
}


def prefix_term(lp_s: torch.Tensor, prefix_mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, TermMetrics]:
    """Off-policy guidance on teacher-prefix tokens: L_t = beta * (-lp_s)  (K1 forward KL on teacher samples)."""
    nll = -safe(lp_s, prefix_mask)
    return beta * nll, {"loss/prefix": ((beta * nll).detach(), prefix_mask), "prefix_nll": (nll.detach(), prefix_mask)}


def per_token_loss(inputs: TokenInputs, cfg: ObjectiveConfig, offline: OfflineTerm | None = None
                   ) -> tuple[torch.Tensor, TermMetrics]:
    """The objective's per-token loss [b, s] (on-policy term + prefix term + offline term when configured, 0
    elsewhere) and per-token metrics."""
    fn, _ = OBJECTIVES[cfg.name]
    loss, metrics = fn(inputs, cfg)
    pre_loss, pre_metrics = prefix_term(inputs.lp_s, inputs.prefix_mask & inputs.response_mask, cfg.prefix_beta)
    if offline is not None:
        off_loss, off_metrics = offline_term(inputs, offline)
        loss, metrics = loss + off_loss, {**metrics, **off_metrics}
    dt = inputs.lp_old.dtype
    metrics = {**metrics, **pre_metrics,
               "prefix_frac": (inputs.prefix_mask.to(dt), inputs.response_mask),
               "response_tokens": (inputs.response_mask.sum(-1).to(dt), inputs.response_mask.any(-1)),
               "prefix_tokens": (inputs.prefix_mask.sum(-1).to(dt), inputs.prefix_mask.any(-1))}
    return loss + pre_loss, metrics


def summarize(metrics: TermMetrics) -> Metrics:
    """Per-token (values, mask) -> (sum over mask, count), float64 detached, for `reduce_metrics`."""
    out: Metrics = {}
    for k, (v, m) in metrics.items():
        m = m.to(torch.bool)
        out[k] = (safe(v.detach().to(torch.float64), m).sum(), m.sum().to(torch.float64))
    return out


@dataclass(frozen=True)
class Objective:
    """A configured objective: `loss, metrics = objective(inputs, weights)`."""

    cfg: ObjectiveConfig
    requirements: Requirements
    offline: OfflineTerm | None = None  # the dense divergence on teacher-written rollouts, when the run has them

    def __call__(self, inputs: TokenInputs, weights: torch.Tensor,
                 row_groups: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, Metrics]:
        """loss = sum(weights * per_token) (a scalar; summed over micro-batches and DP ranks = global mean).

        `weights` [b, s] from aggregation.token_weights. metrics: name -> (value sum, token count) to be summed
        over micro-batches and DP ranks and divided at the end (aggregation.reduce_metrics). Per-sequence
        metrics (response_tokens, prefix_tokens) count sequences. `row_groups`: name -> [b] bool rows; each metric
        is also reported over those rows only, as `<name>/<metric>` (per-teacher metrics: `teacher/<name>/...`).
        """
        inputs.validate(self.requirements)
        if tuple(weights.shape) != tuple(inputs.lp_s.shape):
            raise ValueError(f"weights must be [b, s] = {tuple(inputs.lp_s.shape)}, got {tuple(weights.shape)}")
        per_token, metrics = per_token_loss(inputs, self.cfg, self.offline)
        w = safe(weights.detach().to(per_token.dtype), inputs.response_mask)
        loss = (w * per_token).sum()
        out = summarize(metrics)
        for group, rows in (row_groups or {}).items():
            out.update(summarize({f"{group}/{k}": (v, m & rows.view(-1, *[1] * (m.dim() - 1)))
                                  for k, (v, m) in metrics.items()}))
        return loss, out


def build_objective(cfg: ObjectiveConfig | dict | str, offline: OfflineTerm | None = None) -> Objective:
    """Objective from a config (or a mapping / a bare name with the defaults); `offline` adds the dense divergence
    on teacher-written rollouts (and asks the step for it: Requirements.offline_kl)."""
    if isinstance(cfg, str):
        cfg = ObjectiveConfig(name=cfg)
    elif not isinstance(cfg, ObjectiveConfig):
        cfg = ObjectiveConfig.from_dict(cfg)
    _, req = OBJECTIVES[cfg.name]
    requirements = req(cfg)
    if offline is not None:
        requirements = replace(requirements, offline_kl=offline.divergence, offline_beta=offline.jsd_beta)
    return Objective(cfg, requirements, offline)
