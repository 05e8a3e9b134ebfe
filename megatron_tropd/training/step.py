"""One distillation step on this data-parallel rank's share of a rollout batch.

    TeacherScorer.score (forward only)  ->  student old log-probs (forward only)  ->  global token counts
    ->  for each epoch, minibatch: forward-backward with the objective as the loss  ->  optimizer step

No pass runs twice. When a rollout batch gets exactly one update, the old policy is the current one: lp_old and
ent_s come from the training forward itself (detached; rho = exp(lp_s - lp_old) is 1 with the gradient of lp_s),
unless the objective needs a batch-level student-entropy threshold before the first micro-batch's loss. With
`StepOptions.ratio_against_rollout` (rollout.overlap: samples from an older policy) lp_old is replaced on the
student's own tokens by the rollout engine's log-probs (`behaviour_logprobs`), so the ratio is against the policy
that sampled them. For full-vocabulary objectives the teacher runs once, inside the micro-batch: lp_t (and top-k /
entropy) are taken from the same teacher logits as the divergence. `StepOptions.fused_* = False` forces the separate passes (tests).
Every pass computes logits (output layer, vocabulary-sized ops) only from the micro-batch's first response position
on (`schedule.logits_start`), the output layer's matmul only at response positions (`schedule.logits_from`; 0
elsewhere in the window); `StepOptions.crop_logits = False` computes them everywhere, for tests. The objective
then sees its per-token tensors on that window of positions, which holds every token with a loss.

The objective sees per-token tensors computed on vocabulary shards (`megatron_tropd.ops`); its loss carries the
global normalisation (one all-reduce of token counts per optimizer step), so gradients do not depend on the
micro-batch or data-parallel split. Metrics are reduced over micro-batches and DP ranks with one all-reduce.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import zip_longest

import time

import torch

from megatron_tropd import ops
from megatron_tropd.distributed.parallel import ParallelGroups
from megatron_tropd.objectives import (
    GlobalCounts, Objective, TokenInputs, entropy_threshold, global_counts, reduce_metrics, token_weights,
)
from megatron_tropd.training import packing
from megatron_tropd.training.batch import RolloutBatch
from megatron_tropd.training.roles import Student
from megatron_tropd.training.schedule import broadcast_from_last_stage, crop_positions, run_schedule
from megatron_tropd.training.scoring import (
    ScoreOptions, StudentTokens, TeacherScorer, TeacherTokens, score_student_old, teacher_tokens, tp_group,
)


@dataclass(frozen=True)
class StepOptions:
    temperature: float  # rollout temperature: every log-prob is taken at it
    vocab_size: int  # real vocabulary (padding rows excluded)
    micro_batch_size: int
    updates_per_batch: int = 1
    minibatches_per_update: int = 1
    # lp_old / ent_s from the training forward when a rollout batch gets one update (False: a separate pass)
    fused_old_logprobs: bool = True
    # full-vocabulary objectives and offline distillation: teacher statistics from the in-step teacher logits
    # (False: teacher.score as well)
    fused_teacher: bool = True
    teacher_names: tuple[str, ...] = ()  # with several teachers: metrics per teacher as teacher/<name>/<metric>
    # the behaviour policy is the rollout engine's (rollout.overlap: samples one weight version old): on the student's
    # own tokens the objectives' lp_old (ratio denominator, reward reference) is the engine's lp_roll
    ratio_against_rollout: bool = False
    # logits only from each micro-batch's first response position on (prompt positions carry no loss)
    crop_logits: bool = True
    # cut each micro-batch's right padding to its own longest sequence, rounded up to this multiple (8 x every TP
    # size: sequence parallelism); 0 = every micro-batch as wide as the rollout batch. Pipeline parallelism keeps
    # one width (its p2p buffers)
    trim_multiple: int = 8
    # every pass runs each micro-batch's sequences packed into fewer rows where that saves one (training/packing.py;
    # PP 1, local attention spec, no sequence parallelism); per-token results and gradients are unchanged
    pack_sequences: bool = False

    @property
    def score(self) -> ScoreOptions:
        return ScoreOptions(self.temperature, self.vocab_size, self.crop_logits, self.pack_sequences)


@dataclass
class ScoredMicroBatch:
    """A micro-batch with what the forward-only passes computed for it (None off the last pipeline stage)."""

    batch: RolloutBatch
    teacher: TeacherTokens | None
    old: StudentTokens | None


@dataclass(frozen=True)
class UpdateContext:
    """What every micro-batch of one optimizer step shares."""

    groups: ParallelGroups
    step: int
    counts: GlobalCounts  # token counts of this minibatch over all DP ranks (the loss normaliser)
    entropy_threshold: torch.Tensor | None  # the step's entropy quantile, when the objective selects by entropy
    opts: StepOptions
    fused_old: bool = False  # lp_old / ent_s are taken from this (the only) training forward
    fused_teacher: bool = False  # teacher statistics are taken from the in-step teacher logits


def distill_step(student: Student, teacher: TeacherScorer, batch: RolloutBatch, objective: Objective,
                 groups: ParallelGroups, step: int, opts: StepOptions, timings: dict | None = None) -> dict[str, float]:
    """Train on `batch` (this DP rank's sequences). Returns step metrics on every rank. `timings`, when given,
    receives this rank's phase wall times (time/teacher_s, time/old_logprobs_s, time/update_s; a fused pass is part
    of time/update_s) and the passes that ran over the batch (passes/teacher: teacher forwards per token,
    passes/old_logprobs: 1 when the separate student pass ran), for the step's FLOPs (training/flops.py)."""
    req = objective.requirements
    if (req.full_vocab_kl is not None or req.offline_kl is not None) and groups.pp_size > 1:
        raise ValueError("full-vocabulary objectives (and offline distillation) co-schedule the teacher inside the "
                         "student's micro-batch and support pipeline_model_parallel_size = 1 only; use tensor "
                         "parallelism instead")
    device = groups.device
    micro = batch.micro_batches(opts.micro_batch_size)
    if opts.trim_multiple and groups.pp_size == 1:  # pipeline p2p buffers need one shape for every micro-batch
        micro = [mb.trimmed(opts.trim_multiple) for mb in micro]  # on the host: no device sync per micro-batch
    micro = [mb.to(device) for mb in micro]
    # one update per rollout batch: the training forward runs at the old weights, unless the objective needs the
    # batch's student-entropy threshold before the first micro-batch's loss
    fused_old = (opts.fused_old_logprobs and opts.updates_per_batch == 1 and opts.minibatches_per_update == 1
                 and req.entropy_threshold != "student")
    # full-vocabulary objectives (and the offline term on teacher-written rollouts) run the (same-layout) teacher
    # inside the micro-batch anyway
    in_step_teacher = req.full_vocab_kl is not None or req.offline_kl is not None
    fused_teacher = (opts.fused_teacher and in_step_teacher and req.entropy_threshold != "teacher"
                     and hasattr(teacher, "forward_logits"))
    t0 = time.perf_counter()
    teacher_out = [] if fused_teacher else teacher.score(micro, req)
    t1 = time.perf_counter()
    old_out = [] if fused_old else score_student_old(student.model, micro, groups, req, opts.score, with_entropy=True)
    t2 = time.perf_counter()
    scored = [ScoredMicroBatch(mb, t, o) for mb, t, o in zip_longest(micro, teacher_out, old_out)]

    threshold = None
    if req.entropy_threshold is not None and groups.is_last_stage:
        ents = [o.ent_s for o in old_out] if req.entropy_threshold == "student" else [t.ent_t for t in teacher_out]
        threshold = entropy_threshold(ents, [mb.response_mask & ~mb.prefix_mask & ~mb.offline_mask for mb in micro],
                                      req.entropy_frac, groups.dp)

    if len(micro) % opts.minibatches_per_update:
        raise ValueError(f"{len(micro)} micro-batches per rank cannot be split into "
                         f"optim.minibatches_per_update={opts.minibatches_per_update} minibatches")
    per_mini = len(micro) // opts.minibatches_per_update
    all_metrics, grad_norms, skipped = [], [], 0
    for _ in range(opts.updates_per_batch):
        for m in range(opts.minibatches_per_update):
            mini = scored[m * per_mini:(m + 1) * per_mini]
            counts = global_counts([(s.batch.response_mask, s.batch.prefix_mask) for s in mini], groups.dp, device)
            ctx = UpdateContext(groups, step, counts, threshold, opts, fused_old, fused_teacher)
            all_metrics.extend(r["metrics"] for r in _update(student, teacher, mini, objective, ctx))
            ok, grad_norm, _ = student.optimizer.step()
            student.scheduler.step(increment=1)
            skipped += int(not ok)
            grad_norms.append(float(grad_norm) if grad_norm is not None else float("nan"))

    metrics = None
    if groups.is_last_stage:
        metrics = reduce_metrics(all_metrics, groups.dp, device)
        metrics.update(_batch_metrics(micro, groups, device))
    t3 = time.perf_counter()
    metrics = broadcast_from_last_stage(metrics, groups)
    if timings is not None:
        timings.update({"time/teacher_s": t1 - t0, "time/old_logprobs_s": t2 - t1, "time/update_s": t3 - t2,
                        "passes/teacher": float(1 + (in_step_teacher and not fused_teacher)),
                        "passes/old_logprobs": float(not fused_old),
                        "throughput/logit_positions": float(_logit_positions(micro, opts.crop_logits
                                                                         and not student.gpt.config.sequence_parallel)),
                        **_body_shape(micro, opts.pack_sequences)})
    # every optimizer step of the rollout batch: the mean and the largest pre-clip global norm
    metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
    metrics["grad_norm/max"] = max(grad_norms)
    metrics["optimizer_steps"] = float(len(grad_norms))
    metrics["lr"] = student.optimizer.param_groups[0]["lr"]
    metrics["skipped_updates"] = float(skipped)
    return metrics


