"""`tropd plot RUN_DIR [--out DIR] [--metrics a,b]`: PNG curves of a run's metrics.jsonl and eval_metrics.jsonl.

One PNG per metric (`<out>/<name>.png`, eval metrics as `eval_<name>.png`), an overview grid `overview.png`, and
(without --metrics, when the run has held-out metrics) `eval_distillation.png`: the held-out distillation metrics
side by side, the teacher's own value as a dashed line where one exists. With several teachers, one PNG per metric comparing them
(`teachers_<metric>.png` from `teacher/<name>/<metric>`).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from megatron_tropd.training.metrics import (
    EVAL_METRICS_FILE, HELD_OUT_METRICS, METRICS_FILE, TEACHER_REFERENCE, read_jsonl,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory containing metrics.jsonl")
    parser.add_argument("--out", default=None, help="output directory for PNGs (default RUN_DIR/plots)")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated metric names to plot (default: every numeric metric)")


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


def run(args: argparse.Namespace) -> int:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        paths = plot_run(args.run_dir, args.out, metrics)
    except ValueError as e:
        print(f"tropd plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} PNGs to {paths[0].parent}")
    return 0
