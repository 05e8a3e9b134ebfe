"""Per-step metrics: `run_dir/metrics.jsonl` (one JSON object per step, flushed), TensorBoard scalars, a live
tqdm progress line, and an end-of-run summary table.

Resume: `MetricsLogger(run_dir, resume_step=k)` drops the lines with step > k (from metrics.jsonl and
eval_metrics.jsonl) and purges TensorBoard events past k, so the files equal those of an uninterrupted run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from megatron_tropd.atomic import atomic_write_text

METRICS_FILE = "metrics.jsonl"
EVAL_METRICS_FILE = "eval_metrics.jsonl"

# Held-out distillation metrics (evaluation/heldout.py) in print / plot order: printed before / after by `tropd
# train`, drawn together by `tropd plot` (eval_distillation.png), with the teacher's own value where one exists
# (constant: the teacher's held-out samples are drawn once).
# Metric-name prefixes of wall-clock quantities: they differ between two runs of the same seed (resume checks skip them)
VOLATILE_PREFIXES = ("time/", "throughput/", "timeline/")
HELD_OUT_METRICS = ("forward_kl", "reverse_kl", "top1_agreement", "top1_agreement_teacher", "reverse_kl_k1",
                    "token_agreement", "teacher_nll", "student_nll_teacher", "student_entropy", "teacher_entropy",
                    "distinct_2", "distinct_3", "accuracy", "response_length")
TEACHER_REFERENCE = {"distinct_2": "teacher_distinct_2", "distinct_3": "teacher_distinct_3",
                     "accuracy": "teacher_accuracy", "response_length": "teacher_response_length"}

# Progress-line fields: label -> candidate metric keys (first present wins).
PROGRESS_KEYS = {
    "loss": ("loss",),
    "kl": ("reward/k1_rkl", "kl", "k1_kl", "reverse_kl"),
    "trust": ("trust/frac", "trust_frac", "trust_fraction"),
    "tok/s": ("tokens_per_s", "tok_per_s", "throughput/tokens_per_s"),
    "mfu": ("throughput/mfu",),
}


def _plain(v: Any) -> Any:
    """JSON-able scalar: tensors / numpy scalars -> float; NaN / inf -> None (strict JSON)."""
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return str(v)


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a metrics file (a torn last line from a crash is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def truncate_jsonl(path: str | Path, last_step: int) -> int:
    """Keep only records with step <= last_step (and drop torn lines); atomic rewrite. Returns records kept."""
    path = Path(path)
    if not path.exists():
        return 0
    keep = [r for r in read_jsonl(path) if int(r.get("step", -1)) <= last_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return len(keep)


class MetricsLogger:
    """Append-only per-step metrics. Only the rank that logs (e.g. last PP stage, DP/TP rank 0) creates one."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None,
                 total_steps: int | None = None, progress: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.eval_path = self.run_dir / EVAL_METRICS_FILE
        last = -1 if resume_step is None else resume_step
        # A fresh run (resume_step None) starts empty; a resumed one keeps steps <= resume_step.
        truncate_jsonl(self.path, last)
        truncate_jsonl(self.eval_path, last)
        self._file = open(self.path, "a", encoding="utf-8")
        self._eval_file = None
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events at step >= purge_step left by the interrupted run.
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=last + 1)
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=max(last + 1, 0), desc="tropd", unit="step",
                             dynamic_ncols=True)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Append {"step": step, **metrics} to metrics.jsonl (flushed), TensorBoard scalars, progress line."""
        record = {"step": int(step), **{str(k): _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._scalars("train", record)
        if self._bar is not None:
            self._bar.set_postfix_str(progress_line(record), refresh=False)
            self._bar.update(1)
        return record

    def log_eval(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Append eval metrics (e.g. accuracy per benchmark) to eval_metrics.jsonl and TensorBoard `eval/`."""
        record = {"step": int(step), **{str(k): _plain(v) for k, v in metrics.items()}}
        if self._eval_file is None:
            self._eval_file = open(self.eval_path, "a", encoding="utf-8")
        self._eval_file.write(json.dumps(record) + "\n")
        self._eval_file.flush()
        self._scalars("eval", record)
        return record

    def _scalars(self, prefix: str, record: dict) -> None:
        if self._tb is None:
            return
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(f"{prefix}/{k}", v, record["step"])
        self._tb.flush()

    def close(self) -> None:
        for f in (self._file, self._eval_file):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def progress_line(record: Mapping[str, Any]) -> str:
    """'step 12 | loss 0.123 | kl 0.45 | trust 0.91 | tok/s 830 | mfu 0.31' from whichever keys the record has."""
    parts = [f"step {record.get('step', '?')}"]
    for label, keys in PROGRESS_KEYS.items():
        for k in keys:
            if record.get(k) is not None:
                parts.append(f"{label} {_fmt(record[k])}")
                break
    return " | ".join(parts)


def format_summary(records: Iterable[Mapping[str, Any]] | str | Path, keys: Iterable[str] | None = None,
                   tail: int = 10) -> str:
    """End-of-run table: per numeric metric its first, last, min, max and mean over the last `tail` steps.

    records: metric dicts or a run directory / metrics.jsonl path.
    """
    if isinstance(records, (str, Path)):
        p = Path(records)
        records = read_jsonl(p / METRICS_FILE if p.is_dir() else p)
    records = list(records)
    if not records:
        return "(no metrics)"
    names = list(keys) if keys is not None else list(dict.fromkeys(
        k for r in records for k, v in r.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)))
    rows = [("metric", "first", "last", "min", "max", f"mean(last {tail})")]
    for name in names:
        vals = [float(r[name]) for r in records if isinstance(r.get(name), (int, float)) and not isinstance(r.get(name), bool)]
        if not vals:
            continue
        last_vals = vals[-tail:]
        rows.append((name, *(_fmt(x) for x in (vals[0], vals[-1], min(vals), max(vals), sum(last_vals) / len(last_vals)))))
    steps = [r.get("step") for r in records]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"steps {steps[0]}..{steps[-1]} ({len(records)} records)"]
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
