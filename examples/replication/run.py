"""CPU-scale replication of the TrOPD paper's comparison (issue 17, item 5): every method x setting x seed.

    python examples/replication/run.py                       # the whole experiment (~90 min on 2 cores)
    python examples/replication/run.py --dry-run             # the commands it would run
    python examples/replication/run.py --methods opd tropd --seeds 0 --settings unhealed

Each (setting, method, seed) is one `tropd train --config examples/replication/replication_cpu.yaml --resume`
subprocess into OUT/<setting>/<method>_seed<seed> (its log: train.log there). A run whose summary.json is written
for the configured steps is complete and skipped without a subprocess; a partial one continues from its last
checkpoint (`--resume`). Settings: "healed" starts from the main job's stage-1 student (runs/smollm2_heal_cpu, made
here by the same `tropd train --config examples/configs/smollm2_heal_cpu.yaml --resume` as scripts/run_main.sh if
absent), "unhealed" from the pruned student itself (a strong teacher-student mismatch). At the end: OUT/results.json
and OUT/results.md (held-out metrics before / after, mean +- std over seeds, and gradient-norm spikes) and
`tropd plot` of each setting's runs into OUT/<setting>/plots.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples/replication/replication_cpu.yaml"
HEAL_CONFIG = ROOT / "examples/configs/smollm2_heal_cpu.yaml"
DEFAULT_HEAL_DIR = ROOT / "runs/smollm2_heal_cpu"
DEFAULT_OUT = ROOT / "runs/replication"
LOG_PREFIX = "[replication]"

# method -> its config overrides (everything else is replication_cpu.yaml). The baselines run as published, without
# teacher-prefix guidance; guidance is TrOPD's third component, so TrOPD and its outlier ablations (mask / clip) run
# with it, and `tropd_noguide` is TrOPD (fkl outliers) without it. REOPOLD is single-stage (no switch_step).
METHODS: dict[str, dict[str, str]] = {
    "opd": {"objective.name": "opd", "guidance.enabled": "false"},
    "eopd": {"objective.name": "eopd", "guidance.enabled": "false"},
    "reopold": {"objective.name": "reopold", "guidance.enabled": "false"},
    "entropy_opd": {"objective.name": "entropy_opd", "guidance.enabled": "false"},
    "jsd": {"objective.name": "jsd", "guidance.enabled": "false"},
    "tropd": {"objective.name": "tropd", "objective.outlier": "fkl", "guidance.enabled": "true"},
    "tropd_mask": {"objective.name": "tropd", "objective.outlier": "mask", "guidance.enabled": "true"},
    "tropd_clip": {"objective.name": "tropd", "objective.outlier": "clip", "guidance.enabled": "true"},
    "tropd_noguide": {"objective.name": "tropd", "objective.outlier": "fkl", "guidance.enabled": "false"},
    # TrOPD's outlier term alone on every on-policy token (k = 64, not renormalised): the paper's Table 1 reports
    # that it collapses.
    "topk_fkl": {"objective.name": "topk_fkl", "guidance.enabled": "false"},
    # Not in the default set (not one of the paper's methods, and not in the 100-minute budget): dense forward KL
    # over the full vocabulary on the student's samples.
    "full_vocab_fkl": {"objective.name": "full_vocab", "objective.full_vocab_kind": "forward",
                       "guidance.enabled": "false"},
}
DEFAULT_METHODS = tuple(m for m in METHODS if m != "full_vocab_fkl")
SETTINGS = ("healed", "unhealed")

# Held-out metrics reported (summary.json "before" / "after"), with the better direction.
RESULT_METRICS = {"forward_kl": "lower", "reverse_kl": "lower", "top1_agreement": "higher",
                  "top1_agreement_teacher": "higher", "student_entropy": "near teacher", "teacher_nll": "lower",
                  "distinct_2": "near teacher"}
# The teacher's side, shown under each table: its entropy on the student's held-out samples (after training: what
# student_entropy is compared with) and the distinct-2 of its own held-out samples (drawn once per run).
TEACHER_METRICS = {"student_entropy": "teacher_entropy", "distinct_2": "teacher_distinct_2"}
# A gradient-norm spike: a step whose grad_norm exceeds SPIKE_FACTOR x the run's median grad_norm, step 0 excluded
# from both (its norm reflects the starting point, not the optimisation). The logged norm is the raw one, before
# clip_grad bounds the update, so it is what shows an unreliable, exploding OPD gradient. The median (not the mean)
# keeps the threshold from being dragged up by the spikes themselves, and a factor 5 sits well above the ordinary
# step-to-step noise of a few rollouts a step while an exploding gradient exceeds it easily; at 6 steps a run has 5
# candidate steps, so the counts are coarse and compared between methods, not read in absolute terms.
SPIKE_FACTOR = 5.0


@dataclass(frozen=True)
class RunSpec:
    """One `tropd train` run: its place in the grid, its run dir and its config overrides (in order)."""
    setting: str
    method: str
    seed: int
    run_dir: Path
    overrides: tuple[str, ...]
    before_from: Path | None = None  # the run whose "before" eval this one shares (None: it evaluates its own)

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.run_dir.name}"


# --- the grid ------------------------------------------------------------------------------------------------------
def run_overrides(setting: str, method: str, seed: int, run_dir: Path, heal_checkpoint: str | None,
                  extra: Sequence[str] = (), eval_before: bool = True) -> tuple[str, ...]:
    """The overrides of one run: the method's, its seed and run dir, the healed checkpoint, then `extra` (last,
    so that e.g. student.path / teacher.path of a test win)."""
    out = [f"{k}={v}" for k, v in METHODS[method].items()]
    out += [f"train.seed={seed}", f"train.run_dir={run_dir}"]
    if not eval_before:
        out.append("eval.before=false")
    if setting == "healed":
        if not heal_checkpoint:
            raise ValueError("the healed setting needs a stage-1 checkpoint")
        out.append(f"student.megatron_checkpoint={heal_checkpoint}")
    return tuple(out) + tuple(extra)


def plan_runs(out: Path, settings: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
              heal_checkpoint: str | None, extra: Sequence[str] = ()) -> list[RunSpec]:
    """Every (setting, method, seed), setting-major then seed-major (all methods of seed 0 first, so that a
    partial experiment already compares every method).

    The held-out eval before training is the same computation for every method of a (setting, seed): the same
    student, prompts and sampling seed (the objective and guidance only act from the first step; measured: the
    "before" metrics of 4 methods x 3 seeds were bitwise identical within each seed). So only the first method
    of each (setting, seed) runs it; the others run with eval.before=false and share its result (`share_before`),
    which saves one eval (~15 s) of every other run."""
    specs = []
    for setting in settings:
        for seed in seeds:
            ref = None
            for method in methods:
                run_dir = out / setting / f"{method}_seed{seed}"
                specs.append(RunSpec(setting, method, seed, run_dir,
                                     run_overrides(setting, method, seed, run_dir, heal_checkpoint, extra,
                                                   eval_before=ref is None), before_from=ref))
                ref = ref or run_dir
    return specs


def train_command(python: str, config: Path, overrides: Iterable[str]) -> list[str]:
    """`tropd train --config CONFIG --resume OVERRIDES...` through `python -m megatron_tropd.cli`."""
    return [python, "-m", "megatron_tropd.cli", "train", "--config", str(config), "--resume", *overrides]


def heal_command(python: str, heal_dir: Path) -> list[str]:
    """Stage 1 of the main job, exactly as scripts/run_main.sh runs it (a complete run is skipped for free)."""
    return train_command(python, HEAL_CONFIG, [f"train.run_dir={heal_dir}"])


def plot_command(python: str, run_dirs: Sequence[Path], out: Path, metrics: str | None) -> list[str]:
    """`tropd plot DIR... --out OUT` (runs grouped by method: the dir name less its _seedN)."""
    cmd = [python, "-m", "megatron_tropd.cli", "plot", *map(str, run_dirs), "--out", str(out)]
    return cmd + (["--metrics", metrics] if metrics else [])


# --- running -------------------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"{LOG_PREFIX} {msg}", flush=True)


def run_logged(cmd: list[str], log_file: Path) -> int:
    """Run `cmd` from the repository root, stdout and stderr appended to `log_file`; its exit status."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a", encoding="utf-8") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        return subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)


