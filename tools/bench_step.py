#!/usr/bin/env python
"""Our full distillation step against TRL's on-policy distillation trainers: same pair, prompts, batch, machine.

    python tools/bench_step.py --setup-trl        # first time: build .venv-trl (TRL peer, pinned), then benchmark
    python tools/bench_step.py                    # all systems, 6 steps each, medians of steps 2..6
    python tools/bench_step.py --systems ours_tropd trl_distillation --steps 4 --micro-batch 12

One run measures, one after the other: a float32 matmul peak (2048 x 2048, best of several), then each system for
--steps optimizer steps, then the matmul peak again (a drift check for a shared machine). Every system does the
same work per optimizer step: the same prompts (3 prompts x 4 samples, reasoning-gym basic_arithmetic, the chat
template and system prompt of examples/configs/smollm2_tropd_cpu.yaml), at most 32 new tokens sampled at
temperature 1 by the student, teacher SmolLM2-135M-Instruct, student its 6-layer every-5th cut, float32.

Systems
    ours_full_jsd       full-vocabulary JSD (beta 0.5), on-policy: objective full_vocab, full_vocab_kind jsd
    ours_tropd_noguide  TrOPD defaults without teacher prefixes (guidance.enabled=false)
    ours_tropd          TrOPD defaults with teacher prefixes (guidance as in the example config)
    trl_gkd             TRL GKDTrainer, lmbda 1 (fully on-policy), beta 0.5            (needs .venv-trl)
    trl_distillation    TRL DistillationTrainer, beta 0.5 (JSD), on-policy             (needs .venv-trl)
Ours runs in this process through the project's API: `build_run(cfg)` once per system, then the trainer's own
`train_step(run, step)` (rollout, teacher scoring, update, weight sync) for every step;
TRL runs in its own virtualenv (`--setup-trl` creates it; it is a benchmark peer, not a dependency) through
tools/bench_trl_peer.py. Without that venv the TRL systems are reported as skipped, with the reason.

Reported per system (medians over steps 2..N; step 1 is warm-up): s/step, response tokens/s (response tokens of
the step / step time), the phase breakdown (rollout, teacher scoring, student old log-probs, update = forward +
backward + optimizer, weight sync, other), FLOPs per step counted analytically from the step's real shapes, and
MFU = FLOP/s / measured matmul peak, twice: on the FLOPs the system executes (padding, repeated passes and output
layers included: how hard the kernels run) and on the model FLOPs of the work itself (the same formula for every
system: how much of the machine reaches the result). Prints a table and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "examples" / "configs" / "smollm2_tropd_cpu.yaml"
TRL_REQUIREMENTS = ROOT / "tools" / "requirements-bench-trl.txt"
TRL_PEER = ROOT / "tools" / "bench_trl_peer.py"
DEFAULT_TRL_VENV = ROOT / ".venv-trl"
SCHEMA_VERSION = 1

# name -> (label, config overrides). Shared overrides (batch, tokens, steps, ...) come from the command line.
OURS = {
    "ours_full_jsd": ("ours, full-vocabulary JSD beta 0.5, on-policy",
                      ["objective.name=full_vocab", "objective.full_vocab_kind=jsd", "objective.jsd_beta=0.5",
                       "guidance.enabled=false"]),
    "ours_tropd_noguide": ("ours, TrOPD, no guidance", ["objective.name=tropd", "guidance.enabled=false"]),
    "ours_tropd": ("ours, TrOPD with guidance (teacher prefixes)", ["objective.name=tropd", "guidance.enabled=true"]),
}
TRL = {
    "trl_gkd": ("TRL GKDTrainer (lmbda 1, beta 0.5)", "gkd"),
    "trl_distillation": ("TRL DistillationTrainer (JSD beta 0.5, on-policy)", "distillation"),
}
PHASES = ("rollout", "teacher_scoring", "student_old", "update", "weight_sync", "other")
REFERENCE = "trl_distillation"  # ratios in the table are against this system's s/step


# ----------------------------------------------------------------------------------------------------------------
# Analytic FLOPs


@dataclass(frozen=True)
class Dims:
    """Matmul shapes of a Llama-family decoder (from its HF config.json)."""

    layers: int
    hidden: int
    q_dim: int  # heads * head_dim
    kv_dim: int  # kv heads * head_dim
    ffn: int
    vocab: int  # the real vocabulary: the output layer's rows

    @classmethod
    def from_hf(cls, hf_dir: str | Path) -> "Dims":
        c = json.loads((Path(hf_dir) / "config.json").read_text())
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        return cls(layers=c["num_hidden_layers"], hidden=c["hidden_size"], q_dim=c["num_attention_heads"] * head_dim,
                   kv_dim=c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim,
                   ffn=c["intermediate_size"], vocab=c["vocab_size"])

    @property
    def body_params(self) -> int:
        """Matmul parameters of the transformer layers (q, k, v, o projections and the SwiGLU MLP)."""
        return self.layers * (self.hidden * (2 * self.q_dim + 2 * self.kv_dim) + 3 * self.hidden * self.ffn)

    def forward(self, tokens: float, head_tokens: float, attn_pairs: float) -> float:
        """Forward FLOPs: 2 per matmul parameter per token, the output layer (2 * hidden * V) on `head_tokens`
        positions, and attention (QK^T and AV: 4 * q_dim per query-key pair per layer)."""
        return (2.0 * self.body_params * tokens + 2.0 * self.hidden * self.vocab * head_tokens
                + 4.0 * self.layers * self.q_dim * attn_pairs)

    def head(self, positions: float) -> float:
        """One output-layer projection (hidden x V matmul) on `positions` rows."""
        return 2.0 * self.hidden * self.vocab * positions


def tri(n: float) -> float:
    """Query-key pairs of causal attention over n tokens."""
    return n * (n + 1) / 2.0


def generate_flops(d: Dims, contexts: list[int], generated: list[int], drop_finished: bool) -> float:
    """One batched, KV-cached, left-padded generate call: a prefill over the padded context width (output layer on
    the last position), then one token per decode step. `drop_finished`: finished rows leave the batch (our
    embedded engine) instead of decoding padding until the longest row ends (transformers' `generate`)."""
    rows = [(c, g) for c, g in zip(contexts, generated) if g > 0]
    if not rows:
        return 0.0
    width = max(c for c, _ in rows)
    longest = max(g for _, g in rows)
    total = d.forward(len(rows) * width, len(rows), len(rows) * tri(width))
    for _, g in rows:
        steps = (g if drop_finished else longest) - 1  # decode steps after the prefill's first token
        total += d.forward(steps, steps, steps * width + tri(steps))
    return total


def model_flops(student: Dims, teacher: Dims, samples: list[dict]) -> float:
    """The work itself, the same for every system: generation with a KV cache (teacher prefixes by the teacher), one
    teacher forward and one student forward + backward (3x) over prompt + response, the output layer only where a
    response token is predicted. Padding, repeated passes and prompt-position output layers are not counted."""
    total = 0.0
    for s in samples:
        p, r, l = s["prompt_len"], s["response_len"], s.get("prefix_len", 0)
        n = p + r - 1  # model inputs
        if l > 0:
            total += teacher.forward(p + l - 1, l, tri(p + l - 1))
        if r - l > 0:
            total += student.forward(n, r - l, tri(n))
        total += teacher.forward(n, r, tri(n)) + 3.0 * student.forward(n, r, tri(n))
    return total


def ours_executed_flops(student: Dims, teacher: Dims, rec: dict, full_vocab: bool) -> dict[str, float]:
    """What our step runs: the embedded engine's generate calls, then the teacher and student passes with the body
    on the positions the step reports (`throughput/body_positions`, `/attention_pairs`; the padded batch in older
    JSON files) and the output layer on its response positions (`throughput/logit_positions`; every position in
    older JSON files), as many as the step reports
    (`passes/teacher`: teacher forwards per token, 1 when the teacher is fused into the update;
    `passes/old_logprobs`: 0 when lp_old comes from the training forward), and the update (3x forward)."""
    samples, b, w = rec["samples"], rec["batch_rows"], rec["batch_width"]
    prefixed = [s for s in samples if s.get("prefix_len", 0) > 0]
    rollout = generate_flops(teacher, [s["prompt_len"] for s in prefixed], [s["prefix_len"] for s in prefixed], True)
    students = [s for s in samples if s["response_len"] > s.get("prefix_len", 0)]
    rollout += generate_flops(student, [s["prompt_len"] + s.get("prefix_len", 0) for s in students],
                              [s["response_len"] - s.get("prefix_len", 0) for s in students], True)
    passes = rec.get("passes") or {"teacher": 1.0 + float(full_vocab), "old_logprobs": 1.0}  # older JSON files
    head = passes.get("logit_positions", b * w)
    # the body over the micro-batches as run (trimmed, packed: throughput/body_positions, /attention_pairs); the
    # padded batch in older JSON files (an upper bound)
    body, pairs = passes.get("body_positions", b * w), passes.get("attention_pairs", b * tri(w))
    t_pass = teacher.forward(body, head, pairs)
    s_pass = student.forward(body, head, pairs)
    return {"rollout": rollout, "teacher_scoring": passes["teacher"] * t_pass,
            "student_old": passes["old_logprobs"] * s_pass, "update": 3.0 * s_pass}


def trl_executed_flops(student: Dims, teacher: Dims, step: dict, trainer: str) -> dict[str, float]:
    """What TRL 1.16 runs, from the shapes of its `generate` calls. transformers' `generate` decodes every row until
    the longest one ends. GKDTrainer (per micro-batch) runs both models on prompt + generated width with full
    logits on every position. DistillationTrainer runs both backbones on prompt + completion width and projects
    only completion positions, chunked: 2 projections per model in the forward (statistics, then JSD), one more of
    each in the backward, plus 2 gradient matmuls for the student head."""
    rollout = teacher_f = update = 0.0
    calls = step["generate_calls"]
    for c in calls:
        rollout += generate_flops(student, [c["prompt_width"]] * c["rows"], [c["new_width"]] * c["rows"], False)
    if trainer == "gkd":
        for c in calls:
            n, w = c["rows"], c["prompt_width"] + c["new_width"]
            teacher_f += teacher.forward(n * w, n * w, n * tri(w))
            update += 3.0 * student.forward(n * w, n * w, n * tri(w))
    else:
        n = sum(c["rows"] for c in calls)
        pw = max(c["prompt_width"] for c in calls)
        cw = max(max(c["completion_lens"]) for c in calls)
        w = pw + cw
        body_t = teacher.forward(n * w, 0, n * tri(w))
        body_s = student.forward(n * w, 0, n * tri(w))
        teacher_f += body_t
        update += 3.0 * body_s + 5.0 * student.head(n * cw) + 3.0 * teacher.head(n * cw)
    return {"rollout": rollout, "teacher_scoring": teacher_f, "student_old": 0.0, "update": update}


# ----------------------------------------------------------------------------------------------------------------
# Matmul peak


def matmul_peak(n: int = 2048, repeats: int = 5, inner: int = 3) -> dict:
    """Best float32 GFLOP/s of an n x n @ n x n matmul (`inner` back-to-back, best of `repeats`), per second of
    wall time and per second of process CPU time (all threads: with one thread, the latter ignores time the
    process spent waiting for a core on a shared machine)."""
    import torch

    a = torch.randn(n, n, dtype=torch.float32)
    b = torch.randn(n, n, dtype=torch.float32)
    out = torch.empty(n, n, dtype=torch.float32)
    torch.mm(a, b, out=out)  # warm-up
    best = best_cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        best = min(best, (time.perf_counter() - t0) / inner)
        best_cpu = min(best_cpu, (time.process_time() - c0) / inner)
    return {"n": n, "best_s": best, "best_cpu_s": best_cpu, "gflops": 2.0 * n ** 3 / best / 1e9,
            "gflops_per_cpu_s": 2.0 * n ** 3 / best_cpu / 1e9, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------------------------
# Phase timing


class PhaseClock:
    """Wall and process-CPU seconds per phase within one step. Phases nest: `inside` is the innermost open one."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._stack: list[str] = []

    @property
    def inside(self) -> str | None:
        return self._stack[-1] if self._stack else None

    @contextlib.contextmanager
    def phase(self, name: str):
        _sync()
        self._stack.append(name)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            _sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0
            self._stack.pop()

    def wrap(self, name: str, fn, only_inside: str | None = None, keep: dict | None = None):
        """`fn` timed as phase `name` (when `only_inside` is given: only calls made inside that phase); `keep`
        receives its last result under `name`."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if only_inside is not None and self.inside != only_inside:
                return fn(*args, **kwargs)
            with self.phase(name):
                out = fn(*args, **kwargs)
            if keep is not None:
                keep[name] = out
            return out

        return timed

    def reset(self) -> None:
        self.seconds, self.cpu = {}, {}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def patched(obj, name: str, wrapper, missing: list[str]):
    """Replace attribute `name` of `obj` by `wrapper(original)` for the block (the benchmark's phase timers). An
    absent attribute (the step's structure changed) is noted in `missing` and left alone."""
    if not hasattr(obj, name):
        missing.append(f"{getattr(obj, '__name__', type(obj).__name__)}.{name}")
        yield
        return
    original = getattr(obj, name)
    setattr(obj, name, wrapper(original))
    try:
        yield
    finally:
        setattr(obj, name, original)


# ----------------------------------------------------------------------------------------------------------------
# Ours


BENCH_STUDENT = "builtin:smollm2-135m-instruct:every5"  # 6 of 30 layers (docs/performance.md)


def load_bench_config(overrides: list[str], args):
    from megatron_tropd.config import load_config

    shared = [f"rollout.prompts_per_step={args.prompts}", f"rollout.samples_per_prompt={args.samples}",
              f"rollout.max_new_tokens={args.max_new_tokens}", "rollout.temperature=1.0", "rollout.top_p=1.0",
              "rollout.engine=embedded", f"optim.micro_batch_size={args.micro_batch}", f"train.steps={args.steps}",
              "train.tensorboard=false", "train.progress=false", "student.dtype=float32", "teacher.dtype=float32",
              "rollout.engine_dtype=float32", "optim.updates_per_batch=1", "optim.minibatches_per_update=1"]
    # the benchmark's own pair (the example config's student is the pruned 15-layer one of the main job)
    shared.append(f"student.path={args.student or BENCH_STUDENT}")
    if args.teacher:
        shared.append(f"teacher.path={args.teacher}")
    return load_config(CONFIG, shared + list(overrides) + list(args.override))


def bench_inputs(cfg, n_steps: int):
    """The run's start-up checks (model dirs, tokenizer, prompt data: what `build_run` resolves) and the prompts of
    steps 0..n-1, exactly as the trainer's sampler draws them (one list per step)."""
    from megatron_tropd.data import PromptSampler
    from megatron_tropd.training.preflight import preflight

    inputs = preflight(cfg)
    sampler = PromptSampler(inputs.dataset.train, cfg.rollout.prompts_per_step, seed=cfg.data.seed)
    return inputs, [sampler.next_batch() for _ in range(n_steps)]


def run_ours(name: str, args) -> dict:
    """`args.steps` steps of the trainer's own `train_step` (rollout, teacher scoring, update, weight sync) on a
    `Run` from `build_run`, phase-timed by wrapping the calls the step makes (looked up in its modules at call
    time; per-phase `time/...` metrics the step exports take precedence, see STEP_TIMERS)."""
    import torch

    from megatron_tropd.distributed import parallel
    from megatron_tropd.training import loop as loop_module
    from megatron_tropd.training import step as step_module
    from megatron_tropd.training.run import build_run

    label, overrides = OURS[name]
    clock, seen, steps, missing = PhaseClock(), {}, [], []
    with tempfile.TemporaryDirectory(prefix="bench_step_run_") as run_dir:
        cfg = load_bench_config(overrides + [f"train.run_dir={run_dir}"], args)
        t_load = time.perf_counter()
        run = build_run(cfg)
        load_s = time.perf_counter() - t_load
        full_vocab = run.objective.requirements.full_vocab_kl is not None
        try:
            with contextlib.ExitStack() as timers:
                def timer(obj, attr: str, phase: str, **kw) -> None:
                    timers.enter_context(patched(obj, attr, lambda f: clock.wrap(phase, f, **kw), missing))

                timer(loop_module, "collect_rollouts", "rollout", keep=seen)
                timer(loop_module, "build_batch", "batch", keep=seen)
                timer(loop_module, "distill_step", "distill_step")
                timer(loop_module, "sync_weights", "weight_sync")
                timer(run.teacher, "score", "teacher_pass")
                timer(step_module, "score_student_old", "student_old")
                # teacher forwards inside the update: the full-vocabulary objectives' second teacher pass
                teacher_model = getattr(getattr(run.teacher, "teacher", None), "model", None)
                if teacher_model is not None:
                    timer(teacher_model, "forward", "update_teacher_forward", only_inside="distill_step")
                if "teacher" in run.engines:
                    timer(run.engines["teacher"], "generate", "rollout_teacher_prefix")
                for step in range(cfg.train.steps):
                    clock.reset()
                    load_before = os.getloadavg()[0]
                    t0, c0 = time.perf_counter(), time.process_time()
                    metrics = loop_module.train_step(run, step)
                    step_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
                    samples = seen["rollout"].samples  # training.overlap.Rollouts
                    steps.append(_ours_record(step_s, cpu_s, clock, samples, seen["batch"], metrics, load_before,
                                              missing))
        finally:
            run.close()
            del run
            gc.collect()
            parallel.destroy()
    return {"label": label, "kind": "ours", "overrides": overrides, "load_s": load_s, "steps": steps,
            "micro_batch": cfg.optim.micro_batch_size, "full_vocab": full_vocab, "threads": torch.get_num_threads()}


# Per-phase seconds the step may export in its metrics (preferred over the benchmark's wrappers when present).
# The names are the ones training/loop.py and training/step.py export (time/teacher_s: the stand-alone teacher
# pass, ~0 when the teacher is fused into the update; time/old_logprobs_s: likewise for the old log-probs).
STEP_TIMERS = {"rollout": "time/rollout_s", "teacher_pass": "time/teacher_s", "student_old": "time/old_logprobs_s"}


def _phases(sec: dict, total: float) -> tuple[dict, dict]:
    """Top-level phases (update = the step's time outside its two scoring passes; other = the rest of the step)
    and sub-phases, from the clock's per-call seconds."""
    distill = sec.get("distill_step", 0.0)
    # all teacher forward time: the stand-alone pass plus the teacher forwards inside the update (a fused pass, or
    # a full-vocabulary objective's second pass), so the phase means the same with and without fusion
    teacher = sec.get("teacher_pass", 0.0) + sec.get("update_teacher_forward", 0.0)
    phases = {
        "rollout": sec.get("rollout", 0.0),
        "teacher_scoring": teacher,
        "student_old": sec.get("student_old", 0.0),
        "update": max(distill - teacher - sec.get("student_old", 0.0), 0.0),
        "weight_sync": sec.get("weight_sync", 0.0),
    }
    phases["other"] = max(total - sum(phases.values()), 0.0)
    sub = {"rollout_teacher_prefix": sec.get("rollout_teacher_prefix", 0.0),
           "update_teacher_forward": sec.get("update_teacher_forward", 0.0), "batch": sec.get("batch", 0.0)}
    return phases, sub


def _ours_record(step_s: float, cpu_s: float, clock: PhaseClock, samples, batch, metrics: dict, load_before: float,
                 missing: list[str]) -> dict:
    sec, cpu = dict(clock.seconds), dict(clock.cpu)
    exported = {phase: float(metrics[key]) for phase, key in STEP_TIMERS.items() if key in metrics}
    sec.update(exported)  # wall seconds; the CPU split stays the wrappers' (if any)
    unmeasured = [p for p in ("teacher_pass", "student_old") if p not in sec]
    if unmeasured and missing:
        raise RuntimeError(f"bench_step: cannot time {unmeasured}: the step exports none of "
                           f"{[STEP_TIMERS[p] for p in unmeasured]} and the calls the benchmark wraps are gone "
                           f"({missing}); update the phase timers in tools/bench_step.py")
    phases, sub = _phases(sec, step_s)
    phases_cpu, sub_cpu = _phases(cpu, cpu_s)
    recs = [{"prompt_len": len(s.prompt_ids), "response_len": len(s.response_ids), "prefix_len": s.prefix_len}
            for s in samples]
    return {"step_s": step_s, "cpu_s": cpu_s, "phases": phases, "subphases": sub, "phases_cpu": phases_cpu,
            "subphases_cpu": sub_cpu, "samples": recs,
            "response_tokens": sum(r["response_len"] for r in recs), "batch_rows": batch.size,
            "batch_width": int(batch.inputs.shape[1]), "loadavg_1m_before": load_before,
            "step_time_metrics": {k: v for k, v in metrics.items() if k.startswith("time/")},
            "passes": {"teacher": float(metrics["passes/teacher"]),
                       "old_logprobs": float(metrics["passes/old_logprobs"]),
                       "logit_positions": float(metrics.get("throughput/logit_positions", batch.inputs.numel())),
                       "body_positions": float(metrics.get("throughput/body_positions", batch.inputs.numel())),
                       "attention_pairs": float(metrics.get("throughput/attention_pairs",
                                                            batch.size * tri(batch.inputs.shape[1])))},
            "timing_source": {p: "step metrics" if p in exported else "bench wrappers" for p in STEP_TIMERS},
            "loss": float(metrics.get("loss", float("nan")))}


# ----------------------------------------------------------------------------------------------------------------
# TRL (its own virtualenv)


SHARED_PACKAGES = ("torch", "transformers", "accelerate", "tokenizers", "safetensors", "numpy")  # must match ours


def trl_stamp() -> str:
    return hashlib.sha256(TRL_REQUIREMENTS.read_bytes()).hexdigest()[:16]


def _versions(python: str | Path, packages: tuple[str, ...]) -> dict[str, str | None]:
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(p):\n    try:\n        return m.version(p)\n    except m.PackageNotFoundError:\n        return None\n"
            "print(json.dumps({p: v(p) for p in sys.argv[1:]}))")
    out = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def trl_venv_status(venv: Path) -> str | None:
    """None when the TRL venv is ready (built from the current pins, and the packages both sides run -- torch,
    transformers, ... -- at this venv's versions), else why not and how to fix it."""
    python = venv / "bin" / "python"
    stamp = venv / ".bench-trl-stamp"
    if not python.is_file():
        return f"no TRL virtualenv at {venv}: run `python tools/bench_step.py --setup-trl` to create it"
    if not stamp.is_file() or stamp.read_text().strip() != trl_stamp():
        return (f"the TRL virtualenv at {venv} was not built from the current {TRL_REQUIREMENTS.name}: rerun with "
                f"--setup-trl to update it")
    theirs, ours = _versions(python, SHARED_PACKAGES), _versions(sys.executable, SHARED_PACKAGES)
    differ = {p: (ours[p], theirs[p]) for p in SHARED_PACKAGES if ours[p] != theirs[p]}
    if differ:
        return (f"the TRL virtualenv at {venv} runs other versions than this one (package: ours, theirs): {differ}; "
                f"rerun with --setup-trl to align it with constraints.txt")
    return None


def setup_trl_venv(venv: Path) -> None:
    """Create (or reuse, while the pins are unchanged) the TRL peer's venv: the pinned TRL stack with the
    project's constraints (torch 2.14.1 from the local wheel cache, the same transformers / accelerate)."""
    if trl_venv_status(venv) is None:
        print(f"[bench] TRL venv ready: {venv}", flush=True)
        return
    print(f"[bench] building the TRL venv at {venv} (a few minutes; torch from the local wheel cache)", flush=True)
    python = os.environ.get("TROPD_PYTHON", "python3.11")
    if not (venv / "bin" / "python").is_file():
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q", "install"]
    subprocess.run(pip + ["-r", str(TRL_REQUIREMENTS), "-c", str(ROOT / "constraints.txt")], check=True)
    check = "import trl, transformers, torch, datasets, accelerate; print(trl.__version__, transformers.__version__, " \
            "torch.__version__)"
    out = subprocess.run([str(venv / "bin" / "python"), "-c", check], check=True, capture_output=True, text=True)
    (venv / ".bench-trl-stamp").write_text(trl_stamp())
    print(f"[bench] TRL venv ready: {venv} (trl, transformers, torch = {out.stdout.strip()})", flush=True)


def run_trl(name: str, args, venv: Path, prompts_per_step: list[list], student_dir: Path, teacher_dir: Path,
            eos_ids: list[int]) -> dict:
    label, trainer = TRL[name]
    steps = [[{"prompt_ids": list(p.token_ids), "text": p.text, "answer": p.answer}
              for p in prompts for _ in range(args.samples)] for prompts in prompts_per_step]
    spec = {"trainer": trainer, "student_dir": str(student_dir), "teacher_dir": str(teacher_dir), "steps": steps,
            "micro_batch": args.micro_batch, "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "beta": 0.5,
            "lr": args.lr, "clip_grad": args.clip_grad, "seed": args.seed, "threads": args.threads,
            "eos_token_ids": eos_ids}
    with tempfile.TemporaryDirectory(prefix="bench_step_trl_") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([str(venv / "bin" / "python"), str(TRL_PEER), "--spec", str(spec_path), "--out",
                               str(out_path)], capture_output=True, text=True, timeout=args.trl_timeout)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
            raise RuntimeError(f"{name}: tools/bench_trl_peer.py failed (exit {proc.returncode}):\n{tail}")
        out = json.loads(out_path.read_text())
    for s in out["steps"]:
        for key in ("phases", "phases_cpu"):
            p = s[key]
            s[key] = {"rollout": p["rollout"], "teacher_scoring": p["teacher_forward"], "student_old": 0.0,
                      "update": p["update"], "weight_sync": 0.0, "other": 0.0}
    return {"label": label, "kind": "trl", **out}


# ----------------------------------------------------------------------------------------------------------------
# Summary


def summarize(name: str, res: dict, student: Dims, teacher: Dims, peak: dict) -> dict:
    """Medians over the timed steps (every step but the first of each run; all steps if a run has only one)."""
    timed = [s for s in res["steps"] if not s["warmup"]]
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    step_s = med([s["step_s"] for s in timed])
    tokens = med([s["response_tokens"] for s in timed])
    executed, model, executed_cpu, model_cpu = [], [], [], []
    for s in timed:
        if res["kind"] == "ours":
            ex = ours_executed_flops(student, teacher, s, res["full_vocab"])
            samples = s["samples"]
        else:
            ex = trl_executed_flops(student, teacher, s, res["trainer"])
            samples = [{"prompt_len": p, "response_len": r} for c in s["generate_calls"]
                       for p, r in zip(c["prompt_lens"], c["completion_lens"])]
        s["flops_executed"] = ex
        s["flops_model"] = model_flops(student, teacher, samples)
        executed.append(sum(ex.values()) / s["step_s"])
        model.append(s["flops_model"] / s["step_s"])
        executed_cpu.append(sum(ex.values()) / s["cpu_s"])
        model_cpu.append(s["flops_model"] / s["cpu_s"])
    summary = {
        "step_s": step_s, "response_tokens_per_step": tokens, "cpu_s": med([s["cpu_s"] for s in timed]),
        "tokens_per_s": med([s["response_tokens"] / s["step_s"] for s in timed]),
        "phases_s": {p: med([s["phases"].get(p, 0.0) for s in timed]) for p in PHASES},
        "phases_cpu_s": {p: med([s["phases_cpu"].get(p, 0.0) for s in timed]) for p in PHASES},
        "gflops_executed_per_step": med([sum(s["flops_executed"].values()) for s in timed]) / 1e9,
        "gflops_model_per_step": med([s["flops_model"] for s in timed]) / 1e9,
        "mfu_executed": med(executed) / 1e9 / peak["gflops"],
        "mfu_model": med(model) / 1e9 / peak["gflops"],
        "mfu_executed_cpu": med(executed_cpu) / 1e9 / peak["gflops_per_cpu_s"],
        "mfu_model_cpu": med(model_cpu) / 1e9 / peak["gflops_per_cpu_s"],
        "steps_timed": len(timed),
    }
    if res["kind"] == "ours":
        summary["subphases_s"] = {k: med([s["subphases"][k] for s in timed]) for k in timed[0]["subphases"]}
        summary["subphases_cpu_s"] = {k: med([s["subphases_cpu"][k] for s in timed])
                                      for k in timed[0]["subphases_cpu"]}
    return summary


def format_table(results: dict, peak: dict, clock: str = "wall") -> str:
    """Markdown table: `clock` "wall" (seconds of wall time) or "cpu" (process CPU seconds, all threads)."""
    ref = results.get(REFERENCE, {}).get("summary")
    wall = clock == "wall"
    step_key, phase_key, suffix = ("step_s", "phases_s", "") if wall else ("cpu_s", "phases_cpu_s", "_cpu")
    cols = ["system", "s/step" if wall else "CPU s/step", "x TRL-D", "resp tok/s" if wall else "resp tok/CPU s",
            "tok/step", "rollout", "teacher", "old lp", "update", "sync", "other", "GFLOP exec", "GFLOP model",
            "MFU exec", "MFU model"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for name, res in results.items():
        s = res.get("summary")
        if s is None:
            lines.append(f"| {name} | skipped: {res.get('skipped', 'failed')} |")
            continue
        t = s[step_key]
        ratio = f"{t / ref[step_key]:.2f}" if ref else "-"
        row = [name, f"{t:.2f}", ratio, f"{s['response_tokens_per_step'] / t:.1f}",
               f"{s['response_tokens_per_step']:.0f}"] + [f"{s[phase_key][p]:.2f}" for p in PHASES]
        row += [f"{s['gflops_executed_per_step']:.0f}", f"{s['gflops_model_per_step']:.0f}",
                f"{100 * s['mfu_executed' + suffix]:.0f}%", f"{100 * s['mfu_model' + suffix]:.0f}%"]
        lines.append("| " + " | ".join(row) + " |")
    unit = (f"wall seconds; MFU against the measured fp32 matmul peak {peak['gflops']:.0f} GFLOP/s" if wall else
            f"process CPU seconds (all threads); MFU against the matmul peak per CPU second "
            f"{peak['gflops_per_cpu_s']:.0f} GFLOP")
    lines.append(f"(medians over the timed steps; phases in {unit}; tokens per {'s' if wall else 'CPU s'} = "
                 "median response tokens / median step time)")
    return "\n".join(lines)


def machine_info() -> dict:
    import torch

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.cuda.is_available(), "python": platform.python_version()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", nargs="+", default=list(OURS) + list(TRL), choices=list(OURS) + list(TRL))
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per system (step 1 is warm-up)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every system this many times, in turn (A B C A B C: spreads a shared machine's load "
                        "drift over all systems); medians over the timed steps of all rounds")
    p.add_argument("--prompts", type=int, default=3, help="prompts per step")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch, every system")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=None, help="torch threads for every system (default: torch's)")
    p.add_argument("--student", default=None, help=f"student HF dir (default: {BENCH_STUDENT})")
    p.add_argument("--teacher", default=None, help="teacher HF dir (default: the example config's builtin)")
    p.add_argument("--override", nargs="*", default=[], help="extra config overrides for our side (key=value)")
    p.add_argument("--peak-size", type=int, default=2048, help="matmul size of the peak measurement")
    p.add_argument("--setup-trl", action="store_true", help="create / update the TRL venv first")
    p.add_argument("--trl-venv", type=Path, default=DEFAULT_TRL_VENV)
    p.add_argument("--trl-timeout", type=float, default=1800.0, help="seconds per TRL system")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_step.json")
    a = p.parse_args(argv)
    if a.steps < 1 or (a.prompts * a.samples) % a.micro_batch:
        p.error(f"--steps must be >= 1 and prompts x samples ({a.prompts * a.samples}) a multiple of --micro-batch")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megatron_tropd.training.cli import quiet_libraries

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = datetime.datetime.now().astimezone()
    load_start = list(os.getloadavg())
    want_trl = [s for s in args.systems if s in TRL]
    if args.setup_trl:
        setup_trl_venv(args.trl_venv)
    trl_absent = trl_venv_status(args.trl_venv) if want_trl else None
    if trl_absent:
        print(f"[bench] TRL systems skipped: {trl_absent}", flush=True)

    print(f"[bench] matmul peak ({args.peak_size}^3 fp32)...", flush=True)
    peaks = [matmul_peak(args.peak_size)]
    with tempfile.TemporaryDirectory(prefix="bench_step_run_") as run_dir:
        base_cfg = load_bench_config([f"train.run_dir={run_dir}"], args)
        inputs, prompts = bench_inputs(base_cfg, args.steps)
    student_dir, teacher_dir, eos_ids = inputs.student_dir, inputs.teacher_dir, list(inputs.stop_ids)

    results: dict[str, dict] = {}

    def add(name: str, res: dict, round_: int) -> None:
        for i, s in enumerate(res["steps"]):
            s["round"], s["warmup"] = round_, i == 0 and len(res["steps"]) > 1
        if name in results:
            results[name]["steps"] += res["steps"]
        else:
            results[name] = res

    for round_ in range(args.rounds):
        for name in [s for s in args.systems if s in OURS]:
            print(f"[bench] round {round_ + 1}/{args.rounds} {name}: {args.steps} steps...", flush=True)
            add(name, run_ours(name, args), round_)
        for name in want_trl:
            if trl_absent:
                results[name] = {"label": TRL[name][0], "kind": "trl", "skipped": trl_absent}
                continue
            print(f"[bench] round {round_ + 1}/{args.rounds} {name}: {args.steps} steps (in {args.trl_venv})...",
                  flush=True)
            add(name, run_trl(name, args, args.trl_venv, prompts, student_dir, teacher_dir, eos_ids), round_)
        peaks.append(matmul_peak(args.peak_size))
    peak = {"gflops": max(p["gflops"] for p in peaks), "gflops_per_cpu_s": max(p["gflops_per_cpu_s"] for p in peaks)}

    s_dims, t_dims = Dims.from_hf(student_dir), Dims.from_hf(teacher_dir)
    for name, res in results.items():
        if "steps" in res:
            res["summary"] = summarize(name, res, s_dims, t_dims, peak)
    table = format_table(results, peak, "wall")
    table_cpu = format_table(results, peak, "cpu")
    command = "python tools/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {
        "schema_version": SCHEMA_VERSION, "date": started.isoformat(timespec="seconds"), "command": command.strip(),
        "machine": machine_info(), "loadavg_start_end": [load_start, list(os.getloadavg())],
        "settings": {"steps": args.steps, "rounds": args.rounds, "prompts_per_step": args.prompts,
                     "samples_per_prompt": args.samples,
                     "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "micro_batch": args.micro_batch,
                     "lr": args.lr, "clip_grad": args.clip_grad, "dtype": "float32", "config": str(CONFIG.name),
                     "student_dir": str(student_dir), "teacher_dir": str(teacher_dir),
                     "data": asdict(base_cfg.data),
                     "eos_token_ids": eos_ids},
        "dims": {"student": asdict(s_dims), "teacher": asdict(t_dims)},
        "matmul_peak": {**peak, "runs": peaks}, "phases": list(PHASES), "reference": REFERENCE,
        "trl_venv": {"path": str(args.trl_venv), "status": trl_absent or "ready"} if want_trl else None,
        "systems": results, "table": table, "table_cpu": table_cpu,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nbench_step {started:%Y-%m-%d %H:%M %Z}: {args.prompts} prompts x {args.samples} samples, "
          f"{args.max_new_tokens} new tokens, micro-batch {args.micro_batch}, medians of steps 2..{args.steps}")
    print(table)
    print("\nthe same in process CPU time (less sensitive to other jobs on a shared machine):")
    print(table_cpu)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
