"""MetricsLogger (jsonl + TensorBoard + progress, resume truncation), format_summary, tropd plot."""
import json
import math

import pytest

from megatron_tropd.cli import main as tropd_main
from megatron_tropd.training.metrics import MetricsLogger, format_summary, progress_line, read_jsonl


def _m(step):
    return {"loss": 1.0 / (step + 1), "kl": 0.5 - 0.01 * step, "trust_frac": 0.9, "tokens_per_s": 100.0 + step,
            "resp_len": step * 2}


def test_resume_truncates_to_uninterrupted_run(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    with MetricsLogger(ref_dir, tensorboard=False, progress=False) as ml:
        for s in range(8):
            ml.log(s, _m(s))
        ml.log_eval(4, {"acc": 0.25})
    # Interrupted run: logged up to step 6 (and an eval at 6), but its last checkpoint is step 3;
    # the crash also left a torn line.
    with MetricsLogger(run_dir, tensorboard=True, progress=False) as ml:
        for s in range(7):
            ml.log(s, _m(s))
        ml.log_eval(6, {"acc": 0.9})
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    with MetricsLogger(run_dir, tensorboard=True, progress=False, resume_step=3) as ml:
        assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2, 3]
        assert read_jsonl(run_dir / "eval_metrics.jsonl") == []
        for s in range(4, 8):
            ml.log(s, _m(s))
            if s == 4:
                ml.log_eval(4, {"acc": 0.25})
    assert (run_dir / "metrics.jsonl").read_text() == (ref_dir / "metrics.jsonl").read_text()
    assert (run_dir / "eval_metrics.jsonl").read_text() == (ref_dir / "eval_metrics.jsonl").read_text()
    assert any((run_dir / "tensorboard").iterdir())
    # A fresh run (no resume_step) starts from an empty file.
    MetricsLogger(run_dir, tensorboard=False, progress=False).close()
    assert (run_dir / "metrics.jsonl").read_text() == ""


def test_values_are_plain_json(tmp_path):
    torch = pytest.importorskip("torch")
    with MetricsLogger(tmp_path, tensorboard=False, progress=False) as ml:
        rec = ml.log(0, {"loss": torch.tensor(0.5), "bad": float("nan"), "n": 3, "name": "x"})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line) == {"step": 0, "loss": 0.5, "bad": None, "n": 3, "name": "x"} == rec
    assert "NaN" not in line


def test_progress_and_summary():
    line = progress_line({"step": 3, **_m(3)})
    assert line == "step 3 | loss 0.25 | kl 0.47 | trust 0.9 | tok/s 103"
    table = format_summary([{"step": s, **_m(s)} for s in range(20)], tail=5)
    row = next(l for l in table.splitlines() if l.startswith("loss"))
    first, last, lo, hi, mean = row.split()[1:]
    assert float(first) == 1.0 and math.isclose(float(last), 1 / 20, rel_tol=1e-3)
    assert math.isclose(float(mean), sum(1 / (s + 1) for s in range(15, 20)) / 5, rel_tol=1e-3)
    assert "steps 0..19 (20 records)" in table and "resp_len" in table


def test_tropd_plot_writes_pngs(tmp_path, capsys):
    with MetricsLogger(tmp_path, tensorboard=False, progress=False) as ml:
        for s in range(5):
            ml.log(s, _m(s))
        ml.log_eval(4, {"acc": 0.5})
    out = tmp_path / "png"
    assert tropd_main(["plot", str(tmp_path), "--out", str(out), "--metrics", "loss,acc"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["eval_acc.png", "loss.png", "overview.png"]
    for p in out.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    assert tropd_main(["plot", str(tmp_path), "--metrics", "nope"]) == 2
    assert "unknown metric" in capsys.readouterr().err
    assert tropd_main(["plot", str(tmp_path / "empty")]) == 2