def tail(path: Path, n: int = 15) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join(lines[-n:])


def heal_checkpoint_path(python: str, heal_dir: Path) -> Path:
    """The stage-1 checkpoint in `heal_dir`, running stage 1 first when it has none. RuntimeError if it fails."""
    from megatron_tropd.training.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(heal_dir)
    if ckpt is None:
        log(f"stage 1 (healing) has no checkpoint in {heal_dir}: running it (~8 min)")
        t0 = time.time()
        rc = run_logged(heal_command(python, heal_dir), heal_dir.parent / f"{heal_dir.name}.log")
        ckpt = latest_checkpoint(heal_dir)
        if rc != 0 or ckpt is None:
            raise RuntimeError(f"stage 1 failed (exit {rc}); log: {heal_dir.parent / f'{heal_dir.name}.log'}")
        log(f"stage 1 done in {time.time() - t0:.0f}s")
    return ckpt


def expected_steps(overrides: Sequence[str]) -> int:
    """train.steps of replication_cpu.yaml with `overrides` (validates the overrides, too)."""
    from megatron_tropd.config import load_config

    return load_config(CONFIG, list(overrides)).train.steps


def check_run_dir_config(spec: RunSpec) -> None:
    """ValueError when the run dir holds a run of another objective / model / data / seed (its config.yaml)."""
    import yaml

    from megatron_tropd.config import load_config
    from megatron_tropd.training.checkpoint import config_differences

    saved = spec.run_dir / "config.yaml"
    if saved.is_file():
        diffs = config_differences(yaml.safe_load(saved.read_text()) or {}, load_config(CONFIG, list(spec.overrides)))
        if diffs:
            raise ValueError(f"{spec.run_dir} holds another run ({'; '.join(diffs)}); use another --out")


