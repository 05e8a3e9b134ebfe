"""Full-vocabulary forward / reverse KL and JSD (GKD-style), computed shard-wise by megatron_tropd.ops."""
from __future__ import annotations

import torch

from .common import TermMetrics, entropy_metrics, safe
from .config import ObjectiveConfig
from .inputs import Requirements, TokenInputs


def full_vocab(inputs: TokenInputs, cfg: ObjectiveConfig) -> tuple[torch.Tensor, TermMetrics]:
    """L_t = D(pi_T, pi_S)(t) over the whole (real) vocabulary, `inputs.full_kl` [b, s]:

        forward: sum_v pi_T,v (log pi_T,v - log pi_S,v)     reverse: sum_v pi_S,v (log pi_S,v - log pi_T,v)
        jsd:     beta KL(pi_T || m) + (1 - beta) KL(pi_S || m),  m = beta pi_T + (1 - beta) pi_S
    computed and differentiated by ops.kl_divergence (kind = full_vocab_kind, beta = jsd_beta); this term only
    masks and aggregates it. Differentiated directly (the gradient is the full-vocabulary one).
    """
    mask = inputs.on_policy_mask & torch.isfinite(inputs.full_kl.detach())
    loss = safe(inputs.full_kl, mask)
    m: TermMetrics = {f"loss/full_{cfg.full_vocab_kind}": (loss.detach(), inputs.on_policy_mask),
                      "full_vocab_nonfinite_frac": ((inputs.on_policy_mask & ~mask).to(loss.dtype),
                                                    inputs.on_policy_mask)}
    return loss, {**m, **entropy_metrics(inputs, inputs.on_policy_mask)}


def full_vocab_requirements(cfg: ObjectiveConfig) -> Requirements:
    return Requirements(full_vocab_kl=cfg.full_vocab_kind, full_vocab_beta=cfg.jsd_beta)


def compute_full_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, cfg: ObjectiveConfig,
                    tp_group=None, *, temperature: float = 1.0, vocab_size: int | None = None) -> torch.Tensor:
    """Per-token full-vocabulary divergence for `full_vocab` via ops.kl_divergence (vocab-sharded logits)."""
    from megatron_tropd import ops  # written alongside; imported lazily so objectives do not depend on it

    return ops.kl_divergence(student_logits, teacher_logits, tp_group, kind=cfg.full_vocab_kind,
                             beta=cfg.jsd_beta, temperature=temperature, vocab_size=vocab_size)
