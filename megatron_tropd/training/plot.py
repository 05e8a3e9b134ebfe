"""`tropd plot RUN_DIR [RUN_DIR ...] [--out DIR] [--metrics a,b] [--labels L1,L2]`: PNG curves of metrics.jsonl and
eval_metrics.jsonl.

One run dir: one PNG per metric (`<out>/<name>.png`, eval metrics as `eval_<name>.png`), an overview grid
`overview.png`, and (without --metrics, when the run has held-out metrics) `eval_distillation.png`: the held-out
distillation metrics side by side, the teacher's own value as a dashed line where one exists. With several teachers,
one PNG per metric comparing them (`teachers_<metric>.png` from `teacher/<name>/<metric>`).

Several run dirs (or --labels): the same PNGs (default in ./plots_compare) with the runs overlaid, to compare methods
over seeds. Runs are grouped by label (the run dir's name less a seed suffix, `opd_seed0` -> `opd`, or --labels); each
group is drawn as the mean over its runs at each step with a mean +- std band (`aggregate`).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from megatron_tropd.training.metrics import (
    EVAL_METRICS_FILE, HELD_OUT_METRICS, METRICS_FILE, TEACHER_REFERENCE, read_jsonl,
)


# A trailing seed suffix of a run dir's name (`_seed0`, `-s1`): runs that differ only in it form one group.
SEED_SUFFIX = re.compile(r"[_-]s(?:eed)?\d+$")
COMPARE_OUT = "plots_compare"


class RunGroup(NamedTuple):
    """The runs drawn as one line: their label and each run's train / eval records."""
    label: str
    train: list[list[dict]]
    evals: list[list[dict]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="+",
                        help="run directory containing metrics.jsonl; several are overlaid, grouped by label")
    parser.add_argument("--out", default=None,
                        help=f"output directory for PNGs (default: RUN_DIR/plots for one run dir, "
                             f"./{COMPARE_OUT} when overlaying several or with --labels)")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated metric names to plot (default: every numeric metric)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated group label per run dir, same order and count (default: the run "
                             "dir's name without a seed suffix such as _seed0 / -s1); runs sharing a label are "
                             "drawn as their mean with a mean +- std band")