def is_complete(run_dir: Path, steps: int) -> bool:
    """True when `run_dir/summary.json` was written by a run of `steps` steps."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("steps") == steps
    except json.JSONDecodeError:
        return False


def share_before(spec: RunSpec) -> bool:
    """Give a run that skipped its "before" eval the one of `spec.before_from`: its step-0 record is prepended to
    the run's eval_metrics.jsonl with "before_shared_from" naming the source (so plots and results see it and a
    reader knows where it came from). Idempotent; False when the source has no step-0 record (it failed)."""
    if spec.before_from is None:
        return True
    path = spec.run_dir / "eval_metrics.jsonl"
    records = read_jsonl(path)
    if any(r.get("step") == 0 for r in records):
        return True
    ref = next((r for r in read_jsonl(spec.before_from / "eval_metrics.jsonl") if r.get("step") == 0), None)
    if ref is None:
        return False
    shared = {**ref, "before_shared_from": str(spec.before_from)}
    path.write_text("".join(json.dumps(r) + "\n" for r in [shared, *records]))
    return True


def prune_checkpoints(run_dir: Path) -> None:
    """Delete a complete run's checkpoints (~1 GB each): run.py detects completion by summary.json."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def execute(specs: list[RunSpec], python: str, keep_checkpoints: bool) -> tuple[list[str], int]:
    """Run every incomplete spec in order, printing progress and an ETA; (the names of the runs that failed, the
    number of runs trained)."""
    failed, trained, t_trained, t0 = [], 0, 0.0, time.time()
    steps = {spec.name: expected_steps(spec.overrides) for spec in specs}
    for i, spec in enumerate(specs, 1):
        head = f"({i}/{len(specs)}) {spec.name}"
        try:
            check_run_dir_config(spec)
        except ValueError as e:
            log(f"{head}: FAILED: {e}")
            failed.append(spec.name)
            continue
        if is_complete(spec.run_dir, steps[spec.name]):
            log(f"{head}: complete, skipped")
            share_before(spec)
        else:
            t_run = time.time()
            rc = run_logged(train_command(python, CONFIG, spec.overrides), spec.run_dir / "train.log")
            wall = time.time() - t_run
            trained, t_trained = trained + 1, t_trained + wall
            if rc != 0 or not is_complete(spec.run_dir, steps[spec.name]):
                log(f"{head}: FAILED (exit {rc}) after {wall:.0f}s; last lines of {spec.run_dir / 'train.log'}:\n"
                    f"{tail(spec.run_dir / 'train.log')}")
                failed.append(spec.name)
                continue
            if not share_before(spec):
                log(f"{head}: no 'before' eval to share from {spec.before_from} (did it fail?)")
            left = sum(not is_complete(s.run_dir, steps[s.name]) for s in specs[i:])
            log(f"{head}: done in {wall:.0f}s (elapsed {time.time() - t0:.0f}s, ~{left * t_trained / trained:.0f}s "
                f"left for {left} runs)")
        if not keep_checkpoints:
            prune_checkpoints(spec.run_dir)
    return failed, trained


