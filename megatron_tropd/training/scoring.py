"""Forward-only per-token passes on vocabulary shards: the teacher's scores and the student's old log-probs.

Each pass runs megatron's (pipelined) schedule without gradients and, on the last stage, keeps only the small
tensors an objective declares (`Requirements`), per micro-batch and aligned with `RolloutBatch.targets`:

    TeacherTokens: lp_t [b, s]; tk_lp / tk_ids [b, s, k] and ent_t [b, s] when asked
    StudentTokens: lp_old [b, s]; ent_s [b, s] when asked

all at the rollout temperature over the real vocabulary. Full logits never outlive a micro-batch, and they are
computed only from each micro-batch's first response position on (`schedule.logits_start`); the positions before
it (prompt tokens) hold 0 in these tensors and are masked out of every loss and metric.

The step talks to the teacher only through `TeacherScorer.score`; `MegatronTeacherScorer` (a frozen megatron
teacher in the student's TP/PP layout) is its first implementation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from megatron_tropd import ops
from megatron_tropd.distributed.parallel import ParallelGroups
from megatron_tropd.objectives import Requirements
from megatron_tropd.training import packing
from megatron_tropd.training.batch import RolloutBatch
from megatron_tropd.training.roles import Teacher
from megatron_tropd.training.schedule import crop_positions, model_forward, run_schedule, uncrop_positions


@dataclass
class TeacherTokens:
    """The teacher's per-token statistics of one micro-batch (position t scores target t)."""

    lp_t: torch.Tensor  # [b, s] float32: log pi_T(target) at the rollout temperature
    tk_lp: torch.Tensor | None = None  # [b, s, k] teacher top-k log-probs (real vocabulary only)
    tk_ids: torch.Tensor | None = None  # [b, s, k] int64 their token ids
    ent_t: torch.Tensor | None = None  # [b, s] teacher entropy over the full vocabulary

    def crop(self, start: int) -> "TeacherTokens":
        """Positions >= start only (aligned with logits of `schedule.logits_start` = start)."""
        return TeacherTokens(*(None if x is None else crop_positions(x, start)
                               for x in (self.lp_t, self.tk_lp, self.tk_ids, self.ent_t)))

    def uncrop(self, start: int) -> "TeacherTokens":
        """From logits of positions >= start to the micro-batch's [b, s] (0 / id 0 before `start`)."""
        return TeacherTokens(*(None if x is None else uncrop_positions(x, start)
                               for x in (self.lp_t, self.tk_lp, self.tk_ids, self.ent_t)))


@dataclass
class StudentTokens:
    """The student's per-token statistics at the weights of the start of the step."""

    lp_old: torch.Tensor  # [b, s] float32
    ent_s: torch.Tensor | None = None  # [b, s] student entropy over the full vocabulary

    def crop(self, start: int) -> "StudentTokens":
        return StudentTokens(*(None if x is None else crop_positions(x, start) for x in (self.lp_old, self.ent_s)))

    def uncrop(self, start: int) -> "StudentTokens":
        return StudentTokens(*(None if x is None else uncrop_positions(x, start) for x in (self.lp_old, self.ent_s)))


@dataclass(frozen=True)
class ScoreOptions:
    temperature: float  # every log-prob is taken at it (the rollout temperature)
    vocab_size: int  # the real vocabulary: padding rows are excluded
    crop_logits: bool = True  # logits only from each micro-batch's first response position on (schedule.logits_start)
    pack_sequences: bool = False  # run each micro-batch's sequences packed into fewer rows (training/packing.py; PP 1)


class TeacherScorer(Protocol):
    def score(self, micro_batches: list[RolloutBatch], req: Requirements) -> list[TeacherTokens]:
        """One TeacherTokens per micro-batch on the student's last pipeline stage; [] on the other stages."""


def tp_group(groups: ParallelGroups):
    return groups.tp if groups.tp_size > 1 else None


@torch.no_grad()
def teacher_tokens(logits: torch.Tensor, targets: torch.Tensor, req: Requirements, tp, *, temperature: float,
                   vocab_size: int) -> TeacherTokens:
    """The TeacherTokens `req` asks for from one micro-batch's teacher logits shard [b, s, V_padded/tp] (also used
    by the step when it already holds the teacher's logits, so the teacher runs once per micro-batch)."""
    kw = dict(temperature=temperature, vocab_size=vocab_size)
    out = TeacherTokens(lp_t=ops.token_logprobs(logits, targets.to(logits.device), tp, **kw))
    if req.teacher_topk:
        out.tk_lp, out.tk_ids = ops.topk_logprobs(logits, req.teacher_topk, tp, **kw)
    if req.teacher_entropy or req.entropy_threshold == "teacher":
        out.ent_t = ops.entropy(logits, tp, **kw)
    return out