def _series(records: list[dict], name: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _numeric_names(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in records for k, v in r.items()
                              if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, metrics: list[str] | None = None) -> list[Path]:
    """Write the PNGs; returns their paths. Raises ValueError when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train, evals = read_jsonl(run_dir / METRICS_FILE), read_jsonl(run_dir / EVAL_METRICS_FILE)
    if not train and not evals:
        raise ValueError(f"no metrics in {run_dir} (expected {METRICS_FILE} written by tropd train)")
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    panels = [("", n, train) for n in _numeric_names(train)] + [("eval_", n, evals) for n in _numeric_names(evals)]
    if metrics:
        unknown = [m for m in metrics if not any(n == m for _, n, _ in panels)]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; available: {sorted({n for _, n, _ in panels})}")
        panels = [p for p in panels if p[1] in metrics]
    written = []
    for prefix, name, recs in panels:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*_series(recs, name), marker="." if len(recs) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(f"{prefix}{name}")
        ax.grid(alpha=0.3)
        path = out / f"{prefix}{_safe(name)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    written += _teacher_panels(plt, train, out)
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 2.8 * rows), squeeze=False)
    for ax, (prefix, name, recs) in zip(axes.flat, panels):
        ax.plot(*_series(recs, name))
        ax.set_title(f"{prefix}{name}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "overview.png", dpi=90)
    plt.close(fig)
    written.append(out / "overview.png")
    if not metrics:
        written += _distillation_figure(plt, evals, out)
    return written


def _distillation_figure(plt, evals: list[dict], out: Path) -> list[Path]:
    """The held-out distillation metrics of eval_metrics.jsonl in one grid (none: no figure)."""
    names = [n for n in HELD_OUT_METRICS if _series(evals, n)[0]]
    if not names:
        return []
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        ax.plot(*_series(evals, name), marker="o")
        ref = _series(evals, TEACHER_REFERENCE.get(name, ""))[1]
        if ref:
            ax.axhline(ref[-1], linestyle="--", color="gray", label="teacher")
            ax.legend(fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("held-out distillation metrics")
    fig.tight_layout()
    path = out / "eval_distillation.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def _teacher_panels(plt, records: list[dict], out: Path) -> list[Path]:
    """Several teachers: one PNG per metric with every teacher's curve (`teacher/<name>/<metric>` ->
    `teachers_<metric>.png`)."""
    by_metric: dict[str, list[str]] = {}
    for name in _numeric_names(records):
        m = re.fullmatch(r"teacher/([^/]+)/(.+)", name)
        if m:
            by_metric.setdefault(m.group(2), []).append(m.group(1))
    written = []
    for metric, teachers in by_metric.items():
        if len(teachers) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for t in teachers:
            ax.plot(*_series(records, f"teacher/{t}/{metric}"), marker=".", label=t)
        ax.set_xlabel("step")
        ax.set_title(f"{metric} by teacher")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        path = out / f"teachers_{_safe(metric)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def aggregate(records_per_run: list[list[dict]], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean and population std of metric `name` over runs, at every step any run logged it: (steps, mean, std, n).

    A step present in only some runs is averaged over those (n counts them), so runs of different lengths still
    overlay; n == 1 gives std 0 (no band). A step logged twice within one run counts once, its last value.
    """
    per_step: dict[int, list[float]] = {}
    for records in records_per_run:
        xs, ys = _series(records, name)
        for step, value in dict(zip(xs, ys)).items():
            per_step.setdefault(step, []).append(value)
    steps = sorted(per_step)
    values = [np.asarray(per_step[s]) for s in steps]
    return (np.asarray(steps, dtype=np.int64), np.asarray([v.mean() for v in values], dtype=float),
            np.asarray([v.std() for v in values], dtype=float), np.asarray([len(v) for v in values], dtype=np.int64))


def default_label(run_dir: str | Path) -> str:
    """The run dir's name without a trailing seed suffix (`opd_seed1` -> `opd`): seeds of one method group together."""
    name = Path(run_dir).resolve().name
    return SEED_SUFFIX.sub("", name) or name


def group_runs(run_dirs: list[str | Path], labels: list[str] | None = None) -> dict[str, list[Path]]:
    """label -> run dirs, in first-seen order. Raises ValueError when --labels does not name each run dir once."""
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"--labels has {len(labels)} names for {len(run_dirs)} run dirs (one per run dir)")
    if labels is not None and not all(labels):
        raise ValueError(f"--labels has an empty name: {','.join(labels)}")
    groups: dict[str, list[Path]] = {}
    for label, run_dir in zip(labels or [default_label(d) for d in run_dirs], run_dirs):
        groups.setdefault(label, []).append(Path(run_dir))
    return groups


def _load_group(label: str, run_dirs: list[Path]) -> RunGroup:
    """Every run's records; a run dir without any is an error (a typo would otherwise vanish from the plot)."""
    train, evals = [], []
    for run_dir in run_dirs:
        t, e = read_jsonl(run_dir / METRICS_FILE), read_jsonl(run_dir / EVAL_METRICS_FILE)
        if not t and not e:
            raise ValueError(f"no metrics in {run_dir} (expected {METRICS_FILE} written by tropd train)")
        train.append(t)
        evals.append(e)
    return RunGroup(label, train, evals)


def _compare_panels(groups: list[RunGroup], metrics: list[str] | None) -> list[tuple[str, str]]:
    """(prefix, name) of every metric any run has, train then eval, filtered by --metrics (unknown: ValueError)."""
    train = _numeric_names([r for g in groups for recs in g.train for r in recs])
    evals = _numeric_names([r for g in groups for recs in g.evals for r in recs])
    panels = [("", n) for n in train] + [("eval_", n) for n in evals]
    if metrics:
        unknown = [m for m in metrics if m not in train and m not in evals]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; available: {sorted(set(train) | set(evals))}")
        panels = [p for p in panels if p[1] in metrics]
    return panels


