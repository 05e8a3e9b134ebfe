"""The distillation loop.

    run = build_run(cfg)                                                   # training/run.py: built once
    for step in range(run.start_step, steps):
        metrics = train_step(run, step):
            prompts = sampler.next_batch()                                 # data (resumable order)
            samples = generate_mixed(student_engine, teacher_engine)  # rollouts (+ teacher prefixes, + offline)
            batch   = build_batch(samples) -> this DP rank's share
            metrics = distill_step(student, teacher_scorer, batch, objective)  # teacher scoring + update
            sync_weights(student -> student_engine, version=step + 1)      # weight sync
        log / held-out eval / checkpoint

Rollouts are generated on global rank 0 (embedded engine) and broadcast; every other piece runs on all ranks.
With rollout.overlap, step n+1's rollouts are generated in a background thread on rank 0 while step n trains
(training/overlap.py; docs/architecture.md, "Overlapped rollouts").
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch.distributed as dist

from megatron_tropd.distributed import parallel
from megatron_tropd.rollout.factory import sync_weights
from megatron_tropd.rollout.offline import MixOptions, generate_mixed, plan_rollouts
from megatron_tropd.training.batch import build_batch
from megatron_tropd.training.checkpoint import save_checkpoint
from megatron_tropd.training.flops import matmul_params, measure_peak_flops, real_tokens, step_flops
from megatron_tropd.training.metrics import HELD_OUT_METRICS, TEACHER_REFERENCE, format_summary
from megatron_tropd.training.overlap import Rollouts
from megatron_tropd.training.run import Run, build_run
from megatron_tropd.training.step import distill_step

SUMMARY_METRICS = HELD_OUT_METRICS  # printed before / after (all held-out metrics are in eval_metrics.jsonl)


def train(cfg) -> dict | None:
    """Run the distillation described by `cfg` (a config.Config). Returns the summary on rank 0, {} elsewhere."""
    run = build_run(cfg)
    try:
        summary = _loop(run)
    finally:
        run.close()
    parallel.destroy()
    return summary if run.is_logger else {}


def _loop(run: Run) -> dict | None:
    cfg = run.cfg
    before = run.evaluate(run.start_step) if run.start_step == 0 and run.evaluate and cfg.eval.before else None
    if run.logger and before:
        run.logger.log_eval(0, before)
    for step in range(run.start_step, cfg.train.steps):
        metrics = train_step(run, step)
        if run.logger:
            run.logger.log(step, metrics)
        if run.evaluate and cfg.eval.interval and (step + 1) % cfg.eval.interval == 0 and step + 1 < cfg.train.steps:
            ev = run.evaluate(step + 1)
            if run.logger and ev:
                run.logger.log_eval(step + 1, ev)
        if (cfg.train.save_interval and (step + 1) % cfg.train.save_interval == 0) or step + 1 == cfg.train.steps:
            save_checkpoint(run.run_dir, step, run.student, run.groups, trainer_state(run),
                            keep_last=cfg.train.keep_last)
    after = run.evaluate(cfg.train.steps) if run.evaluate else None
    if not run.logger:
        return None
    if after:
        run.logger.log_eval(cfg.train.steps, after)
    run.logger.close()
    summary = {"before": before, "after": after, "steps": cfg.train.steps, "run_dir": str(run.run_dir),
               "wall_s": time.time() - run.t_start}
    (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(summary_text(summary, run.run_dir))
    return summary


def trainer_state(run: Run) -> dict:
    """What a checkpoint after the last trained step stores beside the model: the sampler's state as of the prompts
    of the trained steps (and, with rollout.overlap, the next step's prefetched rollouts: training/overlap.py)."""
    if run.rollouts is not None:
        return run.rollouts.checkpoint_state()
    return {"sampler": run.sampler.state_dict()}


def train_step(run: Run, step: int) -> dict:
    """Rollouts -> this rank's share of the batch -> teacher scoring and update -> weight sync. Metrics on every
    rank. With rollout.overlap the rollouts were generated during the previous step (training/overlap.py) and the
    next step's are generated while this one trains; the weight sync waits for that generation to end."""
    t0 = time.time()
    if run.rollouts is not None:
        prompts, rollouts = overlapped_rollouts(run, step)
    else:
        prompts = run.sampler.next_batch()
        rollouts = collect_rollouts(run, prompts, step)
    samples, sample_ids = rollouts.samples, rollouts.sample_ids
    versions = [s.weight_version for s in samples]
    check_weight_versions(samples, step, run.cfg.rollout.max_weight_lag)  # the student trained here is version step
    t_roll = time.time() - t0
    routes = [run.router.route(p) for p in sample_prompts(run, prompts, sample_ids, step)] if run.router else None
    batch = build_batch(samples, run.pad_id, sample_ids, pad_to_multiple=run.pad_multiple, routes=routes)
    mine = batch.dp_shard(run.groups.dp_size, run.groups.dp_rank, run.cfg.optim.minibatches_per_update)
    timings = {}
    t_update = time.time()
    metrics = distill_step(run.student, run.teacher, mine, run.objective, run.groups, step, run.step_opts,
                           timings=timings)
    t_update_end = time.time()
    if hasattr(run.teacher, "step_metrics"):  # scorers on servers: their requests, prefetch hits, waits
        metrics.update(run.teacher.step_metrics())
    t_wait = time.time()
    if run.rollouts is not None:
        run.rollouts.finish()  # hand-off: the next step's generation has ended; the engine may be synced
    t_sync = time.time()
    t_wait = t_sync - t_wait
    sync_weights(run.engines, run.student, run.groups, run.student_arch, version=step + 1)
    dt = time.time() - t0
    metrics.update({"time/step_s": dt, "time/rollout_s": t_roll, "time/sync_s": time.time() - t_sync, **timings,
                    "time/rollout_wait_s": t_wait, "throughput/tokens_per_s": int(batch.response_mask.sum()) / dt,
                    "weight_version": step + 1, "rollout/weight_version": min(versions),
                    "rollout/weight_lag": step - min(versions)})
    metrics.update(timeline(run.t_start, rollouts, t_update, t_update_end))
    metrics.update(utilisation(run, batch, timings, dt))
    return metrics


def timeline(t_start: float, rollouts: Rollouts, update_start: float, update_end: float) -> dict:
    """timeline/*: when this step's rollouts were generated and when its update ran, in seconds since `t_start`
    (the run's start). With overlap the rollouts of step n+1 start before the update of step n ends."""
    return {"timeline/rollout_start": rollouts.start - t_start, "timeline/rollout_end": rollouts.end - t_start,
            "timeline/update_start": update_start - t_start, "timeline/update_end": update_end - t_start}


def overlapped_rollouts(run: Run, step: int) -> tuple[list, Rollouts]:
    """(prompts, rollouts) of `step` from the prefetcher (generated during the previous step, restored from the
    checkpoint, or, at a run's first step, generated now), then the next step's generation is started in the
    background; it runs on the engine at the current weight version while this step trains."""
    pf = run.rollouts
    if not pf.holds(step):  # the run's first step: nothing is ahead yet
        pf.submit(step, lambda prompts: generate_rollouts(run, prompts, step))
    prompts, rollouts = pf.take(step)
    if step + 1 < run.cfg.train.steps:
        pf.submit(step + 1, lambda prompts: generate_rollouts(run, prompts, step + 1))
    return prompts, rollouts


_PEAK_FLOPS: dict = {}  # measured once per process: device -> FLOP/s


def utilisation(run: Run, batch, timings: dict, dt: float) -> dict:
    """throughput/mfu: the step's analytic model FLOPs (training/flops.py; the whole rollout batch) over its wall
    time and the peak FLOP/s of all devices; train.peak_flops per device, or (0) a float32 matmul loop measured once
    on this device and logged as throughput/peak_flops."""
    peak = run.cfg.train.peak_flops
    if not peak:
        device = run.groups.device
        if device not in _PEAK_FLOPS:
            _PEAK_FLOPS[device] = measure_peak_flops(device)
        peak = _PEAK_FLOPS[device]
    vocab = run.step_opts.vocab_size
    t_arch = getattr(getattr(run.teacher, "teacher", None), "arch", None)  # a same-layout megatron teacher
    n_t = matmul_params(t_arch, vocab) if t_arch is not None else 0
    teacher_written = batch.prefix_mask | batch.offline_mask  # teacher prefixes and teacher-written rollouts
    own = batch.response_mask & ~teacher_written
    flops = step_flops(matmul_params(run.student_arch, vocab), n_t, real_tokens(batch.response_mask),
                       int(own.sum()), int(teacher_written.sum()), int(timings["passes/teacher"]),
                       bool(timings["passes/old_logprobs"]), run.step_opts.updates_per_batch)
    return {"throughput/mfu": flops / (dt * peak * dist.get_world_size()), "throughput/peak_flops": peak,
            "throughput/model_flops": flops}


def collect_rollouts(run: Run, prompts, step: int) -> Rollouts:
    """Rollouts of this step's prompts, generated on the rank that holds the engines and broadcast to all ranks
    (a failed generation raises on every rank)."""
    payload = None
    if run.is_logger:
        try:
            payload = generate_rollouts(run, prompts, step)
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            payload = e
    box = [payload if not isinstance(payload, Exception) else f"{type(payload).__name__}: {payload}"]
    dist.broadcast_object_list(box, src=0)
    if isinstance(payload, Exception):
        raise payload
    if isinstance(box[0], str):
        raise RuntimeError(f"rollout generation for step {step} failed on the generating rank: {box[0]}")
    return box[0]


def generate_rollouts(run: Run, prompts, step: int) -> Rollouts:
    """Rollouts of `step`'s prompts (teacher prefixes per the schedule, student continuations) on this rank's
    engines; no collectives, so it may run in the generation thread (rollout.overlap). Sample seeds come from the
    step's request ids, so the result does not depend on when it runs."""
    t0 = time.time()
    n, cfg = run.cfg.rollout.samples_per_prompt, run.cfg
    rids = [step * cfg.rollout.prompts_per_step + i for i in range(len(prompts))]  # unique per step: seeds
    # student rollouts (teacher prefixes per the schedule) + teacher-written ones (offline warm-up / mixing)
    mix = MixOptions(cfg.offline.warmup_steps, cfg.offline.lambda_student)
    lengths, n_teacher = plan_rollouts([p.id for p in prompts], n, step, run.prefix_opts, mix)
    # a scorer on servers (SGLang) scores each sample as it completes, overlapping the other rollouts; not with
    # rollout.overlap, where it would mix the next step's samples into the step being scored
    prefetch = None
    if cfg.sglang.score_while_generating and not cfg.rollout.overlap:
        prefetch = getattr(run.teacher, "prefetch", None)
    per_prompt = generate_mixed(run.engines["student"], run.engines.get("teacher"), prompts, lengths, n_teacher,
                                run.sampling, request_ids=rids, on_sample=prefetch)
    samples = [s for group in per_prompt for s in group]
    sample_ids = [rid * n + j for rid, group in zip(rids, per_prompt) for j in range(len(group))]
    return Rollouts(step, samples, sample_ids, t0, time.time())


def sample_prompts(run: Run, prompts: list, sample_ids: list[int], step: int) -> list:
    """The prompt of each sample (sample id = request id x samples_per_prompt + j, request id = step x
    prompts_per_step + prompt index: `collect_rollouts`)."""
    n, base = run.cfg.rollout.samples_per_prompt, step * run.cfg.rollout.prompts_per_step
    return [prompts[sid // n - base] for sid in sample_ids]


def check_weight_versions(samples, version: int, max_lag: int) -> None:
    """Refuse samples generated more than `max_lag` weight versions before `version` (the student's version at
    the step that trains on them: the step index). With rollout.overlap every sample after the first step is
    exactly one version old."""
    stale = [s.weight_version for s in samples if version - s.weight_version > max_lag]
    if stale:
        raise RuntimeError(f"{len(stale)} rollouts were generated with stale weights (versions {sorted(set(stale))}, "
                           f"current {version}, rollout.max_weight_lag={max_lag}); refusing to train on them")


def _num(v) -> str:
    return "nan" if v is None else f"{v:.4f}"


def summary_text(summary: dict, run_dir: Path) -> str:
    b, a = summary["before"] or {}, summary["after"] or {}
    lines = ["", "=" * 72, f"tropd train finished: {summary['steps']} steps in {summary['wall_s']:.0f}s", ""]
    lines.append(f"{'held-out metric':<28}{'before':>12}{'after':>12}{'teacher':>12}")
    for key in SUMMARY_METRICS:
        if key in b or key in a:
            ref = a.get(TEACHER_REFERENCE.get(key), b.get(TEACHER_REFERENCE.get(key)))
            teacher = _num(ref) if ref is not None else ""
            lines.append(f"{key:<28}{_num(b.get(key)):>12}{_num(a.get(key)):>12}{teacher:>12}")
    lines += ["", f"outputs: {run_dir}/  (metrics.jsonl, eval_metrics.jsonl, tensorboard/, checkpoints/, "
              f"summary.json, config.yaml)", f"curves:  tropd plot {run_dir}", "=" * 72]
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.is_file():
        lines.insert(3, format_summary(metrics_file))
    return "\n".join(lines)