# --- results (pure functions first) ----------------------------------------------------------------------------------
def spike_count(grad_norms: Sequence[tuple[int, float]], factor: float = SPIKE_FACTOR) -> int:
    """Steps (> 0) whose grad_norm exceeds `factor` x the median grad_norm of the steps > 0; non-finite norms are
    ignored for the median and counted as spikes. 0 when no step > 0 has a finite norm."""
    later = [(s, g) for s, g in grad_norms if s > 0]
    finite = [g for _, g in later if math.isfinite(g)]
    if not finite:
        return 0
    threshold = factor * statistics.median(finite)
    return sum(1 for _, g in later if not math.isfinite(g) or g > threshold)


def mean_std(values: Iterable[float | None]) -> dict:
    """{"mean", "std", "n"} over the finite values: population std (as `tropd plot`'s band); None when n = 0."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs), "n": len(xs)}


def paired_change(run: dict, metric: str) -> float | None:
    """after - before of one run's held-out `metric` (None when either is missing): within a (setting, seed) every
    method starts from the same student and is evaluated on the same held-out samples' seed, so this change, not
    the level, is what separates methods (the "before" level alone varies between seeds)."""
    b, a = (run.get("before") or {}).get(metric), (run.get("after") or {}).get(metric)
    if b is None or a is None:
        return None
    return float(a) - float(b)


def aggregate(runs: Sequence[dict], metrics: Sequence[str] = (*RESULT_METRICS, *TEACHER_METRICS.values()),
              factor: float = SPIKE_FACTOR) -> dict:
    """setting -> method -> {"seeds", "before": {metric: mean_std}, "after": {...}, "change": {...} (paired
    after - before per run), "grad_spikes": mean_std plus "total"} over `runs`: dicts with setting, method, seed,
    before, after (held-out metrics) and grad_norms ([(step, grad_norm)]). Settings and methods keep their
    first-seen order."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for r in runs:
        groups.setdefault(r["setting"], {}).setdefault(r["method"], []).append(r)
    out: dict[str, dict[str, dict]] = {}
    for setting, by_method in groups.items():
        out[setting] = {}
        for method, rs in by_method.items():
            spikes = [spike_count(r["grad_norms"], factor) for r in rs]
            out[setting][method] = {
                "seeds": sorted(r["seed"] for r in rs),
                **{when: {m: mean_std((r.get(when) or {}).get(m) for r in rs) for m in metrics}
                   for when in ("before", "after")},
                "change": {m: mean_std(paired_change(r, m) for r in rs) for m in metrics},
                "grad_spikes": {**mean_std(spikes), "total": sum(spikes)},
            }
    return out


