"""TrOPD off-policy guidance at rollout time: the teacher writes a prefix of length l, the student continues.

Per prompt i and rollout j with l = prefix_lengths[i][j]:
- l == 0: a plain on-policy student sample;
- l > 0: the teacher samples up to l response tokens (at the rollout temperature, top-p and stop ids); the student
  continues from prompt + prefix (the prefix counts towards max_new_tokens). `Sample.prefix_len` = len(prefix).
- a prefix that ends at a stop id (EOS) is kept whole (it may be shorter than l) and the sample is teacher-only:
  no student tokens, `meta["teacher_only"] = True`; likewise when the prefix fills max_new_tokens.
The lengths come from `megatron_tropd.objectives.prefix_schedule.sample_prefix_lengths` (see `plan_prefix_lengths`).

Seeding: sample j of prompt i is seeded by (params.seed, request_ids[i], j) in the student engine and by
(params.seed + TEACHER_SEED_SALT, request_ids[i], j) in the teacher engine; the trainer must make request ids
unique per step (e.g. step * prompts_per_step + i) so steps do not reuse random streams.
"""
from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Callable, Sequence

from megatron_tropd.rollout.base import GenerationRequest, RolloutEngine, Sample, SamplingParams

TEACHER_SEED_SALT = 0x7EAC4E5  # teacher prefixes use a random stream distinct from the student's


def _ids(prompt) -> tuple[int, ...]:
    return tuple(prompt.token_ids if hasattr(prompt, "token_ids") else prompt)


def plan_prefix_lengths(prompt_ids: Sequence[int], n_rollouts: int, step: int, opts) -> list[list[int]]:
    """Prefix lengths per prompt from the objectives' schedule (opts: objectives.prefix_schedule.PrefixOptions)."""
    from megatron_tropd.objectives.prefix_schedule import sample_prefix_lengths

    return [sample_prefix_lengths(int(pid), n_rollouts, step, opts) for pid in prompt_ids]


def generate_with_prefixes(student: RolloutEngine, teacher: RolloutEngine | None, prompts: Sequence,
                           prefix_lengths: list[list[int]], params: SamplingParams,
                           request_ids: Sequence[int] | None = None,
                           on_sample: Callable[[Sample], None] | None = None) -> list[list[Sample]]:
    """One list of samples per prompt (len(prefix_lengths[i]) rollouts, in order).

    prompts: `Prompt` objects (their `.token_ids`) or token-id sequences. request_ids: per prompt, default 0..n-1.
    on_sample: called with every final sample as soon as it is complete (teacher-only ones right after the teacher
    pass; student ones as the engine finishes them when it can report that, else after its `generate`), e.g. to
    start scoring them while others still generate.
    """
    if len(prefix_lengths) != len(prompts):
        raise ValueError(f"prefix_lengths has {len(prefix_lengths)} entries for {len(prompts)} prompts")
    rids = list(range(len(prompts))) if request_ids is None else [int(r) for r in request_ids]
    if len(rids) != len(prompts):
        raise ValueError(f"request_ids has {len(rids)} entries for {len(prompts)} prompts")
    if any(l < 0 for ls in prefix_lengths for l in ls):
        raise ValueError("prefix lengths must be >= 0 (0 = on-policy)")
    needs_teacher = any(l > 0 for ls in prefix_lengths for l in ls)
    if needs_teacher and teacher is None:
        raise ValueError("prefix lengths > 0 need a teacher engine")

    # 1) Teacher prefixes, one n=1 request per prefixed rollout, each capped at its own length.
    t_keys, t_reqs = [], []
    for i, ls in enumerate(prefix_lengths):
        for j, l in enumerate(ls):
            if l > 0:
                t_keys.append((i, j))
                t_reqs.append(GenerationRequest(prompt_ids=_ids(prompts[i]), n=1, request_id=rids[i],
                                                first_sample_index=j, max_new_tokens=min(l, params.max_new_tokens)))
    prefixes: dict[tuple[int, int], Sample] = {}
    if t_reqs:
        t_params = replace(params, seed=params.seed + TEACHER_SEED_SALT)
        for key, (s,) in zip(t_keys, teacher.generate(t_reqs, t_params)):
            prefixes[key] = s

    # 2) Student: on-policy rollouts and continuations in one call; teacher-only samples need no student.
    out: list[list[Sample | None]] = [[None] * len(ls) for ls in prefix_lengths]
    s_keys, s_reqs = [], []
    for i, ls in enumerate(prefix_lengths):
        for j, l in enumerate(ls):
            pre = prefixes.get((i, j))
            if pre is not None and (pre.finish_reason == "stop" or len(pre.response_ids) >= params.max_new_tokens):
                out[i][j] = Sample(prompt_ids=list(_ids(prompts[i])), response_ids=list(pre.response_ids), logprobs=[],
                                   finish_reason=pre.finish_reason, weight_version=student.weight_version,
                                   prefix_len=len(pre.response_ids), request_id=rids[i],
                                   meta={"sample_index": j, "teacher_only": True,
                                         "prefix_logprobs": list(pre.logprobs),
                                         "teacher_weight_version": pre.weight_version})
                if on_sample is not None:
                    on_sample(out[i][j])
                continue
            s_keys.append((i, j))
            s_reqs.append(GenerationRequest(prompt_ids=_ids(prompts[i]), n=1, request_id=rids[i], first_sample_index=j,
                                            prefix_ids=tuple(pre.response_ids) if pre is not None else ()))
    if s_reqs:
        reports = on_sample is not None and "on_sample" in inspect.signature(student.generate).parameters
        generated = student.generate(s_reqs, params, on_sample=on_sample) if reports else \
            student.generate(s_reqs, params)
        for (i, j), (s,) in zip(s_keys, generated):
            pre = prefixes.get((i, j))
            s.meta.update(teacher_only=False, sample_index=j)
            if pre is not None:
                s.meta.update(prefix_logprobs=list(pre.logprobs), teacher_weight_version=pre.weight_version)
            out[i][j] = s
            if on_sample is not None and not reports:
                on_sample(s)
    return out  # type: ignore[return-value]
