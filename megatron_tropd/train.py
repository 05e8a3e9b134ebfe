"""`tropd train`: the distillation loop.

    for step in range(start, steps):
        prompts   = sampler.next_batch()                                   # data (resumable order)
        samples   = generate_with_prefixes(student_engine, teacher_engine)  # rollouts (+ teacher prefixes)
        batch     = build_batch(samples) -> this DP rank's share
        metrics   = distill_step(student, teacher, batch, objective)      # teacher scoring + student update
        student_engine.update_weights(export(student), version=step + 1)  # weight sync
        eval / checkpoint / log

Rollouts are generated on global rank 0 (embedded engine) and broadcast; every other piece runs on all ranks.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("tropd")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML run config (see docs/configuration.md)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in run_dir")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=20")
    megatron = p.add_argument_group("Megatron-style flags (shorthands for the config keys named in brackets)")
    for flag, key, kind in MEGATRON_FLAGS:
        dest, help_text = key.replace(".", "__"), f"[{key}]"
        if kind is bool:
            megatron.add_argument(flag, dest=dest, action="store_true", default=None, help=help_text)
        else:
            megatron.add_argument(flag, dest=dest, type=kind, default=None, metavar="N", help=help_text)


MEGATRON_FLAGS = (
    ("--tensor-model-parallel-size", "parallel.tensor_model_parallel_size", int),
    ("--pipeline-model-parallel-size", "parallel.pipeline_model_parallel_size", int),
    ("--sequence-parallel", "parallel.sequence_parallel", bool),
    ("--use-distributed-optimizer", "parallel.use_distributed_optimizer", bool),
    ("--micro-batch-size", "optim.micro_batch_size", int),
    ("--lr", "optim.lr", float),
    ("--clip-grad", "optim.clip_grad", float),
    ("--train-iters", "train.steps", int),
    ("--save-interval", "train.save_interval", int),
    ("--seed", "train.seed", int),
)


def flag_overrides(args) -> list[str]:
    out = []
    for _, key, _ in MEGATRON_FLAGS:
        value = getattr(args, key.replace(".", "__"), None)
        if value is not None:
            out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


def run(args) -> int:
    from megatron_tropd.config import ConfigError, load_config

    try:
        overrides = flag_overrides(args) + list(args.overrides) + (["train.resume=true"] if args.resume else [])
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        raise SystemExit(f"tropd train: {e}")
    quiet_libraries()
    summary = train(cfg)
    return 0 if summary is not None else 1


def quiet_libraries() -> None:
    """Our progress and metrics on stdout; megatron's config dumps, HF progress bars and fallback warnings off."""
    import warnings

    logging.basicConfig(level=logging.INFO, format="[tropd] %(message)s")
    for name in ("megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def resolve_model_path(path: str, cache_dir: Path) -> Path:
    """An HF checkpoint dir, or a built-in model materialised offline into the cache."""
    from megatron_tropd.pretrained import make_layer_subset_student, materialize_smollm2

    if path.startswith("builtin:"):
        name = path.removeprefix("builtin:")
        base = materialize_smollm2(cache_dir / "smollm2-135m-instruct")
        if name == "smollm2-135m-instruct":
            return base
        if name.startswith("smollm2-135m-instruct:every"):
            k = int(name.rsplit("every", 1)[1])
            return make_layer_subset_student(base, cache_dir / f"smollm2-135m-instruct-every{k}", keep_every=k)
        raise ValueError(f"unknown builtin model {path!r}; known: builtin:smollm2-135m-instruct[:everyK]")
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model path {path!r} is not an HF checkpoint directory (no config.json)")
    return p


def _cache_dir() -> Path:
    return Path(os.environ.get("TROPD_CACHE", Path.home() / ".cache" / "megatron_tropd"))


def train(cfg) -> dict | None:
    """Run the distillation described by `cfg` (a config.Config). Returns the summary on rank 0, {} elsewhere.
    Rollout engines (and the SGLang servers this run launched) are closed however the run ends."""
    engines: dict = {}
    try:
        return _train(cfg, engines)
    finally:
        for engine in engines.values():
            engine.close()


def _train(cfg, engines: dict) -> dict | None:
    from transformers import AutoTokenizer

    from megatron_tropd import parallel
    from megatron_tropd.batch import build_batch
    from megatron_tropd.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from megatron_tropd.config import save_config
    from megatron_tropd.data import PromptDataset, PromptSampler
    from megatron_tropd.hf import arch_from_hf_config
    from megatron_tropd.metrics import MetricsLogger, format_summary
    from megatron_tropd.objectives import PrefixOptions, build_objective
    from megatron_tropd.roles import build_student, build_teacher, check_vocab_compatible, hf_loader
    from megatron_tropd.rollout.base import SamplingParams
    from megatron_tropd.rollout.factory import build_engines, sync_weights
    from megatron_tropd.step import StepOptions, distill_step

    t_start = time.time()
    groups = parallel.initialize(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                                 seed=cfg.train.seed)
    is_logger = groups.rank == 0
    run_dir = Path(cfg.train.run_dir)
    cache = _cache_dir()
    # Rank 0 materialises built-in models first; the others then find them complete in the cache.
    if is_logger:
        student_dir, teacher_dir = (resolve_model_path(cfg.student.path, cache),
                                    resolve_model_path(cfg.teacher.path, cache))
    dist.barrier()
    if not is_logger:
        student_dir, teacher_dir = (resolve_model_path(cfg.student.path, cache),
                                    resolve_model_path(cfg.teacher.path, cache))
    s_arch, t_arch = arch_from_hf_config(student_dir), arch_from_hf_config(teacher_dir)
    check_vocab_compatible(student_dir, teacher_dir, s_arch, t_arch)
    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    vocab = s_arch.vocab_size

    def loader(model_cfg, hf_dir, arch):
        if model_cfg.megatron_checkpoint:
            from megatron_tropd.hf import load_megatron_checkpoint

            return lambda model: load_megatron_checkpoint(model, model_cfg.megatron_checkpoint, groups)
        return hf_loader(hf_dir, arch, groups)

    objective = build_objective(cfg.objective)
    updates = cfg.train.steps * cfg.optim.updates_per_batch * cfg.optim.minibatches_per_update
    student = build_student(s_arch, groups, loader(cfg.student, student_dir, s_arch), cfg.optim, updates,
                            dtype=cfg.student.dtype, recompute=cfg.student.recompute_activations,
                            sequence_parallel=cfg.parallel.sequence_parallel,
                            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    teacher = build_teacher(t_arch, groups, loader(cfg.teacher, teacher_dir, t_arch), dtype=cfg.teacher.dtype,
                            sequence_parallel=cfg.parallel.sequence_parallel)

    dataset = PromptDataset(cfg.data, tokenizer)
    sampler = PromptSampler(dataset.train, cfg.rollout.prompts_per_step, seed=cfg.data.seed)
    stop_ids = tuple(sorted({tokenizer.eos_token_id, *cfg.rollout.stop_token_ids} - {None}))
    params = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                            max_new_tokens=cfg.rollout.max_new_tokens, stop_token_ids=stop_ids, seed=cfg.train.seed)
    prefix_opts = PrefixOptions(total_steps=cfg.train.steps, enabled=cfg.guidance.enabled,
                                max_response_len=cfg.guidance.max_prefix_tokens or cfg.rollout.max_new_tokens,
                                prefix_fraction=cfg.guidance.prefix_fraction, seed=cfg.train.seed)
    step_opts = StepOptions(temperature=cfg.rollout.temperature, vocab_size=vocab,
                            micro_batch_size=cfg.optim.micro_batch_size,
                            updates_per_batch=cfg.optim.updates_per_batch,
                            minibatches_per_update=cfg.optim.minibatches_per_update)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    start = 0
    if cfg.train.resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None:
            state = load_checkpoint(ckpt, student, groups)
            sampler.load_state_dict(state["sampler"])
            start = state["step"] + 1
            if is_logger:
                log.info(f"resumed from {ckpt} (next step {start})")
        elif is_logger:
            log.info(f"no complete checkpoint in {run_dir}; starting from step 0")

    engines.update(build_engines(cfg, student_dir, teacher_dir, vocab, pad_id, on_this_rank=is_logger))
    sync_weights(engines, student, groups, s_arch, version=start)  # the engine samples with the trained weights

    logger = None
    if is_logger:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        logger = MetricsLogger(run_dir, tensorboard=cfg.train.tensorboard, resume_step=start - 1 if start else None,
                               total_steps=cfg.train.steps, progress=cfg.train.progress)
    eval_params = SamplingParams(temperature=cfg.eval.temperature, top_p=1.0,
                                 max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                                 stop_token_ids=stop_ids, seed=cfg.train.seed + 1)
    evaluate = _make_eval(cfg, dataset.eval, engines, student, teacher, groups, tokenizer, eval_params, vocab, pad_id)
    before = evaluate(start) if start == 0 and dataset.eval else None
    if logger and before:
        logger.log_eval(0, before)

    for step in range(start, cfg.train.steps):
        t0 = time.time()
        samples, sample_ids = collect_rollouts(engines, sampler.next_batch(), step, cfg, params, prefix_opts,
                                               generate=is_logger)
        t_roll = time.time() - t0
        batch = build_batch(samples, pad_id, sample_ids, pad_to_multiple=8 * groups.tp_size)
        mine = batch.dp_shard(groups.dp_size, groups.dp_rank, cfg.optim.minibatches_per_update)
        metrics = distill_step(student, teacher, mine, objective, groups, step, step_opts)
        sync_weights(engines, student, groups, s_arch, version=step + 1)
        dt = time.time() - t0
        n_tokens = int(batch.response_mask.sum())
        metrics.update({"time/step_s": dt, "time/rollout_s": t_roll, "throughput/tokens_per_s": n_tokens / dt,
                        "weight_version": step + 1})
        if logger:
            logger.log(step, metrics)
        if cfg.eval.interval and (step + 1) % cfg.eval.interval == 0 and step + 1 < cfg.train.steps:
            ev = evaluate(step + 1)
            if logger and ev:
                logger.log_eval(step + 1, ev)
        last = step + 1 == cfg.train.steps
        if (cfg.train.save_interval and (step + 1) % cfg.train.save_interval == 0) or last:
            save_checkpoint(run_dir, step, student, groups, {"sampler": sampler.state_dict()},
                            keep_last=cfg.train.keep_last)

    after = evaluate(cfg.train.steps) if dataset.eval else None
    summary = None
    if logger:
        if after:
            logger.log_eval(cfg.train.steps, after)
        logger.close()
        summary = {"before": before, "after": after, "steps": cfg.train.steps, "run_dir": str(run_dir),
                   "wall_s": time.time() - t_start}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print(_summary_text(summary, run_dir, format_summary))
    parallel.destroy()
    return summary if is_logger else {}


def collect_rollouts(engines: dict, prompts, step: int, cfg, params, prefix_opts, generate: bool):
    """Rollouts of this step's prompts (teacher prefixes per the schedule, student continuations), generated on
    the rank that holds the engines and broadcast to all ranks. Returns (samples, global sample ids)."""
    from megatron_tropd.rollout.prefixes import generate_with_prefixes, plan_prefix_lengths

    payload = None
    if generate:
        n = cfg.rollout.samples_per_prompt
        rids = [step * cfg.rollout.prompts_per_step + i for i in range(len(prompts))]  # unique per step: seeds
        lengths = plan_prefix_lengths([p.id for p in prompts], n, step, prefix_opts)
        per_prompt = generate_with_prefixes(engines["student"], engines.get("teacher"), prompts, lengths, params,
                                            request_ids=rids)
        samples = [s for group in per_prompt for s in group]
        sample_ids = [rid * n + j for rid, group in zip(rids, per_prompt) for j in range(len(group))]
        _check_versions(samples, engines["student"].weight_version, cfg.rollout.max_weight_lag)
        payload = (samples, sample_ids)
    box = [payload]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _check_versions(samples, version: int, max_lag: int) -> None:
    stale = [s.weight_version for s in samples if version - s.weight_version > max_lag]
    if stale:
        raise RuntimeError(f"{len(stale)} rollouts were generated with stale weights (versions {sorted(set(stale))}, "
                           f"current {version}, rollout.max_weight_lag={max_lag}); refusing to train on them")


def _make_eval(cfg, prompts, engines, student, teacher, groups, tokenizer, params, vocab, pad_id):
    """Held-out evaluation: reverse-KL estimate to the teacher (K1 on the student's own samples), teacher-student
    token agreement (teacher argmax == sampled token), task accuracy with the dataset's scorer, response length."""
    from megatron_tropd.batch import build_batch
    from megatron_tropd.objectives import Requirements
    from megatron_tropd.pipeline import broadcast_from_last_stage
    from megatron_tropd.rollout.base import GenerationRequest
    from megatron_tropd.scoring import score_student_old, score_teacher

    n = cfg.eval.samples_per_prompt
    benchmark = None
    if cfg.eval.benchmark and groups.rank == 0:
        from megatron_tropd.evaluation.benchmarks import load_benchmark

        benchmark = load_benchmark(cfg.eval.benchmark, limit=cfg.eval.benchmark_limit, seed=cfg.data.seed)

    def run_benchmark(step: int) -> dict:
        """The same harness as `tropd eval` (one code path), on the student engine with the current weights."""
        from megatron_tropd.evaluation.harness import evaluate as evaluate_benchmark

        k = sorted({1, cfg.eval.benchmark_samples})
        res = evaluate_benchmark(engines["student"], benchmark, params, cfg.eval.benchmark_samples, k, tokenizer,
                                 out_dir=Path(cfg.train.run_dir) / "eval" / f"step_{step:06d}")
        return {f"bench/{res.benchmark}/{name}": value for name, value in res.metrics.items()}

    def evaluate(step: int) -> dict | None:
        payload = None
        if groups.rank == 0:
            reqs = [GenerationRequest(prompt_ids=tuple(p.token_ids), n=n, request_id=10_000_000 + p.id)
                    for p in prompts]
            out = engines["student"].generate(reqs, params)
            samples = [s for group in out for s in group]
            scores = [p.score(tokenizer.decode(s.response_ids, skip_special_tokens=True))
                      for p, group in zip(prompts, out) for s in group]
            bench = run_benchmark(step) if benchmark is not None else {}
            payload = (samples, scores, bench)
        box = [payload]
        dist.broadcast_object_list(box, src=0)
        samples, scores, bench = box[0]
        batch = build_batch(samples, pad_id, pad_to_multiple=8 * groups.tp_size)
        mine = batch.split(groups.dp_size)[groups.dp_rank] if batch.size % groups.dp_size == 0 else batch
        micro = mine.micro_batches(1) if mine.size % cfg.optim.micro_batch_size else \
            mine.micro_batches(cfg.optim.micro_batch_size)
        kw = dict(temperature=params.temperature or 1.0, vocab_size=vocab)
        t = score_teacher(teacher.model, micro, groups, Requirements(teacher_topk=1), **kw)
        s = score_student_old(student.model, micro, groups, Requirements(), **kw)
        result = None
        if groups.is_last_stage:
            kl = agree = count = 0.0
            for mb, to, so in zip(micro, t, s):
                m = mb.response_mask & ~mb.prefix_mask
                kl += float((so["lp_old"] - to["lp_t"])[m].double().sum())
                agree += float((to["tk_ids"][..., 0] == mb.targets)[m].double().sum())
                count += float(m.sum())
            stats = torch.tensor([kl, agree, count], dtype=torch.float64)
            if groups.dp_size > 1 and batch.size % groups.dp_size == 0:
                dist.all_reduce(stats, group=groups.dp)
            kl, agree, count = stats.tolist()
            result = {"reverse_kl_k1": kl / max(count, 1), "token_agreement": agree / max(count, 1),
                      "accuracy": sum(scores) / max(len(scores), 1),
                      "response_length": float(batch.response_mask.sum()) / batch.size, **bench}
        return broadcast_from_last_stage(result, groups)

    return evaluate


def _summary_text(summary: dict, run_dir: Path, format_summary) -> str:
    b, a = summary["before"] or {}, summary["after"] or {}
    lines = ["", "=" * 72, f"tropd train finished: {summary['steps']} steps in {summary['wall_s']:.0f}s", ""]
    lines.append(f"{'held-out metric':<28}{'before':>12}{'after':>12}")
    for key in ("reverse_kl_k1", "token_agreement", "accuracy", "response_length"):
        if key in b or key in a:
            lines.append(f"{key:<28}{b.get(key, float('nan')):>12.4f}{a.get(key, float('nan')):>12.4f}")
    lines += ["", f"outputs: {run_dir}/  (metrics.jsonl, eval_metrics.jsonl, tensorboard/, checkpoints/, "
              f"summary.json, config.yaml)", f"curves:  tropd plot {run_dir}", "=" * 72]
    try:
        lines.insert(3, format_summary(run_dir / "metrics.jsonl"))
    except Exception:  # noqa: BLE001 - the summary table is a convenience
        pass
    return "\n".join(lines)
