"""Held-out distillation metrics during training, exact on vocabulary shards, on the step's data split.

    evaluate = HeldOutEval(prompts, engine, teacher_scorer, student, groups, tokenizer, params, opts, teacher_engine)
    metrics = evaluate(step)      # on every rank (collective); the dict on every rank, None where not computed

Two sample sets of the held-out prompts, generated on global rank 0 and broadcast: the student's own samples
(every evaluation, current weights) and the teacher's samples (drawn once per run and reused: the teacher is
frozen). On each micro-batch both models' logits shards [b, s, V/tp] are computed on the same contexts (teacher
first, through its own schedule; then the student, in whose last stage every metric is taken with megatron_tropd.ops:
no gather of the vocabulary) at the scoring temperature (eval.temperature; greedy decoding is scored at T = 1).
Token means are over response tokens, summed over micro-batches and DP ranks with one all-reduce.

On the student's samples (x ~ pi_S):
- `reverse_kl`: full-vocabulary KL(pi_S || pi_T) per token;  `reverse_kl_k1`: its K1 estimate lp_S(x) - lp_T(x);
- `top1_agreement`: argmax pi_S == argmax pi_T;  `token_agreement`: argmax pi_T == the sampled token;
- `teacher_nll`: -lp_T(x);  `student_entropy`, `teacher_entropy`: H(pi_S), H(pi_T) on the same contexts;
- `distinct_2`, `distinct_3`: repetition (distinct_n below);  `accuracy` (the dataset's scorer), `response_length`.
On the teacher's samples (x ~ pi_T; skipped without a teacher engine or with eval.teacher_samples off):
- `forward_kl`: full-vocabulary KL(pi_T || pi_S) per token;  `top1_agreement_teacher`: argmax agreement there;
- `student_nll_teacher`: -lp_S(x) (the student's cross-entropy on teacher text);
- the teacher's own `teacher_accuracy`, `teacher_response_length`, `teacher_distinct_2`, `teacher_distinct_3`.
Plus the optional benchmark (`tropd eval`'s harness) as `bench/<name>/<metric>`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from megatron_tropd import ops
from megatron_tropd.distributed.parallel import ParallelGroups
from megatron_tropd.evaluation.harness import evaluate as evaluate_benchmark
from megatron_tropd.rollout.base import GenerationRequest, RolloutEngine, SamplingParams
from megatron_tropd.training.batch import RolloutBatch, build_batch
from megatron_tropd.training.schedule import broadcast_from_last_stage, crop_positions, run_schedule
from megatron_tropd.training.scoring import ScoreOptions, TeacherScorer, tp_group

# Held-out requests get ids of their own so that their sampling seeds never coincide with training requests'.
EVAL_REQUEST_ID_OFFSET = 10_000_000
TEACHER_EVAL_SEED_SALT = 0x7E57  # the teacher's held-out samples use a random stream of their own

# Per-token sums of each sample set, in this order (the last entry is the token count).
STUDENT_SUMS = ("reverse_kl_k1", "token_agreement", "reverse_kl", "top1_agreement", "teacher_nll",
                "student_entropy", "teacher_entropy")
TEACHER_SUMS = ("forward_kl", "top1_agreement_teacher", "student_nll_teacher")


@dataclass(frozen=True)
class HeldOutOptions:
    samples_per_prompt: int
    micro_batch_size: int
    vocab_size: int
    pad_id: int
    run_dir: Path
    benchmark: Any = None  # an evaluation.benchmarks.Benchmark, or None
    benchmark_samples: int = 1
    teacher_samples: bool = True  # also sample the teacher (once) for forward KL / agreement on teacher text
    routes: tuple[int, ...] = ()  # each prompt's teacher index (several teachers; empty: the first teacher)
    pad_multiple: int = 0  # sequence padding: 8 x every TP size in use (0 = 8 x the student's TP)


def check_layout(n_prompts: int, samples_per_prompt: int, dp_size: int, micro_batch_size: int) -> None:
    """The held-out batch must split like a training batch; say which keys to change when it does not."""
    n = n_prompts * samples_per_prompt
    if n % (dp_size * micro_batch_size):
        raise ValueError(f"held-out batch: data.eval_size x eval.samples_per_prompt = {n_prompts} x "
                         f"{samples_per_prompt} = {n} sequences do not split over DP = {dp_size} ranks x "
                         f"optim.micro_batch_size = {micro_batch_size}; make {n} a multiple of "
                         f"{dp_size * micro_batch_size}")


def distinct_n(responses: Sequence[Sequence[int]], n: int) -> float:
    """Repetition within responses: the mean over responses of (distinct n-grams / n-grams) of the response's
    token ids (1.0 = no n-gram repeats; text that loops -> near 0). Responses shorter than n are skipped; nan
    when none is long enough. Per response, so a model repeating itself scores low even if responses differ."""
    ratios = []
    for r in responses:
        grams = [tuple(r[i:i + n]) for i in range(len(r) - n + 1)]
        if grams:
            ratios.append(len(set(grams)) / len(grams))
    return sum(ratios) / len(ratios) if ratios else float("nan")


class HeldOutEval:
    def __init__(self, prompts: list, engine: RolloutEngine | None, teacher: TeacherScorer, student,
                 groups: ParallelGroups, tokenizer, params: SamplingParams, opts: HeldOutOptions,
                 teacher_engine: RolloutEngine | None = None):
        check_layout(len(prompts), opts.samples_per_prompt, groups.dp_size, opts.micro_batch_size)
        self.prompts, self.engine, self.teacher, self.student = prompts, engine, teacher, student
        self.teacher_engine = teacher_engine
        self.groups, self.tokenizer, self.params, self.opts = groups, tokenizer, params, opts
        # Greedy held-out decoding (temperature 0) is scored at T = 1: the model's own distribution.
        self.score_opts = ScoreOptions(params.temperature if params.temperature > 0 else 1.0, opts.vocab_size)
        self._teacher_part: tuple | None = None  # (samples, scores), () without; set on every rank at the 1st call

    def __call__(self, step: int) -> dict | None:
        groups = self.groups
        first = self._teacher_part is None  # the same on every rank
        payload = self._generate(step, with_teacher=first) if groups.rank == 0 else None
        box = [payload]
        dist.broadcast_object_list(box, src=0)
        samples, scores, bench, teacher_part = box[0]
        if first:
            self._teacher_part = teacher_part or ()
        t_samples, t_scores = self._teacher_part or (None, None)

        sums = self._sums(samples, STUDENT_SUMS, "student")
        if t_samples:
            sums = torch.cat([sums, self._sums(t_samples, TEACHER_SUMS, "teacher")])
        if not groups.is_last_stage:
            return broadcast_from_last_stage(None, groups)
        if groups.dp_size > 1:
            dist.all_reduce(sums, group=groups.dp)
        sums = sums.tolist()
        n_s = max(sums[len(STUDENT_SUMS)], 1.0)
        result = {k: sums[i] / n_s for i, k in enumerate(STUDENT_SUMS)}
        result.update(accuracy=sum(scores) / max(len(scores), 1), response_length=_mean_length(samples),
                      distinct_2=distinct_n([s.response_ids for s in samples], 2),
                      distinct_3=distinct_n([s.response_ids for s in samples], 3))
        if t_samples:
            t = sums[len(STUDENT_SUMS) + 1:]
            n_t = max(t[len(TEACHER_SUMS)], 1.0)
            result.update({k: t[i] / n_t for i, k in enumerate(TEACHER_SUMS)})
            result.update(teacher_accuracy=sum(t_scores) / max(len(t_scores), 1),
                          teacher_response_length=_mean_length(t_samples),
                          teacher_distinct_2=distinct_n([s.response_ids for s in t_samples], 2),
                          teacher_distinct_3=distinct_n([s.response_ids for s in t_samples], 3))
        result.update(bench)
        return broadcast_from_last_stage(result, groups)

    # --- scoring -------------------------------------------------------------------------------------------------
    def _micro_batches(self, samples: list) -> list[RolloutBatch]:
        groups, opts = self.groups, self.opts
        n = opts.samples_per_prompt  # samples come n per prompt, in prompt order (both sample sets)
        routes = [opts.routes[i // n] for i in range(len(samples))] if opts.routes else None
        batch = build_batch(samples, opts.pad_id, pad_to_multiple=opts.pad_multiple or 8 * groups.tp_size,
                            routes=routes)
        micro = batch.dp_shard(groups.dp_size, groups.dp_rank).micro_batches(self.opts.micro_batch_size)
        if groups.pp_size == 1:  # each micro-batch as wide as its own sequences (one width under PP: p2p buffers)
            micro = [mb.trimmed(opts.pad_multiple or 8 * groups.tp_size) for mb in micro]
        return [mb.to(groups.device) for mb in micro]

    @torch.no_grad()
    def _sums(self, samples: list, names: tuple[str, ...], source: str) -> torch.Tensor:
        """float64 [len(names) + 1]: this rank's per-token sums of `names` and the token count (last stage; zeros
        elsewhere). One micro-batch at a time: the teacher's logits shard, then the student's on the same inputs."""
        groups = self.groups
        tp, kw = tp_group(groups), dict(temperature=self.score_opts.temperature, vocab_size=self.opts.vocab_size)
        total = torch.zeros(len(names) + 1, dtype=torch.float64)
        if getattr(self.teacher, "micro_batch_logits", None) is None:
            return self._sums_from_scores(samples, source, tp, kw)
        for mb in self._micro_batches(samples):
            t_logits = self.teacher.micro_batch_logits(mb)

            def on_logits(s_logits, i, mb=mb, t_logits=t_logits):
                return s_logits.new_zeros(()), _token_sums(s_logits, t_logits, mb, source, tp, kw)

            for out in run_schedule(self.student.model, [mb], groups, on_logits, forward_only=True,
                                    crop=self.score_opts.crop_logits):
                total += out.cpu()
            del t_logits
        return total.to(groups.device)

    def _sums_from_scores(self, samples: list, source: str, tp, kw) -> torch.Tensor:
        """A teacher without logits aligned with the student's (own layout): the teacher's per-token outputs from its
        scorer at the scoring temperature (lp_t, top-1, entropy); the full-vocabulary KLs are nan (not computed)."""
        from megatron_tropd.objectives import Requirements
        from megatron_tropd.training.teachers import with_score_options

        micro = self._micro_batches(samples)
        scorer = with_score_options(self.teacher, self.score_opts)
        entropy = getattr(scorer, "capabilities", {}).get("entropy", True)  # servers: no full-vocabulary entropy
        scores = scorer.score(micro, Requirements(teacher_topk=1, teacher_entropy=entropy))
        names = STUDENT_SUMS if source == "student" else TEACHER_SUMS
        total = torch.zeros(len(names) + 1, dtype=torch.float64)
        for j, mb in enumerate(micro):
            def on_logits(s_logits, i, mb=mb, j=j):
                return s_logits.new_zeros(()), _token_sums_from_scores(s_logits, scores[j], mb, source, tp, kw)

            for out in run_schedule(self.student.model, [mb], self.groups, on_logits, forward_only=True,
                                    crop=self.score_opts.crop_logits):
                total += out.cpu()
        return total.to(self.groups.device)

    # --- generation (global rank 0) ------------------------------------------------------------------------------
    def _requests(self) -> list[GenerationRequest]:
        return [GenerationRequest(prompt_ids=tuple(p.token_ids), n=self.opts.samples_per_prompt,
                                  request_id=EVAL_REQUEST_ID_OFFSET + p.id) for p in self.prompts]

    def _scores(self, out: list[list]) -> list[float]:
        return [p.score(self.tokenizer.decode(s.response_ids, skip_special_tokens=True))
                for p, group in zip(self.prompts, out) for s in group]

    def _generate(self, step: int, with_teacher: bool) -> tuple[list, list[float], dict, tuple | None]:
        out = self.engine.generate(self._requests(), self.params)
        samples = [s for group in out for s in group]
        bench = self._benchmark(step) if self.opts.benchmark is not None else {}
        teacher = None
        if with_teacher:
            teacher = ()
            if self.opts.teacher_samples and self.teacher_engine is not None:
                params = replace(self.params, seed=self.params.seed + TEACHER_EVAL_SEED_SALT)
                t_out = self.teacher_engine.generate(self._requests(), params)
                teacher = ([s for group in t_out for s in group], self._scores(t_out))
        return samples, self._scores(out), bench, teacher

    def _benchmark(self, step: int) -> dict:
        """The same harness as `tropd eval` (one code path), on the student engine with the current weights."""
        n = self.opts.benchmark_samples
        res = evaluate_benchmark(self.engine, self.opts.benchmark, self.params, n, sorted({1, n}), self.tokenizer,
                                 out_dir=self.opts.run_dir / "eval" / f"step_{step:06d}")
        return {f"bench/{res.benchmark}/{name}": value for name, value in res.metrics.items()}


def _mean_length(samples: list) -> float:
    return sum(len(s.response_ids) for s in samples) / max(len(samples), 1)


def _token_sums(s_logits: torch.Tensor, t_logits: torch.Tensor, mb: RolloutBatch, source: str, tp, kw
                ) -> torch.Tensor:
    """Per-token metric sums of one micro-batch from the two logits shards [b, s - start, V/tp] (same contexts and
    positions, from `schedule.logits_start` on), over its response tokens; float64 [k + 1] in the order
    STUDENT_SUMS / TEACHER_SUMS, then the token count."""
    if t_logits.shape[:2] != s_logits.shape[:2]:
        raise ValueError(f"teacher logits {tuple(t_logits.shape)} and student logits {tuple(s_logits.shape)} cover "
                         f"different positions (both must crop at the same logits_start)")
    start = mb.inputs.shape[1] - s_logits.shape[1]
    m = crop_positions(mb.response_mask & ~mb.prefix_mask, start)
    targets = crop_positions(mb.targets, start).to(s_logits.device)
    lp_s = ops.token_logprobs(s_logits, targets, tp, **kw)
    lp_t = ops.token_logprobs(t_logits, targets, tp, **kw)
    top_s = ops.topk_logprobs(s_logits, 1, tp, **kw)[1][..., 0]
    top_t = ops.topk_logprobs(t_logits, 1, tp, **kw)[1][..., 0]
    if source == "student":
        values = [lp_s - lp_t, (top_t == targets), ops.kl_divergence(s_logits, t_logits, tp, kind="reverse", **kw),
                  top_s == top_t, -lp_t, ops.entropy(s_logits, tp, **kw), ops.entropy(t_logits, tp, **kw)]
    else:
        values = [ops.kl_divergence(s_logits, t_logits, tp, kind="forward", **kw), top_s == top_t, -lp_s]
    sums = [torch.where(m, v.to(torch.float64), 0.0).sum() for v in values]
    return torch.stack(sums + [m.sum().to(torch.float64)]).detach()


def _token_sums_from_scores(s_logits: torch.Tensor, t, mb: RolloutBatch, source: str, tp, kw) -> torch.Tensor:
    """`_token_sums` with the teacher's side from its TeacherTokens `t` (lp_t, top-1 ids, entropy) instead of its
    logits: the full-vocabulary KL entries are nan (and the teacher entropy when the scorer has none)."""
    start = mb.inputs.shape[1] - s_logits.shape[1]
    t = t.crop(start)
    m = crop_positions(mb.response_mask & ~mb.prefix_mask, start)
    targets = crop_positions(mb.targets, start).to(s_logits.device)
    lp_s = ops.token_logprobs(s_logits, targets, tp, **kw)
    top_s = ops.topk_logprobs(s_logits, 1, tp, **kw)[1][..., 0]
    top_t = t.tk_ids[..., 0]
    nan = torch.full_like(lp_s, float("nan"))
    if source == "student":
        values = [lp_s - t.lp_t, (top_t == targets), nan, top_s == top_t, -t.lp_t, ops.entropy(s_logits, tp, **kw),
                  t.ent_t if t.ent_t is not None else nan]
    else:
        values = [nan, top_s == top_t, -lp_s]
    sums = [torch.where(m, v.to(torch.float64), 0.0).sum() for v in values]
    return torch.stack(sums + [m.sum().to(torch.float64)]).detach()
