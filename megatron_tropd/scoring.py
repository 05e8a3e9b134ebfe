"""Forward-only per-token passes on vocabulary shards: teacher scoring and the student's old log-probs.

Each pass runs megatron's (pipelined) schedule without gradients and, on the last stage, keeps only the small
tensors an objective declares (`Requirements`): per micro-batch
    teacher: lp_t [b, s], and when needed tk_lp / tk_ids [b, s, k], ent_t [b, s]
    student: lp_old [b, s], and when needed ent_s [b, s]
all at the rollout temperature over the real vocabulary. Full logits never outlive a micro-batch.
"""
from __future__ import annotations

import torch

from megatron_tropd import ops
from megatron_tropd.batch import RolloutBatch
from megatron_tropd.objectives import Requirements
from megatron_tropd.parallel import ParallelGroups
from megatron_tropd.pipeline import run_schedule


def tp_group(groups: ParallelGroups):
    return groups.tp if groups.tp_size > 1 else None


@torch.no_grad()
def score_teacher(model, micro_batches: list[RolloutBatch], groups: ParallelGroups, req: Requirements,
                  temperature: float, vocab_size: int) -> list[dict]:
    tp = tp_group(groups)

    def on_logits(logits, i):
        targets = micro_batches[i].targets.to(logits.device)
        kw = dict(temperature=temperature, vocab_size=vocab_size)
        out = {"lp_t": ops.token_logprobs(logits, targets, tp, **kw)}
        if req.teacher_topk:
            out["tk_lp"], out["tk_ids"] = ops.topk_logprobs(logits, req.teacher_topk, tp, **kw)
        if req.teacher_entropy or req.entropy_threshold == "teacher":
            out["ent_t"] = ops.entropy(logits, tp, **kw)
        return logits.new_zeros(()), out

    return run_schedule(model, micro_batches, groups, on_logits, forward_only=True)


@torch.no_grad()
def score_student_old(model, micro_batches: list[RolloutBatch], groups: ParallelGroups, req: Requirements,
                      temperature: float, vocab_size: int, with_entropy: bool = False) -> list[dict]:
    """lp_old (and ent_s when the objective or the metrics need it) with the weights at the start of the step."""
    tp = tp_group(groups)

    def on_logits(logits, i):
        targets = micro_batches[i].targets.to(logits.device)
        kw = dict(temperature=temperature, vocab_size=vocab_size)
        out = {"lp_old": ops.token_logprobs(logits, targets, tp, **kw)}
        if with_entropy or req.student_entropy or req.entropy_threshold == "student":
            out["ent_s"] = ops.entropy(logits, tp, **kw)
        return logits.new_zeros(()), out

    return run_schedule(model, micro_batches, groups, on_logits, forward_only=True)