def _update(student: Student, teacher: TeacherScorer, mini: list[ScoredMicroBatch], objective: Objective,
            ctx: UpdateContext) -> list[dict]:
    """Forward-backward of one minibatch with the objective as the loss (gradients accumulate; no step)."""
    req, cfg, groups = objective.requirements, objective.cfg, ctx.groups
    tp = tp_group(groups)
    kw = dict(temperature=ctx.opts.temperature, vocab_size=ctx.opts.vocab_size)

    def on_logits(logits, i):
        mb, t, o = mini[i].batch, mini[i].teacher, mini[i].old
        # logits [b, s - start, V_padded/tp] of positions >= start (schedule.logits_start); every per-token tensor
        # below is cut to the same window, which holds all of the micro-batch's response tokens
        start = mb.inputs.shape[1] - logits.shape[1]
        targets, response, prefix, offline, lp_roll, positions = (
            crop_positions(x, start) for x in (mb.targets, mb.response_mask, mb.prefix_mask, mb.offline_mask,
                                               mb.lp_roll, mb.positions))
        t_logits = None
        if ctx.fused_teacher:  # the teacher's one pass over this micro-batch: [b, s - start, V_padded/tp]
            t_logits = teacher.forward_logits(mb.inputs, start, mb.response_mask)
            t = teacher_tokens(t_logits, targets, req, tp, **kw)
        else:
            t = t.crop(start)
        lp_s = ops.token_logprobs(logits, targets, tp, **kw)
        if ctx.fused_old:  # the old policy is the current one: rho = exp(lp_s - lp_old) == 1, d rho = d lp_s
            with torch.no_grad():
                o = StudentTokens(lp_old=lp_s.detach(), ent_s=ops.entropy(logits.detach(), tp, **kw))
        else:
            o = o.crop(start)
        lp_old = o.lp_old
        if ctx.opts.ratio_against_rollout:
            lp_old = behaviour_logprobs(o.lp_old, lp_roll, response & ~prefix & ~offline)
        sk_lp = ops.logprobs_at(logits, t.tk_ids, tp, **kw) if req.student_at_teacher_topk else None
        full_kl, offline_kl = _full_vocab_divergences(teacher, logits, mb, offline, start, req, tp, kw, t_logits)
        inputs = TokenInputs(
            lp_s=lp_s, lp_old=lp_old, lp_t=t.lp_t, response_mask=response,
            prefix_mask=prefix, sample_ids=mb.sample_ids, positions=positions, step=ctx.step,
            lp_roll=lp_roll if req.rollout_logprobs else None, tk_lp=t.tk_lp, tk_ids=t.tk_ids,
            sk_lp=sk_lp, ent_t=t.ent_t, ent_s=o.ent_s, full_kl=full_kl, entropy_threshold=ctx.entropy_threshold,
            offline_mask=offline, offline_kl=offline_kl,
        )
        weights = token_weights(response, prefix, ctx.counts, cfg.aggregation)
        names = ctx.opts.teacher_names
        rows = {f"teacher/{n}": mb.routes == j for j, n in enumerate(names)} if len(names) > 1 else None
        loss, metrics = objective(inputs, weights, rows)
        if ctx.opts.ratio_against_rollout:  # how far the policy moved since the samples were drawn
            own = inputs.on_policy_mask  # mean (lp_old - lp_roll) over the student's own tokens: (sum, count)
            shift = (o.lp_old.detach().double() - lp_old.double()).masked_fill(~own, 0.0)
            metrics["behaviour/logprob_shift"] = (shift.sum(), own.sum().double())
        # The total loss of this update = sum over micro-batches and DP ranks; count it once (rank 0, first mb).
        once = float(i == 0 and groups.dp_rank == 0)
        metrics["loss"] = (loss.detach().double(), torch.tensor(once, dtype=torch.float64))
        return loss, {"metrics": metrics}

    student.model.zero_grad_buffer()
    student.optimizer.zero_grad()
    return run_schedule(student.model, [s.batch for s in mini], groups, on_logits, forward_only=False,
                        crop=ctx.opts.crop_logits, pack=ctx.opts.pack_sequences)


