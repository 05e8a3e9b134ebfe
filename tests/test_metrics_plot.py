"""MetricsLogger (jsonl + TensorBoard + progress, resume truncation), format_summary, tropd plot (one run and
several overlaid: aggregate, grouping by seed suffix / --labels, the PNGs, the one-line errors)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tropd.cli import main as tropd_main
from megatron_tropd.training.metrics import MetricsLogger, format_summary, progress_line, read_jsonl
from megatron_tropd.training.plot import aggregate, default_label, group_runs


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


def _write_run(run_dir, train, evals=()):
    """A synthetic run dir: metrics.jsonl (and eval_metrics.jsonl) as json lines."""
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    if evals:
        (run_dir / "eval_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    return run_dir


def test_aggregate_mean_std_over_runs():
    runs = [[{"step": 0, "loss": 1.0}, {"step": 1, "loss": 4.0}],
            [{"step": 0, "loss": 2.0}, {"step": 1, "loss": 6.0}, {"step": 2, "loss": 5.0}],
            [{"step": 0, "loss": 3.0}, {"step": 2, "loss": None}, {"step": 3, "kl": 1.0}]]
    steps, mean, std, n = aggregate(runs, "loss")
    assert steps.tolist() == [0, 1, 2] and n.tolist() == [3, 2, 1]
    assert mean.tolist() == [2.0, 5.0, 5.0]  # step 1: only the two runs that logged it; step 2: one run
    assert math.isclose(std[0], math.sqrt(2 / 3)) and std[1] == 1.0 and std[2] == 0.0
    assert [a.size for a in aggregate(runs, "missing")] == [0, 0, 0, 0]


def test_grouping_by_seed_suffix_and_labels(tmp_path):
    assert [default_label(d) for d in ("runs/opd_seed0", "runs/opd-s12", "runs/tropd_seed1/", "runs/plain")] == \
        ["opd", "opd", "tropd", "plain"]
    dirs = ["r/opd_seed0", "r/tropd_seed0", "r/opd_seed1"]
    assert {k: [p.name for p in v] for k, v in group_runs(dirs).items()} == \
        {"opd": ["opd_seed0", "opd_seed1"], "tropd": ["tropd_seed0"]}
    assert list(group_runs(dirs, ["a", "a", "a"])) == ["a"]
    with pytest.raises(ValueError, match="--labels has 2 names for 3 run dirs"):
        group_runs(dirs, ["a", "b"])


def test_tropd_plot_overlays_runs(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    held_out = [{"step": 4, "reverse_kl": 1.0 + i, "accuracy": 0.5, "teacher_accuracy": 0.7} for i in range(3)]
    dirs = [_write_run(runs / f"opd_seed{i}", [{"step": s, **_m(s), "loss": 1.0 + i + s} for s in range(5)],
                       [held_out[i]]) for i in range(2)]
    dirs.append(_write_run(runs / "tropd_seed0", [{"step": s, **_m(s)} for s in range(3)], [held_out[2]]))
    out = tmp_path / "cmp"
    assert tropd_main(["plot", *map(str, dirs), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["eval_accuracy.png", "eval_distillation.png", "eval_reverse_kl.png",
                            "eval_teacher_accuracy.png", "kl.png", "loss.png", "overview.png", "resp_len.png",
                            "tokens_per_s.png", "trust_frac.png"])
    for p in out.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    assert "wrote 10 PNGs" in capsys.readouterr().out
    # --labels (one per run dir) and --metrics: only those PNGs, no distillation grid.
    out2 = tmp_path / "cmp2"
    argv = ["plot", *map(str, dirs), "--out", str(out2), "--labels", "a,b,a", "--metrics", "loss,accuracy"]
    assert tropd_main(argv) == 0
    assert sorted(p.name for p in out2.iterdir()) == ["eval_accuracy.png", "loss.png", "overview.png"]
    # Without --out: ./plots_compare; one run dir with --labels is an overlay of one group (no band).
    monkeypatch.chdir(tmp_path)
    assert tropd_main(["plot", str(dirs[0]), "--labels", "solo", "--metrics", "kl"]) == 0
    assert sorted(p.name for p in (tmp_path / "plots_compare").iterdir()) == ["kl.png", "overview.png"]


def test_tropd_plot_overlay_errors_are_one_line(tmp_path, capsys):
    a = _write_run(tmp_path / "a_seed0", [{"step": 0, "loss": 1.0}])
    b = _write_run(tmp_path / "a_seed1", [{"step": 0, "loss": 2.0}])
    cases = [([str(a), str(tmp_path / "missing")], "no metrics in"),
             ([str(a), str(b), "--labels", "x"], "--labels has 1 names for 2 run dirs"),
             ([str(a), str(b), "--metrics", "loss,nope"], "unknown metric(s) ['nope']; available: ['loss']")]
    for argv, message in cases:
        assert tropd_main(["plot", *argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tropd plot: ") and message in err and err.count("\n") == 1, err
    proc = subprocess.run([sys.executable, "-m", "megatron_tropd.cli", "plot", str(a), str(b), "--labels", "x"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
