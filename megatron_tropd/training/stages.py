"""The held-out metrics of a pipeline of runs, stage by stage (e.g. the main job: heal, then TrOPD).

    python -m megatron_tropd.training.stages runs/smollm2_heal_cpu runs/smollm2_tropd_cpu

One column for the first run's "before" (the model the pipeline started from) and one per run's "after", read
from each run's summary.json (written by `tropd train` at the end). The first rows are the distillation metrics a
user judges a run by: forward KL on teacher samples and reverse KL on the student's own samples (full-vocabulary,
lower is better) and top-1 agreement with the teacher (higher is better).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_tropd.training.metrics import HELD_OUT_METRICS

HEADLINE = {"forward_kl": "lower", "reverse_kl": "lower", "top1_agreement": "higher",
            "top1_agreement_teacher": "higher"}


def stage_columns(run_dirs: list[Path]) -> list[tuple[str, dict]]:
    """[(column name, held-out metrics)]: the first run's before, then every run's after. ValueError (naming the
    run dir) when a run has no summary.json or no held-out metrics."""
    columns = []
    for i, run_dir in enumerate(run_dirs):
        path = Path(run_dir) / "summary.json"
        if not path.is_file():
            raise ValueError(f"{run_dir}: no summary.json (the run has not finished)")
        summary = json.loads(path.read_text())
        if not summary.get("after"):
            raise ValueError(f"{run_dir}: summary.json has no held-out metrics (data.eval_size=0?)")
        if i == 0:
            columns.append((f"start ({Path(run_dir).name})", summary.get("before") or {}))
        columns.append((f"after {Path(run_dir).name}", summary["after"]))
    return columns


def stages_text(run_dirs: list[Path]) -> str:
    columns = stage_columns(run_dirs)
    width = max(24, *(len(name) + 2 for name, _ in columns))
    label = max(len(k) + len(f" ({v} = better)") for k, v in HEADLINE.items()) + 2
    lines = ["held-out metric".ljust(label) + "".join(name.rjust(width) for name, _ in columns)]
    for key in HELD_OUT_METRICS:
        if any(key in m for _, m in columns):
            tag = f" ({HEADLINE[key]} = better)" if key in HEADLINE else ""
            cells = "".join((f"{m[key]:.4f}" if m.get(key) is not None else "-").rjust(width) for _, m in columns)
            lines.append(f"{key}{tag}".ljust(label) + cells)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_tropd.training.stages", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path, help="the runs of the pipeline, in order")
    args = p.parse_args(argv)
    try:
        print(stages_text(args.run_dirs))
    except ValueError as e:
        print(f"stages: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
