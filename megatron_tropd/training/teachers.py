"""The teachers of a run: each one's scorer and layout, the samples it scores, and the scorer that routes them.

    specs = teacher_specs(cfg, world)                       # scorer kind + layout of each teacher (no file read)
    router = Router(specs, cfg.data.route_field)            # route tag of a prompt -> teacher index
    router.check(dataset.train + dataset.eval)              # every prompt has a teacher (before models load)
    scorer = RoutedTeacherScorer(names, scorers, groups)    # several teachers behind the one TeacherScorer seam

Scorer kinds (`teacher.scorer`):
- `same_layout`: a frozen megatron teacher in the student's TP/PP (`scoring.MegatronTeacherScorer`); its logits
  shards coincide with the student's, so it alone serves full-vocabulary objectives.
- `own_layout`: a megatron teacher with its own TP/PP (and DP) on its own process groups over the same ranks,
  time-shared with the student (`own_layout.OwnLayoutTeacherScorer`); top-k / entropy / sampled-token log-probs.
- `sglang`: SGLang teacher servers (registered by `rollout/sglang_scoring.py` through `register_scorer`).
- `megatron` (default): `same_layout` when the teacher's sizes equal the student's (or are 0), else `own_layout`.

Routing: a sample's route tag is its prompt row's `data.route_field` value (a JSONL field; for reasoning-gym rows
`source_dataset`, the task name). A tag listed in a teacher's `routes` goes to that teacher; any other tag (or a
row without the field) goes to the default teacher, the one whose `routes` is empty; without a default teacher such
a tag is unroutable and the run stops at start-up. Each rollout row carries its teacher index (`RolloutBatch.routes`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_tropd.config import ConfigError
from megatron_tropd.config.schema import Config, TeacherConfig, all_teachers
from megatron_tropd.distributed.parallel import ParallelGroups
from megatron_tropd.models.arch import ModelArch, check_layout
from megatron_tropd.objectives import Requirements
from megatron_tropd.training.batch import RolloutBatch
from megatron_tropd.training.scoring import TeacherScorer, TeacherTokens

log = logging.getLogger("tropd")


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher, resolved from its config section: what builds it and in which layout."""

    index: int  # position in the run's teacher list (the value of RolloutBatch.routes for its rows)
    key: str  # its config key: teacher | teachers[i]
    cfg: TeacherConfig
    kind: str  # same_layout | own_layout | sglang
    tp: int  # its tensor / pipeline parallel sizes (the student's for same_layout)
    pp: int

    @property
    def name(self) -> str:
        return self.cfg.name

    def describe(self, world: int) -> str:
        if self.kind == "sglang":
            return f"{self.name}: SGLang teacher servers"
        return f"{self.name}: {self.kind.replace('_', '-')} megatron teacher TP={self.tp} PP={self.pp} " \
               f"DP={world // (self.tp * self.pp)}"


# ------------------------------------------------------------------------------------------------ external scorers
@dataclass(frozen=True)
class ExternalScorer:
    """A scorer kind that does not build a megatron teacher on the trainer ranks (SGLang servers).

    check(cfg, spec, req, objective_name): raise ConfigError (one line) when it cannot serve the run, before models
    load. build(context) -> TeacherScorer: called on every rank by `build_run` with a dict of what the run has built
    (cfg, spec, groups, engines, score options, vocab, pad id)."""

    check: Callable[[Config, TeacherSpec, Requirements, str], None]
    build: Callable[[dict], TeacherScorer]


EXTERNAL_SCORERS: dict[str, ExternalScorer] = {}
# The module that registers each external kind when imported (imported on first use, so nothing else has to).
EXTERNAL_MODULES = {"sglang": "megatron_tropd.rollout.sglang_scoring"}


def register_scorer(kind: str, scorer: ExternalScorer) -> None:
    """Plug a scorer kind in behind the seam (e.g. `register_scorer("sglang", ...)` in rollout/sglang_scoring.py)."""
    EXTERNAL_SCORERS[kind] = scorer


def external_scorer(kind: str) -> ExternalScorer | None:
    """The registered scorer of `kind`, importing its module (EXTERNAL_MODULES) first; None when there is none."""
    if kind not in EXTERNAL_SCORERS and kind in EXTERNAL_MODULES:
        import importlib

        try:
            importlib.import_module(EXTERNAL_MODULES[kind])
        except ImportError:
            return None
    return EXTERNAL_SCORERS.get(kind)


