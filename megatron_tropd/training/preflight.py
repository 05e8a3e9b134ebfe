"""Start-up checks of a run's inputs, before any model is built or loaded: `preflight(cfg) -> ResolvedInputs`.

    check_config(cfg)     # the config alone: sections, layout sizes, batch split, objective (no files)
    inputs = preflight(cfg)  # + model dirs, HF config.json, tokenizer files, prompt data, held-out split

Several teachers (`teacher` + `teachers: [...]`) are each checked like the one teacher: directory, config.json,
their own layout (`training/teachers.py`), one shared tokenizer, what their scorer can serve, and the routes: every
prompt row must route to a teacher.

Everything here reads small files only (config.json, tokenizer files, the prompt data); no weights are read and no
model is built, and no process group is needed (the rank count comes from WORLD_SIZE, as torchrun sets it), so a
bad input fails in well under a second on every rank. Every failure is one line naming the key, its value
and the fix: `config.ConfigError` for settings and model inputs, `data.DataError` for the prompt data (bad rows
keep their file:line reports). `tropd train` prints it as `tropd train: <message>` and exits with status 2.
The list of cases is in docs/errors.md (each one has a test: test_preflight.py).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_tropd.config import Config, ConfigError
from megatron_tropd.config.schema import all_teachers
from megatron_tropd.data import DataError, PromptDataset
from megatron_tropd.models.arch import ModelArch, align_vocab_padding, check_layout
from megatron_tropd.objectives import Objective, build_objective


@dataclass
class ResolvedInputs:
    """What the start-up checks resolved; `build_run` builds the run from it."""

    student_dir: Path
    teacher_dir: Path
    student_arch: ModelArch  # padded alike with the teacher's (models.arch.align_vocab_padding)
    teacher_arch: ModelArch
    tokenizer: Any
    vocab: int  # the real vocabulary: the shared tokenizer's size
    pad_id: int
    stop_ids: tuple[int, ...]
    objective: Objective
    dataset: PromptDataset
    dp_size: int
    teachers: list = None  # [ResolvedTeacher]: every teacher, `teacher` first (teacher_dir / teacher_arch are its)
    router: Any = None  # training.teachers.Router: prompt -> teacher index


@dataclass
class ResolvedTeacher:
    spec: Any  # training.teachers.TeacherSpec: config key, scorer kind, layout
    dir: Path
    arch: ModelArch  # padded alike with the student's


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_config(cfg: Config, world_size: int | None = None) -> Objective:
    """The checks that need no file: the sglang / cluster sections, the TP x PP layout against the number of ranks,
    the split of a rollout batch into DP ranks x micro-batches x minibatches, and the objective. Returns the
    objective (built once here)."""
    from megatron_tropd.config import check_placement
    from megatron_tropd.rollout.sglang_config import validate as validate_sglang

    try:
        validate_sglang(cfg.sglang)
    except ValueError as e:
        raise ConfigError(f"{e}") from None
    check_placement(cfg.sglang, cfg.cluster)
    if cfg.rollout.engine == "sglang":
        _check_sglang_servers(cfg)

    p, world = cfg.parallel, world_size if world_size is not None else world_size_from_env()
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if world % (tp * pp):
        raise ConfigError(f"parallel.tensor_model_parallel_size={tp} x parallel.pipeline_model_parallel_size={pp} "
                          f"= {tp * pp} does not divide the {world} ranks of this job (WORLD_SIZE); choose sizes "
                          f"whose product divides it (data parallel = ranks / (TP x PP))")
    dp = world // (tp * pp)
    n = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    mbs, minis = cfg.optim.micro_batch_size, cfg.optim.minibatches_per_update
    if n % (dp * mbs * minis):
        raise ConfigError(f"rollout.prompts_per_step x rollout.samples_per_prompt = {n} rollouts per step do not split "
                          f"into DP {dp} x optim.micro_batch_size={mbs} x optim.minibatches_per_update={minis} = "
                          f"{dp * mbs * minis}; make {n} a multiple of {dp * mbs * minis}")
    try:
        objective = build_objective(cfg.objective, offline=cfg.offline.term())  # + offline term on teacher text
    except (ValueError, KeyError) as e:
        raise ConfigError(f"objective.name={cfg.objective.name!r}: {e}") from None
    from megatron_tropd.training.teachers import check_serves, teacher_specs

    check_serves(cfg, teacher_specs(cfg, world), objective.requirements, cfg.objective.name)
    if objective.requirements.full_vocab_kl is not None and pp > 1:
        raise ConfigError(f"objective.name={cfg.objective.name!r} (full-vocabulary KL) runs the teacher inside the "
                          f"student's micro-batch and needs parallel.pipeline_model_parallel_size=1 (got {pp}); use "
                          f"tensor parallelism instead")
    g = cfg.guidance
    if g.max_prefix_tokens is not None and g.max_prefix_tokens > cfg.rollout.max_new_tokens:
        raise ConfigError(f"guidance.max_prefix_tokens={g.max_prefix_tokens} exceeds rollout.max_new_tokens="
                          f"{cfg.rollout.max_new_tokens} (a teacher prefix counts towards the response length); "
                          f"make it <= {cfg.rollout.max_new_tokens} or leave it unset")
    _check_run_dir(cfg)
    return objective


def _check_sglang_servers(cfg: Config) -> None:
    sg = cfg.sglang
    roles = ["student"] + (["teacher"] if cfg.guidance.enabled and cfg.guidance.prefix_fraction > 0 else [])
    launch = [r for r in roles if not sg.urls(r)]
    for role in launch:
        if getattr(sg, f"{role}_servers") < 1:
            raise ConfigError(f"rollout.engine=sglang needs {role} servers: sglang.{role}_servers="
                              f"{getattr(sg, f'{role}_servers')} and no sglang.{role}_urls; set sglang.{role}_urls to "
                              f"running servers or sglang.{role}_servers >= 1")
    if launch:
        python = sg.resolved_python()
        if shutil.which(python) is None:
            raise ConfigError(f"sglang.python={python!r} (or $TROPD_SGLANG_PYTHON) is not an executable: it launches "
                              f"the SGLang servers; point it at the interpreter of the SGLang venv "
                              f"(scripts/setup_sglang_env.sh) or set sglang.*_urls to running servers")


def _check_run_dir(cfg: Config) -> None:
    run_dir = Path(cfg.train.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.run_dir={run_dir} exists and is not a directory; choose another train.run_dir")
    parent = next((p for p in [run_dir, *run_dir.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"train.run_dir={run_dir}: {parent} is not writable; choose a train.run_dir you can write")


# ---------------------------------------------------------------------------------------------------------------
# Models: directories, config.json, layouts, vocabulary
# ---------------------------------------------------------------------------------------------------------------
def _resolve_dir(role: str, path: str, cache: Path) -> Path:
    from megatron_tropd.models.builtin import resolve_model_path

    if not path:
        raise ConfigError(f"{role}.path is empty: set it to an HF checkpoint directory or builtin:...")
    try:
        return resolve_model_path(path, cache)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{role}.path={path!r}: {e}") from None


def model_sections(cfg: Config) -> list[tuple[str, Any]]:
    """(config key, model section) of the student and of every teacher, in that order."""
    return [("student", cfg.student)] + all_teachers(cfg)


def resolve_model_dirs(cfg: Config) -> list[Path]:
    """Student and teacher directories (`model_sections` order). Built-in models are materialised into the cache
    under a file lock: the first rank of a machine writes them, the others wait and then find them complete."""
    import fcntl

    from megatron_tropd.models.builtin import BUILTIN_PREFIX, default_cache_dir

    cache = default_cache_dir()
    out = []
    for role, section in model_sections(cfg):
        path = section.path
        if not path.startswith(BUILTIN_PREFIX):
            out.append(_resolve_dir(role, path, cache))
            continue
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / ".materialize.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                out.append(_resolve_dir(role, path, cache))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    return out


def _read_arch(role: str, path: str, model_dir: Path, require_weights: bool) -> ModelArch:
    from megatron_tropd.models.hf_mapping import arch_from_hf_config

    try:
        arch = arch_from_hf_config(model_dir)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{role}.path={path}: {model_dir / 'config.json'} is not valid JSON ({e.msg} at line "
                          f"{e.lineno}); fix or replace the file") from None
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise ConfigError(f"{role}.path={path}: {e}") from None
    if require_weights and not any(model_dir.glob("*.safetensors")):
        raise ConfigError(f"{role}.path={path}: no *.safetensors weights in {model_dir} (the trainer and the rollout "
                          f"engine load them); save the checkpoint with safe_serialization=True or convert it")
    return arch


def _check_megatron_checkpoint(role: str, ckpt: str, arch: ModelArch) -> None:
    from megatron_tropd.models.hf_mapping import ARCH_FILE, arch_from_json

    d = Path(ckpt)
    if not (d / "metadata.json").is_file():
        raise ConfigError(f"{role}.megatron_checkpoint={ckpt}: not a megatron distributed checkpoint (no "
                          f"metadata.json there); point it at a directory written by tools/convert_hf_to_megatron.py")
    if (d / ARCH_FILE).is_file():
        saved = arch_from_json((d / ARCH_FILE).read_text())
        keys = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size")
        diff = [f"{k}={getattr(saved, k)} (config.json: {getattr(arch, k)})" for k in keys
                if getattr(saved, k) != getattr(arch, k)]
        if diff:
            raise ConfigError(f"{role}.megatron_checkpoint={ckpt} holds another architecture than {role}.path: "
                              f"{', '.join(diff)}; use the checkpoint converted from {role}.path")


def _check_layouts(cfg: Config, archs: dict[str, ModelArch], specs: list) -> None:
    """The student in parallel.*; each teacher in its own layout (the student's for same_layout)."""
    from megatron_tropd.training.teachers import check_teacher_layout

    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    try:
        check_layout(archs["student"], tp, pp, role=f"student ({cfg.student.path})")
    except ValueError as e:
        raise ConfigError(f"parallel.tensor_model_parallel_size={tp}, parallel.pipeline_model_parallel_size="
                          f"{pp}: {e}") from None
    for spec in specs:
        check_teacher_layout(spec, archs[spec.key])


def _load_tokenizer(cfg: Config, student_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(student_dir))
    except Exception as e:  # noqa: BLE001 - transformers raises OSError / ValueError / others for broken files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"student.path={cfg.student.path}: cannot load the tokenizer from {student_dir} "
                          f"({type(e).__name__}: {first}); the directory needs the tokenizer files "
                          f"(tokenizer.json / tokenizer_config.json)") from None