def behaviour_logprobs(lp_old: torch.Tensor, lp_roll: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """[b, s] the behaviour policy's log-probs with `StepOptions.ratio_against_rollout`: the rollout engine's
    (`lp_roll`, the weights that sampled the token, rollout temperature) on the student's own tokens `own`
    [b, s] bool, `lp_old` (the student before this step's update) on teacher-written ones, which have no engine
    log-prob. The objectives then take rho = exp(lp_s - lp_roll) (and their reward reference) against the policy
    that generated the samples, as off-policy training one weight version behind needs."""
    return torch.where(own, lp_roll.to(lp_old.dtype), lp_old.detach())


def _full_vocab_divergences(teacher: TeacherScorer, logits, mb: RolloutBatch, offline_mask, start: int, req, tp, kw,
                            t_logits=None):
    """(full_kl, offline_kl) [b, s - start] from the teacher's logits shard of this micro-batch (positions >= start,
    as the student's `logits`; ops.kl_divergence), each None when not asked for; the teacher runs only when one is
    needed (offline: `offline_mask`, the micro-batch's teacher-written tokens, has any) and `t_logits` (the step's
    in-micro-batch teacher pass) is not given. The same kind is computed once."""
    offline = req.offline_kl is not None and bool(offline_mask.any())
    if req.full_vocab_kl is None and not offline:
        return None, None
    if t_logits is None:
        t_logits = teacher.forward_logits(mb.inputs, start, mb.response_mask)
    full_kl = offline_kl = None
    if req.full_vocab_kl is not None:
        full_kl = ops.kl_divergence(logits, t_logits, tp, kind=req.full_vocab_kl, beta=req.full_vocab_beta, **kw)
    if offline:
        same = req.offline_kl == req.full_vocab_kl and (req.offline_kl != "jsd"
                                                        or req.offline_beta == req.full_vocab_beta)
        offline_kl = full_kl if same else ops.kl_divergence(logits, t_logits, tp, kind=req.offline_kl,
                                                            beta=req.offline_beta, **kw)
    return full_kl, offline_kl


def _logit_positions(micro: list[RolloutBatch], crop: bool) -> int:
    """Positions of one pass over `micro` (this rank's) at which the output layer runs: the response positions when
    cropping (`schedule.logits_from`; every position of a micro-batch without any), else all of them
    (throughput/logit_positions). Cost accounting like the rest of throughput/*: it depends on the layout
    (micro-batch size, DP), so resumes across layouts do not compare it."""
    return sum((int(mb.response_mask.sum()) or mb.inputs.numel()) if crop else mb.inputs.numel() for mb in micro)


def _body_shape(micro: list[RolloutBatch], pack: bool) -> dict[str, float]:
    """Positions the model body runs in one pass over `micro` (rows x width after trimming and packing) and its causal
    query-key pairs (rows x w(w+1)/2): throughput/body_positions and throughput/attention_pairs, per rank, for the
    step's executed FLOPs (tools/bench_step.py)."""
    positions = pairs = 0.0
    for mb in micro:
        w = mb.inputs.shape[1]
        plan = packing.plan_for(mb.response_mask) if pack else None
        rows = plan.rows if plan else mb.size
        positions += rows * w
        pairs += rows * w * (w + 1) / 2
    return {"throughput/body_positions": positions, "throughput/attention_pairs": pairs}


def _batch_metrics(micro: list[RolloutBatch], groups: ParallelGroups, device) -> dict:
    """Response / prefix lengths per sequence, reduced over DP like the objective metrics."""
    per_mb = []
    for mb in micro:
        seqs = torch.ones(mb.size, dtype=torch.float64, device=mb.tokens.device)
        m = {
            "response_length": (mb.response_mask.sum().double(), seqs.sum()),
            "prefix_length": (mb.prefix_mask.sum().double(), seqs.sum()),
            "prefixed_fraction": (mb.prefix_mask.any(-1).sum().double(), seqs.sum()),
            "offline_fraction": (mb.offline_mask.any(-1).sum().double(), seqs.sum()),  # teacher-written rollouts
        }
        per_mb.append(m)
    return reduce_metrics(per_mb, groups.dp, device)