class MegatronTeacherScorer:
    """A frozen megatron teacher in the student's TP/PP layout: its vocabulary shards coincide with the student's,
    so it can also hand full logits shards to full-vocabulary objectives (`forward_logits`)."""

    def __init__(self, teacher: Teacher, groups: ParallelGroups, opts: ScoreOptions):
        self.teacher, self.groups, self.opts = teacher, groups, opts

    @torch.no_grad()
    def score(self, micro_batches: list[RolloutBatch], req: Requirements) -> list[TeacherTokens]:
        tp, kw = tp_group(self.groups), dict(temperature=self.opts.temperature, vocab_size=self.opts.vocab_size)

        def on_logits(logits, i):
            targets = micro_batches[i].targets
            start = targets.shape[1] - logits.shape[1]
            t = teacher_tokens(logits, crop_positions(targets, start), req, tp, **kw)
            return logits.new_zeros(()), t.uncrop(start)

        return run_schedule(self.teacher.model, micro_batches, self.groups, on_logits, forward_only=True,
                            crop=self.opts.crop_logits, pack=self.opts.pack_sequences)

    @torch.no_grad()
    def forward_logits(self, inputs: torch.Tensor, start: int = 0,
                       response_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[b, s] input ids -> the teacher's logits shard [b, s - start, V_padded/tp] of positions >= `start`
        (pipeline size 1 only; the caller's `start` is one `schedule.logits_from` honours for this model). With
        ScoreOptions.pack_sequences and the micro-batch's `response_mask` [b, s] its sequences run packed (same
        logits), and the output layer runs only at its response positions (`schedule.logits_from`)."""
        model = self.teacher.model
        plan = where = None
        if response_mask is not None:
            where = response_mask.to(inputs.device)
            if self.opts.pack_sequences:
                packing.check_packable(model)
                plan = packing.plan_for(response_mask)
                plan = plan.to(inputs.device) if plan else None
        applied, logits = model_forward(model, inputs, start, where, plan)
        if applied != start:
            raise ValueError(f"the teacher cannot crop its logits at {start} (sequence parallel?)")
        return logits

    @torch.no_grad()
    def micro_batch_logits(self, micro_batch: RolloutBatch) -> torch.Tensor | None:
        """The teacher's logits shard [b, s - start, V_padded/tp] of one micro-batch (positions from
        `schedule.logits_start` on, as a student's `run_schedule(..., crop=True)` of the same micro-batch; all
        positions with ScoreOptions.crop_logits off) through its own (pipelined) schedule, on the last pipeline
        stage (None elsewhere): any PP size, one micro-batch's logits alive at a time."""
        out = run_schedule(self.teacher.model, [micro_batch], self.groups,
                           lambda logits, i: (logits.new_zeros(()), logits), forward_only=True,
                           crop=self.opts.crop_logits)
        return out[0] if out else None


@torch.no_grad()
def score_student_old(model, micro_batches: list[RolloutBatch], groups: ParallelGroups, req: Requirements,
                      opts: ScoreOptions, with_entropy: bool = False) -> list[StudentTokens]:
    """lp_old (and ent_s when the objective or the metrics need it) with the weights at the start of the step."""
    tp, kw = tp_group(groups), dict(temperature=opts.temperature, vocab_size=opts.vocab_size)

    def on_logits(logits, i):
        targets = micro_batches[i].targets
        start = targets.shape[1] - logits.shape[1]
        out = StudentTokens(lp_old=ops.token_logprobs(logits, crop_positions(targets, start).to(logits.device), tp,
                                                      **kw))
        if with_entropy or req.student_entropy or req.entropy_threshold == "student":
            out.ent_s = ops.entropy(logits, tp, **kw)
        return logits.new_zeros(()), out.uncrop(start)

    return run_schedule(model, micro_batches, groups, on_logits, forward_only=True, crop=opts.crop_logits,
                        pack=opts.pack_sequences)