def _check_vocab(cfg: Config, dirs: dict[str, Path], archs: dict[str, ModelArch], tokenizer) -> int:
    """Every teacher shares the student's tokenizer (so all teachers share one): the real vocabulary."""
    from megatron_tropd.training.roles import check_vocab_compatible

    vocab = None
    for key, section in all_teachers(cfg):
        try:
            vocab = check_vocab_compatible(dirs["student"], dirs[key], archs["student"], archs[key], len(tokenizer))
        except ValueError as e:
            raise ConfigError(f"student.path={cfg.student.path}, {key}.path={section.path}: {e}") from None
    return vocab


# ---------------------------------------------------------------------------------------------------------------
# Data and lengths
# ---------------------------------------------------------------------------------------------------------------
def _load_data(cfg: Config, tokenizer) -> PromptDataset:
    try:
        return PromptDataset(cfg.data, tokenizer)
    except DataError:
        raise
    except (ValueError, OSError) as e:
        raise DataError(f"data.source={cfg.data.source}: {e}") from None


def _check_lengths(cfg: Config, dataset: PromptDataset, archs: dict[str, ModelArch]) -> None:
    """Longest prompt + response must fit every model's positions (the engine refuses such a request mid-run)."""
    prompts = dataset.train + dataset.eval
    longest = max(len(p.token_ids) for p in prompts)
    response = max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens or 0)
    for role, arch in archs.items():
        if longest + response > arch.max_position_embeddings:
            raise ConfigError(f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} (eval.max_new_tokens="
                              f"{cfg.eval.max_new_tokens}) + the longest prompt ({longest} tokens) exceeds the "
                              f"{role}'s max_position_embeddings={arch.max_position_embeddings}; lower "
                              f"rollout.max_new_tokens or data.max_prompt_tokens")