# ------------------------------------------------------------------------------------------------ start-up checks
def teacher_specs(cfg: Config, world: int) -> list[TeacherSpec]:
    """Every teacher's scorer kind and layout, checked against the student's layout and the number of ranks."""
    stp, spp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    out = []
    for index, (key, t) in enumerate(all_teachers(cfg)):
        tp, pp = t.tensor_model_parallel_size or stp, t.pipeline_model_parallel_size or spp
        kind = t.scorer
        if kind == "megatron":
            kind = "same_layout" if (tp, pp) == (stp, spp) else "own_layout"
        if kind == "sglang":
            if t.tensor_model_parallel_size or t.pipeline_model_parallel_size:
                raise ConfigError(f"{key}.tensor_model_parallel_size / pipeline_model_parallel_size set the layout of "
                                  f"a megatron teacher; {key}.scorer=sglang scores on servers sized by sglang.tp_size: "
                                  f"leave them 0")
            out.append(TeacherSpec(index, key, t, kind, 0, 0))
            continue
        if kind == "same_layout" and (tp, pp) != (stp, spp):
            raise ConfigError(f"{key}.scorer=same_layout runs the teacher in the student's layout (TP={stp} PP={spp}), "
                              f"but {key}.tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp}; set "
                              f"{key}.scorer=own_layout (or megatron) for a layout of its own, or leave the sizes 0")
        if world % (tp * pp):
            raise ConfigError(f"{key}.tensor_model_parallel_size={tp} x {key}.pipeline_model_parallel_size={pp} = "
                              f"{tp * pp} does not divide the {world} ranks of this job; choose teacher sizes whose "
                              f"product divides {world} (teacher DP = ranks / (TP x PP))")
        out.append(TeacherSpec(index, key, t, kind, tp, pp))
    return out


def check_teacher_layout(spec: TeacherSpec, arch: ModelArch) -> None:
    """The teacher's TP/PP against its architecture (heads, KV heads, layers): ConfigError naming its keys."""
    if spec.kind == "sglang":
        return
    try:
        check_layout(arch, spec.tp, spec.pp, role=f"{spec.key} ({spec.cfg.path})")
    except ValueError as e:
        where = (f"{spec.key}.tensor_model_parallel_size={spec.tp}, {spec.key}.pipeline_model_parallel_size={spec.pp}"
                 if spec.kind == "own_layout" else f"parallel.tensor_model_parallel_size={spec.tp}, "
                 f"parallel.pipeline_model_parallel_size={spec.pp}")
        raise ConfigError(f"{where}: {e}") from None


def full_vocab_needs(req: Requirements) -> str | None:
    """What in `req` needs the teacher's full logits shard inside the student's micro-batch (None: nothing)."""
    if req.full_vocab_kl is not None:
        return f"the full-vocabulary {req.full_vocab_kl} divergence"
    offline = getattr(req, "offline_kl", None)  # offline distillation's dense term on teacher-written tokens
    if offline is not None:
        return f"the full-vocabulary {offline} divergence on teacher-written rollouts (offline distillation)"
    return None


def check_serves(cfg: Config, specs: list[TeacherSpec], req: Requirements, objective_name: str) -> None:
    """Each teacher's scorer can serve the objective's requirements (ConfigError, one line, before models load)."""
    needs = full_vocab_needs(req)
    if needs and len(specs) > 1:
        raise ConfigError(f"objective.name={objective_name!r} needs {needs}, computed from the teacher's logits "
                          f"shard inside the student's micro-batch: one teacher only; remove teachers: (got "
                          f"{len(specs)} teachers)")
    for spec in specs:
        if spec.kind == "own_layout" and needs:
            raise ConfigError(f"{spec.key}.scorer=own_layout (TP={spec.tp} PP={spec.pp}) cannot serve "
                              f"objective.name={objective_name!r}: it needs {needs}, which needs the teacher's logits "
                              f"shard aligned with the student's; use {spec.key}.scorer=same_layout (the student's "
                              f"TP/PP), or an objective on top-k / sampled-token log-probs")
        if spec.kind == "sglang":
            ext = external_scorer("sglang")
            if ext is None:
                raise ConfigError(f"{spec.key}.scorer=sglang: the SGLang teacher scorer is not available in this "
                                  f"build; use {spec.key}.scorer=megatron")
            ext.check(cfg, spec, req, objective_name)