def _cell(stat: dict, digits: int = 3) -> str:
    if stat.get("mean") is None:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _signed(stat: dict, digits: int = 3) -> str:
    if stat.get("mean") is None:
        return "-"
    return f"{stat['mean']:+.{digits}f} ± {stat['std']:.{digits}f}"


def _best(by_method: dict, metric: str) -> str | None:
    """The method whose mean paired change is best for `metric` ("lower" / "higher" metrics only)."""
    direction = RESULT_METRICS.get(metric)
    scored = [(r["change"][metric]["mean"], m) for m, r in by_method.items() if r["change"][metric]["mean"] is not None]
    if direction not in ("lower", "higher") or not scored:
        return None
    return (min if direction == "lower" else max)(scored)[1]


def results_markdown(results: dict, failed: Sequence[str] = (), factor: float = SPIKE_FACTOR) -> str:
    """results.md: one table per setting (a row per method; each metric as before -> after, mean ± population std
    over the seeds), then the failed runs."""
    lines = ["# Replication of the TrOPD comparison (CPU scale)", "",
             "Held-out metrics before -> after training, mean ± std (population) over seeds; "
             f"spikes = steps > 0 with grad_norm > {factor:g} x the run's median (mean ± std per run, total).", ""]
    metrics = list(RESULT_METRICS)
    for setting, by_method in results.items():
        lines += [f"## {setting}", "",
                  "| method | seeds | " + " | ".join(f"{m} ({RESULT_METRICS.get(m, '')})" for m in metrics)
                  + " | grad spikes |",
                  "|---|---|" + "---|" * len(metrics) + "---|"]
        for method, r in by_method.items():
            cells = [f"{_cell(r['before'][m])} -> {_cell(r['after'][m])}" for m in metrics]
            spikes = r["grad_spikes"]
            lines.append(f"| {method} | {len(r['seeds'])} | " + " | ".join(cells)
                         + f" | {_cell(spikes, 2)} ({spikes['total']}) |")
        first, r0 = next(iter(by_method.items()))
        ref = ", ".join(f"{m} {_cell(r0['after'].get(m, {}))}" for m in TEACHER_METRICS.values())
        lines += ["", f"The teacher's side (from the {first} runs, after training; teacher_entropy is on the student's "
                      f"samples, teacher_distinct_2 on the teacher's own): {ref}.", ""]
        lines += [f"Paired change after - before per run (same student, same held-out sampling seed within a seed), "
                  f"mean ± std over the seeds; **bold**: the best method of the column.", "",
                  "| method | " + " | ".join(f"Δ {m} ({RESULT_METRICS.get(m, '')})" for m in metrics) + " |",
                  "|---|" + "---|" * len(metrics)]
        best = {m: _best(by_method, m) for m in metrics}
        for method, r in by_method.items():
            cells = [(f"**{_signed(r['change'][m])}**" if best[m] == method else _signed(r["change"][m]))
                     for m in metrics]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    if failed:
        lines += ["## Failed runs (not in the tables)", "", *(f"- {name}" for name in failed), ""]
    return "\n".join(lines)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(spec: RunSpec) -> dict:
    """A complete run's record for `aggregate`: held-out metrics before / after (summary.json; "before" from
    eval_metrics.jsonl's step 0 when the summary comes from a resumed run) and the per-step grad norms."""
    summary = json.loads((spec.run_dir / "summary.json").read_text())
    before = summary.get("before")
    if not before:
        before = next((r for r in read_jsonl(spec.run_dir / "eval_metrics.jsonl") if r.get("step") == 0), {})
    grad_norms = [(int(r["step"]), float(r["grad_norm"])) for r in read_jsonl(spec.run_dir / "metrics.jsonl")
                  if isinstance(r.get("grad_norm"), (int, float))]
    return {"setting": spec.setting, "method": spec.method, "seed": spec.seed, "before": before,
            "after": summary.get("after") or {}, "grad_norms": grad_norms}