def _served(key: str, specs: list) -> bool:
    """Whether teacher `key` scores on servers (its weights need not be on the trainer's file system)."""
    return any(s.key == key and s.kind == "sglang" for s in specs)


def _check_token_ids(cfg: Config, vocab: int, objective: Objective) -> None:
    bad = [t for t in cfg.rollout.stop_token_ids if not 0 <= t < vocab]
    if bad:
        raise ConfigError(f"rollout.stop_token_ids={cfg.rollout.stop_token_ids}: {bad} outside the vocabulary "
                          f"[0, {vocab}); use ids of the shared tokenizer")
    k = objective.requirements.teacher_topk
    if k > vocab:
        raise ConfigError(f"objective.topk / objective.eopd_topk: the objective needs the teacher's top-{k}, more than "
                          f"the vocabulary of {vocab} tokens; make it <= {vocab}")


def _check_eval(cfg: Config, dataset: PromptDataset, dp: int) -> None:
    from megatron_tropd.evaluation.heldout import check_layout as check_eval_layout

    if dataset.eval:
        try:
            check_eval_layout(len(dataset.eval), cfg.eval.samples_per_prompt, dp, cfg.optim.micro_batch_size)
        except ValueError as e:
            raise ConfigError(f"data.eval_size={cfg.data.eval_size}, eval.samples_per_prompt="
                              f"{cfg.eval.samples_per_prompt}: {e}") from None
    bench = cfg.eval.benchmark
    if bench and bench != "humaneval" and not bench.startswith("rg:") and not Path(bench).is_file():
        raise ConfigError(f"eval.benchmark={bench!r}: no such file; use humaneval, rg:<reasoning-gym dataset> or the "
                          f"path of a .jsonl / .parquet file")