def _draw_groups(ax, groups: list[RunGroup], prefix: str, name: str) -> None:
    """One line per group (mean over its runs) and a mean +- std band where the group has several runs."""
    for i, group in enumerate(groups):
        records = group.evals if prefix else group.train
        steps, mean, std, _ = aggregate(records, name)
        if not len(steps):
            continue
        runs = sum(1 for recs in records if _series(recs, name)[0])
        ax.plot(steps, mean, color=f"C{i}", marker="." if len(steps) < 50 else None, label=f"{group.label} (n={runs})")
        if runs > 1:
            ax.fill_between(steps, mean - std, mean + std, color=f"C{i}", alpha=0.2, linewidth=0)


def _grid(plt, count: int, cols: int, width: float, height: float):
    """A figure with `count` panels in rows of `cols` (spare axes hidden); returns (fig, used axes)."""
    cols = min(cols, count)
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    return fig, list(axes.flat)[:count]


def _save(plt, fig, path: Path, dpi: int) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_compare(run_dirs: list[str | Path], out_dir: str | Path | None = None, metrics: list[str] | None = None,
                 labels: list[str] | None = None) -> list[Path]:
    """Overlay several runs, grouped by label (`group_runs`): the PNGs of `plot_run`, one line and band per group.
    Returns their paths. Raises ValueError on a run dir without metrics, a bad --labels or an unknown metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [_load_group(label, dirs) for label, dirs in group_runs(run_dirs, labels).items()]
    panels = _compare_panels(groups, metrics)
    out = Path(out_dir) if out_dir else Path(COMPARE_OUT)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for prefix, name in panels:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        _draw_groups(ax, groups, prefix, name)
        ax.set_xlabel("step")
        ax.set_title(f"{prefix}{name}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        written.append(_save(plt, fig, out / f"{prefix}{_safe(name)}.png", 100))
    fig, axes = _grid(plt, len(panels), 3, 4.5, 2.8)
    for ax, (prefix, name) in zip(axes, panels):
        _draw_groups(ax, groups, prefix, name)
        ax.set_title(f"{prefix}{name}", fontsize=9)
        ax.grid(alpha=0.3)
    if axes:
        axes[0].legend(fontsize=7)
    written.append(_save(plt, fig, out / "overview.png", 90))
    if not metrics:
        written += _compare_distillation(plt, groups, out)
    return written


def _compare_distillation(plt, groups: list[RunGroup], out: Path) -> list[Path]:
    """The held-out distillation metrics overlaid per group in one grid, the teacher's value (mean of each run's
    last) dashed where one exists; no held-out metrics: no figure."""
    evals = [recs for g in groups for recs in g.evals]
    names = [n for n in HELD_OUT_METRICS if any(_series(recs, n)[0] for recs in evals)]
    if not names:
        return []
    fig, axes = _grid(plt, len(names), 4, 4, 2.8)
    for ax, name in zip(axes, names):
        _draw_groups(ax, groups, "eval_", name)
        refs = [ys[-1] for recs in evals if (ys := _series(recs, TEACHER_REFERENCE.get(name, ""))[1])]
        if refs:
            ax.axhline(float(np.mean(refs)), linestyle="--", color="gray", label="teacher")
        ax.legend(fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("held-out distillation metrics")
    return [_save(plt, fig, out / "eval_distillation.png", 90)]


def run(args: argparse.Namespace) -> int:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    labels = [label.strip() for label in args.labels.split(",")] if args.labels else None
    try:
        if len(args.run_dir) == 1 and labels is None:
            paths = plot_run(args.run_dir[0], args.out, metrics)
        else:
            paths = plot_compare(args.run_dir, args.out, metrics, labels)
    except ValueError as e:
        print(f"tropd plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} PNGs to {paths[0].parent}")
    return 0