# ------------------------------------------------------------------------------------------------ routing
class Router:
    """Prompt -> teacher index, from the prompt row's route tag (`data.route_field`)."""

    def __init__(self, specs: list[TeacherSpec], route_field: str):
        self.specs, self.field = specs, route_field
        self.table = {tag: s.index for s in specs for tag in s.cfg.routes}
        defaults = [s.index for s in specs if not s.cfg.routes]
        self.default = defaults[0] if defaults else None

    def tag(self, prompt) -> str | None:
        value = (prompt.metadata or {}).get(self.field)
        return None if value is None else str(value)

    def route(self, prompt) -> int:
        tag = self.tag(prompt)
        index = self.table.get(tag, self.default) if tag is not None else self.default
        if index is None:
            raise ConfigError(self._unroutable(tag, prompt))
        return index

    def check(self, prompts: list) -> dict[str, int]:
        """Every prompt routes somewhere (else ConfigError naming the first unroutable tag). Returns how many
        prompts each teacher gets (by name); a teacher with no prompt is logged."""
        counts = {s.name: 0 for s in self.specs}
        for p in prompts:
            counts[self.specs[self.route(p)].name] += 1
        if len(self.specs) > 1:
            idle = [n for n, c in counts.items() if c == 0]
            if idle:
                log.warning(f"teacher(s) {idle} get no prompt: no row has a {self.field!r} value in their routes")
        return counts

    def _unroutable(self, tag, prompt) -> str:
        where = prompt.metadata.get("source", f"prompt {prompt.id}") if prompt.metadata else f"prompt {prompt.id}"
        what = f"route tag {tag!r}" if tag is not None else f"no {self.field!r} field"
        return (f"data.route_field={self.field!r}: {where} has {what}, which no teacher's routes list "
                f"({sorted(self.table)}) and there is no default teacher; add it to a teacher's routes or leave "
                f"one teacher's routes empty (it then scores every other sample)")