def preflight(cfg: Config, world_size: int | None = None, require_weights: bool = True) -> ResolvedInputs:
    """Every start-up check, in the order of what they need: the config alone, then the models' config.json and
    tokenizer files, then the prompt data (loaded before any model). `world_size` defaults to $WORLD_SIZE (1).
    `require_weights=False` accepts model directories that hold only config.json and tokenizer files (stand-ins
    for a start-up check of a large recipe). Raises ConfigError / DataError with one line naming the key, the
    value and the fix."""
    world = world_size if world_size is not None else world_size_from_env()
    objective = check_config(cfg, world)
    dp = world // (cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size)
    from megatron_tropd.training.teachers import Router, teacher_specs

    specs = teacher_specs(cfg, world)
    sections = dict(model_sections(cfg))
    dirs = dict(zip(sections, resolve_model_dirs(cfg)))
    archs = {key: _read_arch(key, sections[key].path, d, require_weights and not _served(key, specs))
             for key, d in dirs.items()}
    for key, arch in archs.items():
        if sections[key].megatron_checkpoint:
            _check_megatron_checkpoint(key, sections[key].megatron_checkpoint, arch)
    _check_layouts(cfg, archs, specs)
    tokenizer = _load_tokenizer(cfg, dirs["student"])
    vocab = _check_vocab(cfg, dirs, archs, tokenizer)
    _check_token_ids(cfg, vocab, objective)
    dataset = _load_data(cfg, tokenizer)
    router = Router(specs, cfg.data.route_field)
    router.check(dataset.train + dataset.eval)
    _check_lengths(cfg, dataset, archs)
    _check_eval(cfg, dataset, dp)
    s_arch, *t_archs = align_vocab_padding(*archs.values())
    t_arch = t_archs[0]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stop_ids = tuple(sorted({tokenizer.eos_token_id, *cfg.rollout.stop_token_ids} - {None}))
    teachers = [ResolvedTeacher(spec, dirs[spec.key], a) for spec, a in zip(specs, t_archs)]
    return ResolvedInputs(student_dir=dirs["student"], teacher_dir=dirs["teacher"], student_arch=s_arch,
                          teacher_arch=t_arch, teachers=teachers, router=router,
                          tokenizer=tokenizer, vocab=vocab, pad_id=pad_id, stop_ids=stop_ids, objective=objective,
                          dataset=dataset, dp_size=dp)
