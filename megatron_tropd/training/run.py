"""Everything a run builds once, in one place: `build_run(cfg) -> Run`.

    start-up checks (training/preflight.py: config, model dirs and config.json, layouts, tokenizer and vocabulary,
    prompt data, held-out split; built-ins materialised into the cache; no model, no process group) -> groups
    -> student (DDP + optimizer + scheduler) and the megatron teachers (each in its layout) -> sampler
    -> resume (model, optimizer, scheduler, RNG, sampler) -> rollout.overlap: the rollout prefetcher (+ the
    checkpoint's prefetched rollouts) -> rollout engines (+ first weight sync)
    -> server-side teacher scorers (SGLang) -> the run's TeacherScorer (routed when there are several teachers)
    -> metrics logger (rank 0) -> held-out evaluation

`Run.close()` joins the generation thread (rollout.overlap) and closes the engines (and the SGLang servers this run
launched) however the run ends.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_tropd.config import Config, ConfigError, save_config
from megatron_tropd.conversion.megatron_io import load_megatron_checkpoint
from megatron_tropd.data import PromptDataset, PromptSampler
from megatron_tropd.distributed import parallel
from megatron_tropd.distributed.parallel import ParallelGroups
from megatron_tropd.evaluation.heldout import HeldOutEval, HeldOutOptions
from megatron_tropd.models.arch import ModelArch
from megatron_tropd.objectives import Objective, PrefixOptions
from megatron_tropd.rollout.base import SamplingParams
from megatron_tropd.rollout.factory import build_engines, sync_weights
from megatron_tropd.training.checkpoint import check_resume_config, latest_checkpoint, load_checkpoint
from megatron_tropd.training.metrics import MetricsLogger
from megatron_tropd.training.overlap import RolloutPrefetcher
from megatron_tropd.training.preflight import preflight
from megatron_tropd.training.roles import Student, build_student, hf_loader
from megatron_tropd.training.scoring import MegatronTeacherScorer, TeacherScorer
from megatron_tropd.training import teachers as teachers_mod
from megatron_tropd.training.step import StepOptions

log = logging.getLogger("tropd")


@dataclass
class Run:
    cfg: Config
    groups: ParallelGroups
    student_arch: ModelArch
    student: Student
    teacher: TeacherScorer
    objective: Objective
    dataset: PromptDataset
    sampler: PromptSampler
    sampling: SamplingParams  # rollout sampling
    prefix_opts: PrefixOptions  # teacher-prefix schedule
    step_opts: StepOptions
    pad_id: int
    run_dir: Path
    start_step: int  # 0, or the step after the resumed checkpoint
    evaluate: HeldOutEval | None  # None without held-out prompts
    engines: dict = field(default_factory=dict)  # {"student": engine, "teacher": engine} on the generating rank
    router: teachers_mod.Router | None = None  # prompt -> teacher index (RolloutBatch.routes)
    pad_multiple: int = 8  # sequence padding: 8 x every TP size in use (pipeline buffers, sequence parallelism)
    logger: MetricsLogger | None = None  # rank 0 only
    rollouts: RolloutPrefetcher | None = None  # rollout.overlap: the generation thread (rank 0) and the step ahead
    t_start: float = field(default_factory=time.time)

    @property
    def is_logger(self) -> bool:
        return self.groups.rank == 0

    def close(self) -> None:
        """Join the generation thread (rollout.overlap), then close the engines and the logger."""
        if self.rollouts is not None:
            self.rollouts.close()
        for engine in self.engines.values():
            engine.close()
        if self.logger is not None:
            self.logger.close()


def _weight_loader(model_cfg, hf_dir: Path, arch: ModelArch, groups: ParallelGroups):
    if model_cfg.megatron_checkpoint:
        return lambda model: load_megatron_checkpoint(model, model_cfg.megatron_checkpoint, groups)
    return hf_loader(hf_dir, arch, groups)


def _check_packable(models) -> None:
    from megatron_tropd.training.packing import check_packable

    for model in models:
        try:
            check_packable(model)
        except ValueError as e:
            raise ConfigError(f"optim.pack_sequences: {e}") from None


def build_run(cfg: Config) -> Run:
    inputs = preflight(cfg)  # config, config.json, tokenizer, prompt data; no model yet: ConfigError / DataError
    groups = parallel.initialize(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                                 seed=cfg.train.seed)
    student_dir, teacher_dir, tokenizer = inputs.student_dir, inputs.teacher_dir, inputs.tokenizer
    s_arch, vocab = inputs.student_arch, inputs.vocab  # vocab: the real vocabulary
    pad_id, stop_ids, objective, dataset = inputs.pad_id, inputs.stop_ids, inputs.objective, inputs.dataset

    updates = cfg.train.steps * cfg.optim.updates_per_batch * cfg.optim.minibatches_per_update
    student = build_student(s_arch, groups, _weight_loader(cfg.student, student_dir, s_arch, groups), cfg.optim,
                            updates, dtype=cfg.student.dtype, recompute=cfg.student.recompute_activations,
                            sequence_parallel=cfg.parallel.sequence_parallel,
                            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    pad_multiple = 8 * math.lcm(groups.tp_size, *(t.spec.tp or 1 for t in inputs.teachers))
    step_opts = StepOptions(temperature=cfg.rollout.temperature, vocab_size=vocab, trim_multiple=pad_multiple,
                            micro_batch_size=cfg.optim.micro_batch_size,
                            updates_per_batch=cfg.optim.updates_per_batch,
                            minibatches_per_update=cfg.optim.minibatches_per_update,
                            teacher_names=tuple(t.spec.name for t in inputs.teachers),
                            ratio_against_rollout=cfg.rollout.overlap,  # overlap: samples are one version old
                            pack_sequences=cfg.optim.pack_sequences)
    scorers = _megatron_teachers(cfg, inputs.teachers, groups, step_opts)  # index -> scorer (not sglang ones)
    if cfg.optim.pack_sequences:  # the layer spec is known only now (TE where importable)
        _check_packable([student.gpt, *(s.teacher.model for s in scorers.values()
                                        if isinstance(s, MegatronTeacherScorer))])  # own_layout runs unpacked

    sampler = PromptSampler(dataset.train, cfg.rollout.prompts_per_step, seed=cfg.data.seed)
    run_dir = Path(cfg.train.run_dir)
    start, trainer_state = _resume(cfg, run_dir, student, sampler, groups)

    run = Run(
        cfg=cfg, groups=groups, student_arch=s_arch, student=student, teacher=None, objective=objective,
        dataset=dataset, sampler=sampler,
        sampling=SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                max_new_tokens=cfg.rollout.max_new_tokens, stop_token_ids=stop_ids,
                                seed=cfg.train.seed),
        prefix_opts=PrefixOptions(total_steps=cfg.train.steps, enabled=cfg.guidance.enabled,
                                  max_response_len=cfg.guidance.max_prefix_tokens or cfg.rollout.max_new_tokens,
                                  prefix_fraction=cfg.guidance.prefix_fraction, seed=cfg.train.seed,
                                  length_dist=cfg.guidance.prefix_length),
        step_opts=step_opts, pad_id=pad_id, run_dir=run_dir, start_step=start, evaluate=None,
        router=inputs.router, pad_multiple=pad_multiple,
    )
    if cfg.rollout.overlap:  # training/overlap.py: a resumed run re-pends the rollouts its checkpoint prefetched
        run.rollouts = RolloutPrefetcher(sampler, generating=run.is_logger)
        run.rollouts.restore(trainer_state.get("prefetched"), start)
    try:
        run.engines.update(build_engines(cfg, student_dir, teacher_dir, vocab, pad_id, on_this_rank=run.is_logger))
        sync_weights(run.engines, student, groups, s_arch, version=start)  # the engine samples the trained weights
        for t in inputs.teachers:  # scorers on servers need the engines
            if t.spec.index not in scorers:
                scorers[t.spec.index] = teachers_mod.external_scorer(t.spec.kind).build(dict(
                    cfg=cfg, spec=t.spec, groups=groups, engines=run.engines, score=step_opts.score, vocab=vocab,
                    pad_id=pad_id, objective=objective))
        run.teacher = teachers_mod.compose([t.spec for t in inputs.teachers],
                                           [scorers[t.spec.index] for t in inputs.teachers], groups)
        if len(inputs.teachers) > 1 and run.is_logger:
            log.info("teachers: " + "; ".join(t.spec.describe(groups.world_size) for t in inputs.teachers))
        if run.is_logger:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
            run.logger = MetricsLogger(run_dir, tensorboard=cfg.train.tensorboard,
                                       resume_step=start - 1 if start else None, total_steps=cfg.train.steps,
                                       progress=cfg.train.progress)
        if dataset.eval:
            run.evaluate = _held_out_eval(cfg, run, dataset.eval, tokenizer, stop_ids, vocab)
    except BaseException:
        run.close()
        raise
    return run


def _megatron_teachers(cfg: Config, teachers: list, groups: ParallelGroups, step_opts: StepOptions) -> dict:
    """Each megatron teacher (same or own layout) built and loaded, in teacher order (collective)."""
    cache: dict = {}
    out = {}
    for t in teachers:
        if t.spec.kind not in ("same_layout", "own_layout"):
            continue
        out[t.spec.index] = teachers_mod.build_megatron_scorer(
            t.spec, t.arch, lambda g, t=t: _weight_loader(t.spec.cfg, t.dir, t.arch, g), groups, step_opts.score,
            cfg.optim.micro_batch_size, sequence_parallel=cfg.parallel.sequence_parallel, group_cache=cache)
    return out


def _resume(cfg: Config, run_dir: Path, student: Student, sampler: PromptSampler, groups: ParallelGroups
            ) -> tuple[int, dict]:
    """(first step to train, the checkpoint's trainer state); (0, {}) when not resuming. Loads the model,
    optimizer, scheduler, RNG and sampler state in place."""
    if not cfg.train.resume:
        return 0, {}
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        if groups.rank == 0:
            log.info(f"no complete checkpoint in {run_dir}; starting from step 0")
        return 0, {}
    check_resume_config(ckpt, cfg)  # refuses a changed objective / model / data (cli.py checks before any model)
    state = load_checkpoint(ckpt, student, groups)
    sampler.load_state_dict(state["sampler"])
    if groups.rank == 0:
        log.info(f"resumed from {ckpt} (next step {state['step'] + 1})")
    return state["step"] + 1, state


def _held_out_eval(cfg: Config, run: Run, prompts: list, tokenizer, stop_ids: tuple, vocab: int) -> HeldOutEval:
    benchmark = None
    if cfg.eval.benchmark and run.is_logger:
        from megatron_tropd.evaluation.benchmarks import load_benchmark

        benchmark = load_benchmark(cfg.eval.benchmark, limit=cfg.eval.benchmark_limit, seed=cfg.data.seed)
    params = SamplingParams(temperature=cfg.eval.temperature, top_p=1.0,
                            max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                            stop_token_ids=stop_ids, seed=cfg.train.seed + 1)
    opts = HeldOutOptions(samples_per_prompt=cfg.eval.samples_per_prompt, micro_batch_size=cfg.optim.micro_batch_size,
                          vocab_size=vocab, pad_id=run.pad_id, run_dir=run.run_dir, benchmark=benchmark,
                          benchmark_samples=cfg.eval.benchmark_samples, teacher_samples=cfg.eval.teacher_samples,
                          pad_multiple=run.pad_multiple,
                          routes=tuple(run.router.route(p) for p in prompts) if run.router else ())
    return HeldOutEval(prompts, run.engines.get("student"), run.teacher, run.student, run.groups, tokenizer, params,
                       opts, teacher_engine=run.engines.get("teacher"))
