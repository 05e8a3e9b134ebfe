"""The packing and response-logits benchmarks run end to end at toy size (their real runs are in
docs/performance.md): each writes its JSON, the two modes give the same losses, and the optimised mode did less work
(fewer body positions packed; fewer output-layer positions at response positions only)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--steps", "1", "--teacher-layers", "1", "--student-layers", "1", "--vocab", "256", "--samples", "8",
       "--prompt", "8", "--min-response", "1", "--max-response", "64"]


def _run(tool: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / tool), *TOY, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| " in proc.stdout  # the table
    return json.loads(out.read_text())


def test_bench_packing_runs_and_packs(tmp_path):
    res = _run("bench_packing.py", tmp_path / "packing.json")
    padded, packed = res["modes"]["padded"], res["modes"]["packed"]
    assert packed["body_positions"] < padded["body_positions"]
    assert packed["logit_positions"] == padded["logit_positions"]
    assert res["max_loss_rel_diff"] < 1e-5 and len(packed["step_s"]) == 1 and res["speedup"] > 0


def test_bench_response_logits_runs(tmp_path):
    res = _run("bench_response_logits.py", tmp_path / "logits.json")
    assert 0 < res["response_positions"] < res["window_positions"]
    assert res["max_loss_rel_diff"] < 1e-5 and res["ratio"] > 0