def write_results(out: Path, specs: list[RunSpec], failed: Sequence[str]) -> dict:
    """OUT/results.json (aggregate + per-run records) and OUT/results.md from the runs that finished."""
    done = [s for s in specs if s.name not in failed and (s.run_dir / "summary.json").is_file()]
    runs = [load_run(s) for s in done]
    results = aggregate(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"results": results, "runs": runs, "failed": list(failed),
                                                  "spike_factor": SPIKE_FACTOR}, indent=1))
    (out / "results.md").write_text(results_markdown(results, failed))
    return results


def plot_settings(python: str, out: Path, specs: list[RunSpec], failed: Sequence[str], metrics: str | None,
                  replot: bool = True) -> None:
    """`tropd plot` over each setting's complete runs into OUT/<setting>/plots (a failure is reported, not fatal).
    With replot False a setting whose plots exist is left as it is (nothing was trained since)."""
    for setting in dict.fromkeys(s.setting for s in specs):
        dirs = [s.run_dir for s in specs if s.setting == setting and s.name not in failed
                and (s.run_dir / "summary.json").is_file()]
        if not dirs or (not replot and list((out / setting / "plots").glob("*.png"))):
            continue
        rc = run_logged(plot_command(python, dirs, out / setting / "plots", metrics), out / setting / "plot.log")
        log(f"plots of {setting}: {out / setting / 'plots'}" if rc == 0 else
            f"plots of {setting} FAILED (exit {rc}); see {out / setting / 'plot.log'}")


# --- command line ----------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--heal-dir", type=Path, default=DEFAULT_HEAL_DIR,
                   help="stage-1 run dir of the healed setting (stage 1 is run into it when it has no checkpoint)")
    p.add_argument("--heal-checkpoint", default=None, help="use this student checkpoint for 'healed' instead")
    p.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides passed to every run, after the method's (e.g. student.path=...)")
    p.add_argument("--plot-metrics", default=None, help="comma-separated metrics for tropd plot (default: all)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep complete runs' checkpoints (default: deleted, ~1 GB each)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p.parse_args(argv)


def dry_run(args: argparse.Namespace, python: str) -> int:
    """Print the stage-1 command (when needed) and one train command per (setting, method, seed)."""
    heal = args.heal_checkpoint
    if "healed" in args.settings and heal is None:
        from megatron_tropd.training.checkpoint import latest_checkpoint

        found = latest_checkpoint(args.heal_dir)
        if found is None:
            print(f"# stage 1 first (no checkpoint in {args.heal_dir}):")
            print(f"# {shlex.join(heal_command(python, args.heal_dir))}")
        heal = str(found) if found else f"<latest checkpoint of {args.heal_dir}>"
    for spec in plan_runs(args.out, args.settings, args.methods, args.seeds, heal, args.override):
        print(shlex.join(train_command(python, CONFIG, spec.overrides)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out, python = args.out.resolve(), sys.executable
    if args.dry_run:
        return dry_run(args, python)
    t0 = time.time()
    heal = args.heal_checkpoint
    if "healed" in args.settings and heal is None:
        try:
            heal = str(heal_checkpoint_path(python, args.heal_dir.resolve()))
        except RuntimeError as e:
            log(f"no healed student: {e}")
            return 1
    specs = plan_runs(args.out, args.settings, args.methods, args.seeds, heal, args.override)
    log(f"{len(specs)} runs ({len(args.settings)} settings x {len(args.methods)} methods x {len(args.seeds)} seeds) "
        f"into {args.out}" + (f"; healed student: {heal}" if heal else ""))
    failed, trained = execute(specs, python, args.keep_checkpoints)
    write_results(args.out, specs, failed)
    log(f"results: {args.out / 'results.md'}, {args.out / 'results.json'}")
    plot_settings(python, args.out, specs, failed, args.plot_metrics, replot=trained > 0)
    failures = f"; {len(failed)} runs FAILED: {', '.join(failed)}" if failed else ""
    log(f"finished in {time.time() - t0:.0f}s{failures}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
