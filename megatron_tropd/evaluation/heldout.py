"""Held-out distillation metrics during training, on the same data split and scoring passes as the step.

    evaluate = HeldOutEval(prompts, engine, teacher_scorer, student, groups, tokenizer, params, opts)
    metrics = evaluate(step)      # on every rank (collective); the dict on every rank, None where not computed

On the student's own samples of the held-out prompts (generated on global rank 0 and broadcast):
- `reverse_kl_k1`: mean of lp_old - lp_t over response tokens (the K1 estimate of KL(student || teacher));
- `token_agreement`: fraction of response tokens where the teacher's argmax equals the sampled token;
- `accuracy` (the dataset's scorer), `response_length`, and the optional benchmark (`tropd eval`'s harness).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_tropd.distributed.parallel import ParallelGroups
from megatron_tropd.evaluation.harness import evaluate as evaluate_benchmark
from megatron_tropd.objectives import Requirements
from megatron_tropd.rollout.base import GenerationRequest, RolloutEngine, SamplingParams
from megatron_tropd.training.batch import build_batch
from megatron_tropd.training.schedule import broadcast_from_last_stage
from megatron_tropd.training.scoring import ScoreOptions, TeacherScorer, score_student_old

# Held-out requests get ids of their own so that their sampling seeds never coincide with training requests'.
EVAL_REQUEST_ID_OFFSET = 10_000_000


@dataclass(frozen=True)
class HeldOutOptions:
    samples_per_prompt: int
    micro_batch_size: int
    vocab_size: int
    pad_id: int
    run_dir: Path
    benchmark: Any = None  # an evaluation.benchmarks.Benchmark, or None
    benchmark_samples: int = 1


def check_layout(n_prompts: int, samples_per_prompt: int, dp_size: int, micro_batch_size: int) -> None:
    """The held-out batch must split like a training batch; say which keys to change when it does not."""
    n = n_prompts * samples_per_prompt
    if n % (dp_size * micro_batch_size):
        raise ValueError(f"held-out batch: data.eval_size x eval.samples_per_prompt = {n_prompts} x "
                         f"{samples_per_prompt} = {n} sequences do not split over DP = {dp_size} ranks x "
                         f"optim.micro_batch_size = {micro_batch_size}; make {n} a multiple of "
                         f"{dp_size * micro_batch_size}")


class HeldOutEval:
    def __init__(self, prompts: list, engine: RolloutEngine | None, teacher: TeacherScorer, student,
                 groups: ParallelGroups, tokenizer, params: SamplingParams, opts: HeldOutOptions):
        check_layout(len(prompts), opts.samples_per_prompt, groups.dp_size, opts.micro_batch_size)
        self.prompts, self.engine, self.teacher, self.student = prompts, engine, teacher, student
        self.groups, self.tokenizer, self.params, self.opts = groups, tokenizer, params, opts
        # Greedy held-out decoding (temperature 0) is scored at T = 1: the model's own distribution.
        self.score_opts = ScoreOptions(params.temperature if params.temperature > 0 else 1.0, opts.vocab_size)

    def __call__(self, step: int) -> dict | None:
        groups, opts = self.groups, self.opts
        payload = self._generate(step) if groups.rank == 0 else None
        box = [payload]
        dist.broadcast_object_list(box, src=0)
        samples, scores, bench = box[0]
        batch = build_batch(samples, opts.pad_id, pad_to_multiple=8 * groups.tp_size)
        micro = batch.dp_shard(groups.dp_size, groups.dp_rank).micro_batches(opts.micro_batch_size)
        micro = [mb.to(groups.device) for mb in micro]
        teacher = self.teacher.score(micro, Requirements(teacher_topk=1))
        old = score_student_old(self.student.model, micro, groups, Requirements(), self.score_opts)
        result = None
        if groups.is_last_stage:
            kl = agree = count = 0.0
            for mb, t, s in zip(micro, teacher, old):
                m = mb.response_mask & ~mb.prefix_mask
                kl += float((s.lp_old - t.lp_t)[m].double().sum())
                agree += float((t.tk_ids[..., 0] == mb.targets)[m].double().sum())
                count += float(m.sum())
            stats = torch.tensor([kl, agree, count], dtype=torch.float64)
            if groups.dp_size > 1:
                dist.all_reduce(stats, group=groups.dp)
            kl, agree, count = stats.tolist()
            result = {"reverse_kl_k1": kl / max(count, 1), "token_agreement": agree / max(count, 1),
                      "accuracy": sum(scores) / max(len(scores), 1),
                      "response_length": float(batch.response_mask.sum()) / batch.size, **bench}
        return broadcast_from_last_stage(result, groups)

    def _generate(self, step: int) -> tuple[list, list[float], dict]:
        reqs = [GenerationRequest(prompt_ids=tuple(p.token_ids), n=self.opts.samples_per_prompt,
                                  request_id=EVAL_REQUEST_ID_OFFSET + p.id) for p in self.prompts]
        out = self.engine.generate(reqs, self.params)
        samples = [s for group in out for s in group]
        scores = [p.score(self.tokenizer.decode(s.response_ids, skip_special_tokens=True))
                  for p, group in zip(self.prompts, out) for s in group]
        return samples, scores, self._benchmark(step) if self.opts.benchmark is not None else {}

    def _benchmark(self, step: int) -> dict:
        """The same harness as `tropd eval` (one code path), on the student engine with the current weights."""
        n = self.opts.benchmark_samples
        res = evaluate_benchmark(self.engine, self.opts.benchmark, self.params, n, sorted({1, n}), self.tokenizer,
                                 out_dir=self.opts.run_dir / "eval" / f"step_{step:06d}")
        return {f"bench/{res.benchmark}/{name}": value for name, value in res.metrics.items()}
