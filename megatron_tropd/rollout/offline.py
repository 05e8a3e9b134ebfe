"""Offline distillation and GKD-style mixing at rollout time: which rollouts of a step the teacher writes.

    lam(step) = 0                 for step < warmup_steps       (offline warm-up: teacher-written rollouts only)
              = lambda_student    afterwards                    (GKD's lmbda: the student's share of rollouts)

A step of P prompts x n rollouts gets round-half-up(lam * P * n) student rollouts, spread over the prompts as
evenly as possible (the first prompts take one more when it does not divide); the rest of each prompt's rollouts
are teacher-written: sampled by the teacher engine from the prompt alone (no prefix), at the rollout
temperature / top-p / stop ids, seeded by (seed + OFFLINE_SEED_SALT, request id, sample index).
Within a prompt the student rollouts come first (indices 0 .. n_s - 1, with TrOPD's teacher prefixes planned
over them by the guidance schedule, which runs over the steps after the warm-up) and the teacher's follow
(indices n_s .. n - 1), so sample ids stay rid * n + j.

A teacher-written sample is marked `meta["offline"] = True` (training/batch.py turns it into `offline_mask`;
the objective applies its dense divergence there, objectives/offline.py). It carries the student engine's weight
version (it is not stale whatever the teacher's version; that one is kept in `meta["teacher_weight_version"]`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from megatron_tropd.rollout.base import GenerationRequest, RolloutEngine, Sample, SamplingParams
from megatron_tropd.rollout.prefixes import generate_with_prefixes

OFFLINE_SEED_SALT = 0x0FF1E  # teacher-written rollouts use a random stream of their own


@dataclass(frozen=True)
class MixOptions:
    warmup_steps: int = 0  # steps with teacher-written rollouts only
    lambda_student: float = 1.0  # after the warm-up: the student's share of each step's rollouts, in [0, 1]

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.lambda_student <= 1.0:
            raise ValueError(f"lambda_student must be in [0, 1], got {self.lambda_student}")

    @property
    def uses_teacher(self) -> bool:
        """True when some step has teacher-written rollouts (a teacher engine is needed)."""
        return self.warmup_steps > 0 or self.lambda_student < 1.0

    def student_fraction(self, step: int) -> float:
        return 0.0 if step < self.warmup_steps else self.lambda_student

    def guidance_step(self, step: int) -> int:
        """The step of the teacher-prefix schedule: it starts when the warm-up ends."""
        return max(0, step - self.warmup_steps)


def _prompt_ids(prompt) -> tuple[int, ...]:
    return tuple(prompt.token_ids if hasattr(prompt, "token_ids") else prompt)


def student_counts(n_prompts: int, n_rollouts: int, fraction: float) -> list[int]:
    """Student rollouts per prompt: round-half-up(fraction * P * n) in all, spread evenly (first prompts +1)."""
    total = n_prompts * n_rollouts
    n_student = min(total, int(math.floor(fraction * total + 0.5)))
    base, extra = divmod(n_student, n_prompts) if n_prompts else (0, 0)
    return [base + (1 if i < extra else 0) for i in range(n_prompts)]


def generate_teacher_samples(teacher: RolloutEngine, prompts: Sequence, counts: Sequence[int],
                             first_index: Sequence[int], params: SamplingParams, request_ids: Sequence[int],
                             weight_version: int) -> list[list[Sample]]:
    """counts[i] teacher-written rollouts of prompt i, numbered first_index[i] .. (one request per prompt)."""
    keys = [i for i, c in enumerate(counts) if c > 0]
    out: list[list[Sample]] = [[] for _ in prompts]
    if not keys:
        return out
    if teacher is None:
        raise ValueError("teacher-written (offline) rollouts need a teacher rollout engine")
    reqs = [GenerationRequest(prompt_ids=_prompt_ids(prompts[i]), n=counts[i], request_id=int(request_ids[i]),
                              first_sample_index=int(first_index[i])) for i in keys]
    for i, group in zip(keys, teacher.generate(reqs, replace(params, seed=params.seed + OFFLINE_SEED_SALT))):
        for j, s in enumerate(group):
            s.meta.update(offline=True, teacher_only=True, sample_index=first_index[i] + j,
                          teacher_weight_version=s.weight_version)
            s.weight_version = weight_version
        out[i] = list(group)
    return out


def generate_mixed(student: RolloutEngine, teacher: RolloutEngine | None, prompts: Sequence,
                   prefix_lengths: list[list[int]], teacher_counts: Sequence[int], params: SamplingParams,
                   request_ids: Sequence[int], on_sample: Callable[[Sample], None] | None = None
                   ) -> list[list[Sample]]:
    """Per prompt: len(prefix_lengths[i]) student rollouts (with teacher prefixes where l > 0,
    rollout/prefixes.py), then teacher_counts[i] teacher-written ones. on_sample: called with each final
    sample once it is complete (generate_with_prefixes), e.g. `SGLangTeacherScorer.prefetch`."""
    if len(teacher_counts) != len(prompts):
        raise ValueError(f"teacher_counts has {len(teacher_counts)} entries for {len(prompts)} prompts")
    own = generate_with_prefixes(student, teacher, prompts, prefix_lengths, params, request_ids=request_ids,
                                 on_sample=on_sample)
    written = generate_teacher_samples(teacher, prompts, teacher_counts, [len(ls) for ls in prefix_lengths],
                                       params, request_ids, student.weight_version)
    if on_sample is not None:
        for s in (s for group in written for s in group):
            on_sample(s)
    return [a + b for a, b in zip(own, written)]


def plan_rollouts(prompt_ids: Sequence[int], n_rollouts: int, step: int, prefix_opts, mix: MixOptions
                  ) -> tuple[list[list[int]], list[int]]:
    """(prefix lengths of each prompt's student rollouts, teacher-written rollouts per prompt) for this step.

    `prefix_opts` (objectives.PrefixOptions) has total_steps = the run's steps; the schedule is shifted to start
    after the warm-up. Without offline rollouts this is exactly `plan_prefix_lengths` (rollout/prefixes.py)."""
    from megatron_tropd.objectives.prefix_schedule import sample_prefix_lengths

    counts = student_counts(len(prompt_ids), n_rollouts, mix.student_fraction(step))
    # the cosine prefix schedule spans the on-policy steps: step - warmup of (total - warmup)
    opts = replace(prefix_opts, total_steps=max(1, prefix_opts.total_steps - mix.warmup_steps))
    g = mix.guidance_step(step)
    lengths = [sample_prefix_lengths(int(pid), c, g, opts) for pid, c in zip(prompt_ids, counts)]
    return lengths, [n_rollouts - c for c in counts]