# ------------------------------------------------------------------------------------------------ the routed scorer
class RoutedTeacherScorer:
    """Several teachers behind the one seam: each scores only its rows (`RolloutBatch.routes`), the results are
    scattered back into the micro-batches' order.

    A teacher's rows of this rank are regrouped into micro-batches of the caller's size (the last one padded with
    repeats of its last row, whose scores are dropped), so pipelined schedules keep equal shapes. Every teacher's
    `score` is called on every rank, with an empty list when this rank has none of its rows: scorers that
    communicate beyond the pipeline (own layout: the world) stay collective."""

    def __init__(self, names: list[str], scorers: list[TeacherScorer], groups: ParallelGroups):
        if len(names) != len(scorers):
            raise ValueError("one name per teacher scorer")
        self.names, self.scorers, self.groups = list(names), list(scorers), groups
        if all(getattr(s, "micro_batch_logits", None) is not None for s in self.scorers):
            self.micro_batch_logits = self._routed_logits  # every teacher in the student's layout

    @property
    def capabilities(self) -> dict:
        """What every teacher can serve (servers give no full-vocabulary entropy)."""
        return {"entropy": all(getattr(s, "capabilities", {}).get("entropy", True) for s in self.scorers)}

    @torch.no_grad()
    def _routed_logits(self, micro_batch: RolloutBatch) -> torch.Tensor | None:
        """Each row's logits shard [b, s, V_padded/tp] from its routed teacher (same-layout teachers only; each
        teacher with rows in the micro-batch runs once on it), on the last stage (None elsewhere)."""
        out = None
        for index, scorer in enumerate(self.scorers):
            rows = micro_batch.routes == index
            if not bool(rows.any()):
                continue
            logits = scorer.micro_batch_logits(micro_batch)
            if logits is None:
                continue
            if out is None:
                out = logits.clone()
            out[rows.to(out.device)] = logits[rows.to(logits.device)]
        return out

    @torch.no_grad()
    def score(self, micro_batches: list[RolloutBatch], req: Requirements) -> list[TeacherTokens]:
        if full_vocab_needs(req):
            raise ValueError("full-vocabulary objectives score with one teacher (see teachers.check_serves)")
        size = micro_batches[0].size if micro_batches else 1
        per_teacher = []
        for index, scorer in enumerate(self.scorers):
            rows = [(j, r) for j, mb in enumerate(micro_batches) for r in range(mb.size)
                    if int(mb.routes[r]) == index]
            sub = _regroup(micro_batches, rows, size)
            per_teacher.append((rows, scorer.score(sub, req)))
        if not self.groups.is_last_stage:
            return []
        found: dict[tuple[int, int], tuple[TeacherTokens, int]] = {}
        for rows, outs in per_teacher:
            for n, key in enumerate(rows):
                found[key] = (outs[n // size], n % size)
        return [_stack([found[(j, r)] for r in range(mb.size)]) for j, mb in enumerate(micro_batches)]


def _regroup(micro_batches: list[RolloutBatch], rows: list[tuple[int, int]], size: int) -> list[RolloutBatch]:
    """Micro-batches of `size` rows holding `rows` ((micro-batch, row) pairs) in order; the last is padded."""
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        chunk = chunk + [chunk[-1]] * (size - len(chunk))
        parts = [micro_batches[j].select(slice(r, r + 1)) for j, r in chunk]
        out.append(RolloutBatch.concat(parts))
    return out


def _stack(rows: list[tuple[TeacherTokens, int]]) -> TeacherTokens:
    """One micro-batch's TeacherTokens from (teacher output, row) pairs."""
    def col(name):
        values = [getattr(t, name) for t, _ in rows]
        if any(v is None for v in values):
            if not all(v is None for v in values):
                raise ValueError(f"teachers disagree on whether they return {name}")
            return None
        return torch.stack([v[r] for v, (_, r) in zip(values, rows)])

    return TeacherTokens(lp_t=col("lp_t"), tk_lp=col("tk_lp"), tk_ids=col("tk_ids"), ent_t=col("ent_t"))


# ------------------------------------------------------------------------------------------------ building
def build_megatron_scorer(spec: TeacherSpec, arch: ModelArch, load_for: Callable, student_groups: ParallelGroups,
                          opts, micro_batch_size: int, sequence_parallel: bool = False,
                          group_cache: dict | None = None) -> TeacherScorer:
    """A same-layout or own-layout megatron teacher scorer (collective: every rank, in teacher order).

    load_for(groups) -> the weight loader of this teacher for a model built on `groups`. Own layouts of equal
    sizes share one set of process groups (`group_cache`)."""
    from megatron_tropd.distributed.parallel import build_groups
    from megatron_tropd.training.own_layout import OwnLayoutTeacherScorer
    from megatron_tropd.training.roles import build_teacher
    from megatron_tropd.training.scoring import MegatronTeacherScorer

    sp = sequence_parallel and spec.tp > 1
    if spec.kind == "same_layout":
        teacher = build_teacher(arch, student_groups, load_for(student_groups), dtype=spec.cfg.dtype,
                                sequence_parallel=sp)
        return MegatronTeacherScorer(teacher, student_groups, opts)
    if spec.kind != "own_layout":
        raise ValueError(f"{spec.key}: {spec.kind} is not a megatron teacher")
    cache = group_cache if group_cache is not None else {}
    if (spec.tp, spec.pp) not in cache:
        cache[(spec.tp, spec.pp)] = build_groups(spec.tp, spec.pp)
    groups = cache[(spec.tp, spec.pp)]
    teacher = build_teacher(arch, groups, load_for(groups), dtype=spec.cfg.dtype, sequence_parallel=sp)
    return OwnLayoutTeacherScorer(teacher, groups, student_groups, opts,
                                  micro_batch_size=spec.cfg.micro_batch_size or micro_batch_size,
                                  offload=spec.cfg.offload)


def compose(specs: list[TeacherSpec], scorers: list[TeacherScorer], groups: ParallelGroups) -> TeacherScorer:
    """The run's one TeacherScorer: the teacher itself, or a RoutedTeacherScorer over several."""
    if len(scorers) == 1:
        return scorers[0]
    return RoutedTeacherScorer([s.name for s in specs], scorers, groups)


def with_score_options(scorer: TeacherScorer, opts) -> TeacherScorer:
    """The same teacher(s) scoring at other ScoreOptions (the held-out evaluation's temperature): a shallow copy
    sharing the models and groups. A scorer without `opts` (servers) is returned as it is when its `temperature`
    is the one asked for, else ValueError."""
    import copy

    if isinstance(scorer, RoutedTeacherScorer):
        out = copy.copy(scorer)
        out.scorers = [with_score_options(s, opts) for s in scorer.scorers]
        return out
    current = getattr(scorer, "opts", None)
    if current == opts:
        return scorer
    if current is None:
        if getattr(scorer, "temperature", None) == opts.temperature:
            return scorer
        raise ValueError(f"{type(scorer).__name__} scores at temperature {getattr(scorer, 'temperature', None)}, not "
                         f"at the held-out evaluation's {opts.temperature}; set eval.temperature to "
                         f"rollout.temperature")
    out = copy.copy(scorer)
    out.opts = opts
    return out
