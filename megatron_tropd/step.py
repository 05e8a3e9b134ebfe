"""One distillation step on this data-parallel rank's share of a rollout batch.

    teacher scoring (forward only)  ->  student old log-probs (forward only)  ->  global token counts
    ->  for each epoch, minibatch: forward-backward with the objective as the loss  ->  optimizer step

The objective sees per-token tensors computed on vocabulary shards (`megatron_tropd.ops`); its loss carries the
global normalisation (one all-reduce of token counts per optimizer step), so gradients do not depend on the
micro-batch or data-parallel split. Metrics are reduced over micro-batches and DP ranks with one all-reduce.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_tropd import ops
from megatron_tropd.batch import RolloutBatch
from megatron_tropd.objectives import (
    Objective, TokenInputs, entropy_threshold, global_counts, reduce_metrics, token_weights,
)
from megatron_tropd.parallel import ParallelGroups
from megatron_tropd.pipeline import broadcast_from_last_stage, position_ids, run_schedule
from megatron_tropd.roles import Student, Teacher
from megatron_tropd.scoring import score_student_old, score_teacher, tp_group


@dataclass(frozen=True)
class StepOptions:
    temperature: float  # rollout temperature: every log-prob is taken at it
    vocab_size: int  # real vocabulary (padding rows excluded)
    micro_batch_size: int
    updates_per_batch: int = 1
    minibatches_per_update: int = 1


def distill_step(student: Student, teacher: Teacher, batch: RolloutBatch, objective: Objective,
                 groups: ParallelGroups, step: int, opts: StepOptions) -> dict[str, float]:
    """Train on `batch` (this DP rank's sequences). Returns step metrics on every rank."""
    req = objective.requirements
    if req.full_vocab_kl is not None and groups.pp_size > 1:
        raise ValueError("full-vocabulary objectives co-schedule the teacher inside the student's micro-batch and "
                         "support pipeline_model_parallel_size = 1 only; use tensor parallelism instead")
    device = groups.device
    micro = [mb.to(device) for mb in batch.micro_batches(opts.micro_batch_size)]
    kw = dict(temperature=opts.temperature, vocab_size=opts.vocab_size)
    teacher_out = score_teacher(teacher.model, micro, groups, req, **kw)
    old_out = score_student_old(student.model, micro, groups, req, with_entropy=True, **kw)

    threshold = None
    if req.entropy_threshold is not None and groups.is_last_stage:
        key, source = ("ent_s", old_out) if req.entropy_threshold == "student" else ("ent_t", teacher_out)
        threshold = entropy_threshold([o[key] for o in source], [mb.response_mask & ~mb.prefix_mask for mb in micro],
                                      req.entropy_frac, groups.dp)

    if len(micro) % opts.minibatches_per_update:
        raise ValueError(f"{len(micro)} micro-batches per rank cannot be split into "
                         f"optim.minibatches_per_update={opts.minibatches_per_update} minibatches")
    per_mini = len(micro) // opts.minibatches_per_update
    all_metrics, grad_norms, skipped = [], [], 0
    for _ in range(opts.updates_per_batch):
        for m in range(opts.minibatches_per_update):
            idx = list(range(m * per_mini, (m + 1) * per_mini))
            counts = global_counts([(micro[i].response_mask, micro[i].prefix_mask) for i in idx], groups.dp, device)
            results = _update(student, teacher, [micro[i] for i in idx], [teacher_out[i] for i in idx] if
                              teacher_out else [], [old_out[i] for i in idx] if old_out else [], objective, groups,
                              step, counts, threshold, opts)
            all_metrics.extend(r["metrics"] for r in results)
            ok, grad_norm, _ = student.optimizer.step()
            student.scheduler.step(increment=1)
            skipped += int(not ok)
            grad_norms.append(float(grad_norm) if grad_norm is not None else float("nan"))

    metrics = None
    if groups.is_last_stage:
        metrics = reduce_metrics(all_metrics, groups.dp, device)
        metrics.update(_batch_metrics(micro, groups, device))
    metrics = broadcast_from_last_stage(metrics, groups)
    metrics["grad_norm"] = grad_norms[-1]
    metrics["lr"] = student.optimizer.param_groups[0]["lr"]
    metrics["skipped_updates"] = float(skipped)
    return metrics


def _update(student: Student, teacher: Teacher, micro: list[RolloutBatch], teacher_out: list[dict],
            old_out: list[dict], objective: Objective, groups: ParallelGroups, step: int, counts, threshold,
            opts: StepOptions) -> list[dict]:
    req, cfg = objective.requirements, objective.cfg
    tp = tp_group(groups)
    kw = dict(temperature=opts.temperature, vocab_size=opts.vocab_size)

    def on_logits(logits, i):
        mb, t, o = micro[i], teacher_out[i], old_out[i]
        lp_s = ops.token_logprobs(logits, mb.targets, tp, **kw)
        sk_lp = ops.logprobs_at(logits, t["tk_ids"], tp, **kw) if req.student_at_teacher_topk else None
        full_kl = None
        if req.full_vocab_kl is not None:
            with torch.no_grad():
                t_logits = teacher.model(mb.inputs, position_ids(mb.inputs), None)
            full_kl = ops.kl_divergence(logits, t_logits, tp, kind=req.full_vocab_kl, beta=req.full_vocab_beta, **kw)
            del t_logits
        inputs = TokenInputs(
            lp_s=lp_s, lp_old=o["lp_old"], lp_t=t["lp_t"], response_mask=mb.response_mask,
            prefix_mask=mb.prefix_mask, sample_ids=mb.sample_ids, positions=mb.positions, step=step,
            lp_roll=mb.lp_roll if req.rollout_logprobs else None, tk_lp=t.get("tk_lp"), tk_ids=t.get("tk_ids"),
            sk_lp=sk_lp, ent_t=t.get("ent_t"), ent_s=o.get("ent_s"), full_kl=full_kl, entropy_threshold=threshold,
        )
        weights = token_weights(mb.response_mask, mb.prefix_mask, counts, cfg.aggregation)
        loss, metrics = objective(inputs, weights)
        # The total loss of this update = sum over micro-batches and DP ranks; count it once (rank 0, first mb).
        once = float(i == 0 and groups.dp_rank == 0)
        metrics["loss"] = (loss.detach().double(), torch.tensor(once, dtype=torch.float64))
        return loss, {"metrics": metrics}

    student.model.zero_grad_buffer()
    student.optimizer.zero_grad()
    return run_schedule(student.model, micro, groups, on_logits, forward_only=False)


def _batch_metrics(micro: list[RolloutBatch], groups: ParallelGroups, device) -> dict:
    """Response / prefix lengths per sequence, reduced over DP like the objective metrics."""
    per_mb = []
    for mb in micro:
        seqs = torch.ones(mb.size, dtype=torch.float64, device=mb.tokens.device)
        m = {
            "response_length": (mb.response_mask.sum().double(), seqs.sum()),
            "prefix_length": (mb.prefix_mask.sum().double(), seqs.sum()),
            "prefixed_fraction": (mb.prefix_mask.any(-1).sum().double(), seqs.sum()),
        }
        per_mb.append(m)
    return reduce_metrics(per_mb, groups.dp, device)
