"""training/stages.py: the held-out metrics of a pipeline of runs, one column per stage, from summary.json."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tropd.training.stages import stage_columns, stages_text

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, name: str, before: dict | None, after: dict | None) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"before": before, "after": after, "steps": 2, "wall_s": 1.0}))
    return d


def test_columns_are_the_first_before_then_every_after(tmp_path):
    heal = _run(tmp_path, "heal", {"forward_kl": 4.0, "top1_agreement": 0.1},
                {"forward_kl": 1.5, "top1_agreement": 0.4})
    tropd = _run(tmp_path, "tropd", {"forward_kl": 1.5}, {"forward_kl": 1.25, "top1_agreement": 0.45})
    cols = stage_columns([heal, tropd])
    assert [name for name, _ in cols] == ["start (heal)", "after heal", "after tropd"]
    assert [m["forward_kl"] for _, m in cols] == [4.0, 1.5, 1.25]
    text = stages_text([heal, tropd]).splitlines()
    fkl = next(line for line in text if line.startswith("forward_kl (lower = better)"))
    assert fkl.split()[-3:] == ["4.0000", "1.5000", "1.2500"]
    agree = next(line for line in text if line.startswith("top1_agreement (higher = better)"))
    assert agree.split()[-3:] == ["0.1000", "0.4000", "0.4500"]
    assert not any(line.startswith("reverse_kl ") for line in text)  # absent everywhere: no row


def test_unfinished_or_metricless_run_is_one_line(tmp_path):
    heal = _run(tmp_path, "heal", {"forward_kl": 4.0}, {"forward_kl": 1.5})
    with pytest.raises(ValueError, match="no summary.json"):
        stage_columns([heal, tmp_path / "missing"])
    empty = _run(tmp_path, "empty", None, None)
    with pytest.raises(ValueError, match="no held-out metrics"):
        stage_columns([empty])
    p = subprocess.run([sys.executable, "-m", "megatron_tropd.training.stages", str(heal), str(tmp_path / "nope")],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().startswith("stages: ") and "Traceback" not in p.stderr
