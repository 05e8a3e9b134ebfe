"""tools/gpu_check.sh --cpu: every check of the GPU run (ops vs float64, ops vs gather, the distillation step with
DDP and the distributed optimizer, save / SIGKILL / resume, the embedded engine) on tiny sizes here; one failing
check does not hide the others; the resume comparison sees a difference when there is one."""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def test_gpu_check_cpu_mode_passes_every_check(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "tools/gpu_check.sh"), "--cpu", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == ["ops_reference", "ops_bench", "distill_step", "embedded_engine", "resume"]
    assert report["passed"] and report["complete"] and report["env"]["mode"] == "cpu" and not report["env"]["missing"]
    assert all(c["status"] == "pass" for c in checks.values()), {k: c.get("summary") for k, c in checks.items()}
    assert "| ops_reference | pass |" in out.stdout and "| resume | pass |" in out.stdout
    # what ran is recorded, and every part either ran or says why not
    ref = checks["ops_reference"]
    assert {r["dtype"] for r in ref["rows"]} == {"float64", "float32", "bfloat16"} and len(ref["rows"]) == 21
    assert all(a["ok"] for a in checks["ops_bench"]["agreement"]) and len(checks["ops_bench"]["table"]) == 14
    for name in ("distill_step", "resume"):
        variants = checks[name]["variants"]
        assert set(variants) == {"ddp", "distributed_optimizer"}
        assert variants["ddp"]["status"] == "pass"
        for v in variants.values():
            assert v["status"] == "pass" or (v["status"] == "skip" and v["reason"]), v
    ddp = checks["resume"]["variants"]["ddp"]
    assert ddp["kill_landed_before_end"] and ddp["metrics_bit_exact"] and ddp["weights"]["bit_exact"]
    assert ddp["checkpoint_format"] in ("dist_checkpointing", "per-rank torch.save")
    assert ddp["weights"]["tensors"] > 0 and ddp["weights"]["optimizer_tensors"] > 0
    engine = checks["embedded_engine"]
    assert engine["new_tokens"] > 0 and engine["weight_update_ok"] and engine["logprob_vs_fp32_forward_max_abs"] < 1e-3


def test_one_failing_check_does_not_hide_the_others(tmp_path, monkeypatch):
    import gpu_check

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    rc = gpu_check.main(["--cpu", "--out", str(tmp_path), "--only", "ops_reference,ops_bench",
                         "--selftest-fail", "ops_reference"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert rc == 1 and not report["passed"]
    assert status == {"ops_reference": "fail", "ops_bench": "pass"}
    assert "made to fail on purpose" in report["checks"][0]["error"]


def test_resume_comparison_sees_differences():
    import gpu_check

    a = [{"step": 0, "loss": 1.0, "grad_norm": 2.0}, {"step": 1, "loss": 0.5, "grad_norm": float("nan")}]
    b = [dict(r) for r in a]
    assert gpu_check._compare_metrics(a, b) == (True, 0.0)
    b[1]["loss"] = 0.5 * (1 + 1e-6)
    exact, rel = gpu_check._compare_metrics(a, b)
    assert not exact and math.isclose(rel, 1e-6, rel_tol=1e-3)
    assert gpu_check._compare_metrics(a, b[:1])[1] == math.inf  # a missing step
