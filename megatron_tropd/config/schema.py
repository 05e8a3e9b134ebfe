"""The typed run configuration: dataclasses, loaded from YAML with `key=value` command-line overrides.

    cfg = load_config("examples/configs/smollm2_tropd_cpu.yaml", ["train.steps=20", "objective.outlier=clip"])

Sections are owned by the module that uses them (`ObjectiveConfig` in `objectives`, `DataConfig` in `data`,
`SGLangConfig` in `rollout.sglang_config`, `ClusterConfig` in `config.cluster`); the rest is defined here. Every option is documented in `docs/configuration.md` (a test checks that every field
appears there). Unknown keys, wrong types and invalid values raise `ConfigError` naming the file and key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_tropd.config.cluster import ClusterConfig, check_placement
from megatron_tropd.config.errors import ConfigError
from megatron_tropd.data import DataConfig
from megatron_tropd.models.arch import DTYPE_BYTES
from megatron_tropd.objectives import ObjectiveConfig, OfflineTerm
from megatron_tropd.rollout.sglang_config import SGLangConfig


@dataclass
class ModelConfig:
    path: str = ""  # HF checkpoint dir, or "builtin:smollm2-135m-instruct[:every5]" (shipped, offline)
    megatron_checkpoint: str | None = None  # megatron dist checkpoint to load instead of path's HF weights

    dtype: str = "float32"  # parameter dtype: float32 | bfloat16 (GPU) | float16
    recompute_activations: bool = False  # full activation recompute (student only)


TEACHER_SCORERS = ("megatron", "same_layout", "own_layout", "sglang")


@dataclass
class TeacherConfig(ModelConfig):
    """A teacher: its weights, how it scores the rollouts (its scorer and layout) and which samples it scores."""

    name: str = "teacher"  # label in metrics (teacher/<name>/...) and messages; unique across teachers
    scorer: str = "megatron"  # megatron (= same_layout at the student's TP/PP, else own_layout) | same_layout | own_layout | sglang
    tensor_model_parallel_size: int = 0  # the teacher's own TP (0 = the student's); needs own_layout when different
    pipeline_model_parallel_size: int = 0  # the teacher's own PP (0 = the student's); teacher DP = ranks / (TP * PP)
    micro_batch_size: int = 0  # own_layout: sequences per teacher micro-batch (0 = optim.micro_batch_size)
    offload: bool = False  # own_layout on GPU: weights wait in pinned host memory while the student trains
    routes: list[str] = field(default_factory=list)  # data.route_field values it scores; [] = the default teacher


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1  # the student's TP (and a teacher's without a layout of its own)
    pipeline_model_parallel_size: int = 1  # the student's PP (ditto); data parallel = world / (TP * PP)
    sequence_parallel: bool = False  # megatron sequence parallelism (needs TP > 1)
    use_distributed_optimizer: bool = False  # shard optimizer state over DP (megatron's; GPU or CPU/gloo)


@dataclass
class OptimConfig:
    lr: float = 1e-5  # peak learning rate (paper: 5e-6 constant)
    min_lr: float = 0.0  # floor of the decay schedules
    lr_schedule: str = "constant"  # constant | cosine | linear (after warmup)
    warmup_steps: int = 0  # linear warmup over this many optimizer steps
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay
    adam_beta1: float = 0.9  # Adam first-moment decay
    adam_beta2: float = 0.999  # Adam second-moment decay
    adam_eps: float = 1e-8  # Adam denominator epsilon
    clip_grad: float = 1.0  # global grad-norm clipping (0 = off)
    micro_batch_size: int = 4  # sequences per micro-batch (gradient accumulation over micro-batches)
    # PP 1, no sequence parallelism, local attention spec (not TE); docs/performance.md
    pack_sequences: bool = False  # pack each micro-batch's sequences into fewer rows (block-diagonal attention; same results)
    updates_per_batch: int = 1  # PPO-style epochs over each rollout batch
    minibatches_per_update: int = 1  # optimizer steps per epoch (the rollout batch split into minibatches)


@dataclass
class RolloutConfig:
    engine: str = "embedded"  # embedded (in-process HF transformers) | sglang
    prompts_per_step: int = 8  # prompts sampled per step
    samples_per_prompt: int = 4  # rollouts per prompt
    temperature: float = 1.0  # sampling temperature; the teacher scores at this temperature too
    top_p: float = 1.0  # nucleus sampling; log-probs are still of the unfiltered tempered distribution
    max_new_tokens: int = 128  # maximum response length L (teacher prefix included)
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop ids (the tokenizer's EOS always stops)
    engine_dtype: str = "float32"  # dtype of the embedded engine's HF model
    max_weight_lag: int = 0  # samples generated with weights this many versions old are still accepted
    # Overlapped rollouts (docs/architecture.md): step n+1's rollouts are generated in a background thread on rank 0
    # while step n trains, so they are one weight version old; the ratio is taken against the engine's log-probs.
    overlap: bool = False  # generate the next step's rollouts while this one trains (needs max_weight_lag >= 1)


@dataclass
class GuidanceConfig:
    enabled: bool = True  # TrOPD off-policy guidance: continue from teacher-written prefixes
    prefix_fraction: float = 0.5  # fraction of each prompt's rollouts that start from a teacher prefix
    max_prefix_tokens: int | None = None  # L in the cosine schedule (None = rollout.max_new_tokens)
    prefix_length: str = "uniform"  # prefix length l: uniform (l ~ U{1..L_max(t)}, default) | max (l = L_max(t))


@dataclass
class OfflineConfig:
    """Offline distillation on teacher-written rollouts (a warm-up, a stage of its own, or GKD-style mixing)."""

    warmup_steps: int = 0  # first N steps train on teacher-written rollouts only (N = train.steps: an offline stage)
    lambda_student: float = 1.0  # after the warm-up, student-written share of rollouts (GKD lmbda); 0 = offline only
    divergence: str = "forward"  # full-vocabulary divergence on teacher-written tokens: forward | reverse | jsd
    jsd_beta: float = 0.5  # divergence=jsd: m = beta * pi_T + (1 - beta) * pi_S, in (0, 1)

    @property
    def active(self) -> bool:
        """True when some step has teacher-written rollouts."""
        return self.warmup_steps > 0 or self.lambda_student < 1.0

    def term(self) -> OfflineTerm | None:
        """The objective's offline term (`build_objective(cfg.objective, offline=cfg.offline.term())`), None when
        no step has teacher-written rollouts."""
        return OfflineTerm(self.divergence, self.jsd_beta) if self.active else None


@dataclass
class EvalConfig:
    interval: int = 0  # evaluate every N steps (0 = only before and after training)
    before: bool = True  # evaluate before the first step (off: summary 'before' is null; saves one eval)
    samples_per_prompt: int = 1  # held-out rollouts per eval prompt
    temperature: float = 1.0  # eval sampling temperature (KL estimate is on samples from the student)
    max_new_tokens: int | None = None  # None = rollout.max_new_tokens
    benchmark: str | None = None  # also run `tropd eval`'s harness: humaneval / rg:<task> / a JSONL or Parquet path
    benchmark_limit: int | None = 32  # problems of the benchmark used at each evaluation (None = all)
    benchmark_samples: int = 1  # samples per benchmark problem (reports avg@n and pass@1 / pass@n)
    teacher_samples: bool = True  # also sample the teacher once on the held-out prompts: forward KL, agreement there


@dataclass
class TrainConfig:
    steps: int = 10  # optimizer steps of rollout batches (T in the prefix schedule)
    seed: int = 1234  # seeds init, sampling, trust masks, prefixes and data order
    run_dir: str = "runs/tropd"  # outputs: metrics.jsonl, tensorboard/, checkpoints/, summary.json
    save_interval: int = 0  # checkpoint every N steps (0 = only at the end)
    keep_last: int = 2  # checkpoints kept (older ones deleted after a successful save)
    log_interval: int = 1  # print/log metrics every N steps
    tensorboard: bool = True  # also write TensorBoard scalars
    resume: bool = False  # continue from the last complete checkpoint in run_dir
    progress: bool = True  # live progress bar
    peak_flops: float = 0.0  # FLOP/s of one device for throughput/mfu (0 = measure a float32 matmul loop at start)


@dataclass
class Config:
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teachers: list[TeacherConfig] = field(default_factory=list)  # more teachers, each scoring its routes
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def _check_choice(section: str, key: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ConfigError(f"{section}.{key} must be one of {', '.join(map(str, valid))}; got {value!r}")


def validate(cfg: Config) -> Config:
    """Cross-field checks that no single section can do. Returns cfg."""
    if not cfg.student.path or not cfg.teacher.path:
        raise ConfigError("student.path and teacher.path are required (an HF checkpoint dir or builtin:...)")
    for role in ("student", "teacher"):
        _check_choice(role, "dtype", getattr(cfg, role).dtype, tuple(DTYPE_BYTES))
    _check_choice("rollout", "engine_dtype", cfg.rollout.engine_dtype, tuple(DTYPE_BYTES))
    _check_choice("optim", "lr_schedule", cfg.optim.lr_schedule, ("constant", "cosine", "linear"))
    _check_choice("rollout", "engine", cfg.rollout.engine, ("embedded", "sglang"))
    positive = {
        "parallel.tensor_model_parallel_size": cfg.parallel.tensor_model_parallel_size,
        "parallel.pipeline_model_parallel_size": cfg.parallel.pipeline_model_parallel_size,
        "optim.micro_batch_size": cfg.optim.micro_batch_size,
        "optim.updates_per_batch": cfg.optim.updates_per_batch,
        "optim.minibatches_per_update": cfg.optim.minibatches_per_update,
        "rollout.prompts_per_step": cfg.rollout.prompts_per_step,
        "rollout.samples_per_prompt": cfg.rollout.samples_per_prompt,
        "rollout.max_new_tokens": cfg.rollout.max_new_tokens,
        "train.steps": cfg.train.steps,
        "train.keep_last": cfg.train.keep_last,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1; got {value}")
    if cfg.rollout.temperature < 0 or not 0 < cfg.rollout.top_p <= 1:
        raise ConfigError(f"rollout.temperature must be >= 0 and rollout.top_p in (0, 1]; got "
                          f"{cfg.rollout.temperature}, {cfg.rollout.top_p}")
    if cfg.rollout.temperature == 0 and cfg.objective.name != "full_vocab":
        raise ConfigError("rollout.temperature = 0 (greedy) makes the rollout distribution degenerate; "
                          "on-policy objectives need temperature > 0")
    if cfg.rollout.max_weight_lag < 0:
        raise ConfigError(f"rollout.max_weight_lag must be >= 0; got {cfg.rollout.max_weight_lag}")
    if cfg.rollout.overlap and cfg.rollout.max_weight_lag < 1:
        raise ConfigError(f"rollout.overlap=true trains on samples one weight version old; it needs "
                          f"rollout.max_weight_lag >= 1 (got {cfg.rollout.max_weight_lag})")
    if not 0.0 <= cfg.guidance.prefix_fraction <= 1.0:
        raise ConfigError(f"guidance.prefix_fraction must be in [0, 1]; got {cfg.guidance.prefix_fraction}")
    _check_choice("guidance", "prefix_length", cfg.guidance.prefix_length, ("uniform", "max"))
    if cfg.train.peak_flops < 0:
        raise ConfigError(f"train.peak_flops must be >= 0 (FLOP/s of one device; 0 = measure); got "
                          f"{cfg.train.peak_flops}")
    if cfg.parallel.sequence_parallel and cfg.parallel.tensor_model_parallel_size == 1:
        raise ConfigError("parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1")
    if cfg.optim.pack_sequences and cfg.parallel.pipeline_model_parallel_size > 1:
        raise ConfigError("optim.pack_sequences needs parallel.pipeline_model_parallel_size = 1 (packed micro-batches "
                          "have different row counts; the pipeline's p2p buffers need one shape): set "
                          "optim.pack_sequences=false")
    if cfg.optim.pack_sequences and cfg.parallel.sequence_parallel:
        raise ConfigError("optim.pack_sequences does not run with parallel.sequence_parallel (the output layer's "
                          "input is sharded along the sequence); turn one of them off")
    validate_offline(cfg)
    validate_teachers(cfg)
    check_placement(cfg.sglang, cfg.cluster)
    return cfg


def validate_offline(cfg: Config) -> None:
    """The offline section: value ranges, the run length, and a teacher rollout engine that can write rollouts."""
    off = cfg.offline
    if not 0.0 <= off.lambda_student <= 1.0:
        raise ConfigError(f"offline.lambda_student={off.lambda_student} is outside [0, 1]: it is the student's share "
                          f"of each step's rollouts (GKD's lmbda; 1 = on-policy only, 0 = teacher-written only)")
    if off.warmup_steps < 0:
        raise ConfigError(f"offline.warmup_steps={off.warmup_steps} must be >= 0")
    if off.warmup_steps > cfg.train.steps:
        raise ConfigError(f"offline.warmup_steps={off.warmup_steps} is longer than the run (train.steps="
                          f"{cfg.train.steps}); set offline.warmup_steps <= {cfg.train.steps} (equal to it for an "
                          f"offline stage of its own) or raise train.steps")
    _check_choice("offline", "divergence", off.divergence, ("forward", "reverse", "jsd"))
    if off.divergence == "jsd" and not 0.0 < off.jsd_beta < 1.0:
        raise ConfigError(f"offline.jsd_beta={off.jsd_beta} must be in (0, 1) with offline.divergence=jsd "
                          f"(use divergence=forward or reverse for the limits)")
    if not off.active:
        return
    what = f"offline distillation (offline.warmup_steps={off.warmup_steps}, offline.lambda_student=" \
           f"{off.lambda_student}) needs teacher-written rollouts"
    if cfg.rollout.engine == "sglang" and not cfg.sglang.teacher_urls and cfg.sglang.teacher_servers < 1:
        raise ConfigError(f"{what}, but rollout.engine=sglang has no teacher server (sglang.teacher_urls is empty "
                          f"and sglang.teacher_servers={cfg.sglang.teacher_servers}); set sglang.teacher_servers "
                          f">= 1 or sglang.teacher_urls, or use offline.warmup_steps=0 offline.lambda_student=1")
    if cfg.teacher.megatron_checkpoint:
        raise ConfigError(f"{what} from the teacher engine, which loads teacher.path's HF weights, but "
                          f"teacher.megatron_checkpoint={cfg.teacher.megatron_checkpoint!r} makes the scoring teacher "
                          f"another model; export that checkpoint to HF (tools/convert_megatron_to_hf.py) and set "
                          f"teacher.path to it instead")
    if cfg.parallel.pipeline_model_parallel_size > 1:
        raise ConfigError(f"{what}, scored with the teacher's full logits inside the student's micro-batch, which "
                          f"needs parallel.pipeline_model_parallel_size=1 (got "
                          f"{cfg.parallel.pipeline_model_parallel_size}); use tensor parallelism instead")


def all_teachers(cfg: Config) -> list[tuple[str, TeacherConfig]]:
    """(config key, section) of every teacher: `teacher` first, then `teachers[i]`."""
    return [("teacher", cfg.teacher)] + [(f"teachers[{i}]", t) for i, t in enumerate(cfg.teachers)]


def validate_teachers(cfg: Config) -> None:
    """Each teacher's section on its own, and the routing table they form together (no file is read)."""
    teachers = all_teachers(cfg)
    names: dict[str, str] = {}
    for key, t in teachers:
        if not t.path:
            raise ConfigError(f"{key}.path is required (an HF checkpoint dir or builtin:...)")
        _check_choice(key, "dtype", t.dtype, tuple(DTYPE_BYTES))
        _check_choice(key, "scorer", t.scorer, TEACHER_SCORERS)
        if not t.name:
            raise ConfigError(f"{key}.name must be a non-empty label (it names the teacher in metrics)")
        if t.name in names:
            raise ConfigError(f"{key}.name={t.name!r} is also {names[t.name]}.name; give each teacher a unique name, "
                              f"e.g. {key}.name=math")
        names[t.name] = key
        for sub in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size"):
            if getattr(t, sub) < 0:
                raise ConfigError(f"{key}.{sub} must be >= 1, or 0 for the default; got {getattr(t, sub)}")
    tags: dict[str, str] = {}
    defaults = [key for key, t in teachers if not t.routes]
    if len(defaults) > 1:
        raise ConfigError(f"{' and '.join(defaults)} both have no routes (both would be the default teacher); give "
                          f"all but one of them routes: [tag, ...]")
    for key, t in teachers:
        for tag in t.routes:
            if tag in tags:
                raise ConfigError(f"route tag {tag!r} is in {tags[tag]}.routes and {key}.routes; each tag routes "
                                  f"to one teacher")
            tags[tag] = key


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- `key=value` overrides; typed, validated."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    base = OmegaConf.structured(Config)
    OmegaConf.set_readonly(base, False)  # ObjectiveConfig is a frozen dataclass; merge first, validate after
    where = "defaults"
    try:
        if path is not None:
            where = str(path)
            if not Path(path).is_file():
                raise ConfigError(f"config file not found: {path}")
            base = OmegaConf.merge(base, OmegaConf.load(path))
        if overrides:
            where = "command-line overrides"
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must look like section.key=value; got {bad}")
            base = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(base)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid config{f' key {key!r}' if key else ''}: {msg}") from None
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from None
    return validate(cfg)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def section_types() -> dict[str, tuple[type, bool]]:
    """Section name -> (its dataclass, whether the section is a list of them, like `teachers`)."""
    import typing

    hints = typing.get_type_hints(Config)
    out = {}
    for section in dataclasses.fields(Config):
        hint = hints[section.name]
        is_list = typing.get_origin(hint) is list
        out[section.name] = (typing.get_args(hint)[0] if is_list else hint, is_list)
    return out


def all_fields() -> list[str]:
    """Every option as `section.key` (`section[].key` for list sections; used by the docs test)."""
    return [f"{name}{'[]' if is_list else ''}.{f.name}" for name, (cls, is_list) in section_types().items()
            for f in dataclasses.fields(cls)]


def load_run_config(path: str | Path, overrides: list[str] | None = None):
    """(Config, its sglang section, its cluster section): the launcher's view of a run config."""
    cfg = load_config(path, overrides)
    return cfg, cfg.sglang, cfg.cluster
