"""tools/bench_step.py: its FLOP formulas against torch's FLOP counter, and our side of the benchmark end to end on
tiny random models (2 steps; the TRL peer is opt-in and must be reported as skipped when its venv is absent)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tools"))
from tiny_hf import char_tokenizer, tiny_llama  # noqa: E402

import bench_step  # noqa: E402


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_models")
    tok = char_tokenizer()
    for name, layers, seed in (("student", 1, 0), ("teacher", 2, 1)):
        tiny_llama(seed=seed, layers=layers).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def test_flop_formulas_match_torch_flop_counter(tiny_models):
    """Dims.forward counts exactly the matmul FLOPs torch executes for an HF forward (eager attention over the full
    s x s scores), and 3x that for forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models / "teacher", dtype=torch.float32,
                                                 attn_implementation="eager")
    dims = bench_step.Dims.from_hf(tiny_models / "teacher")
    assert dims.body_params == sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)
    b, s = 3, 17
    ids = torch.randint(0, 100, (b, s), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as fwd:
        model(input_ids=ids)
    assert fwd.get_total_flops() == dims.forward(b * s, b * s, b * s * s)
    with FlopCounterMode(display=False) as both:
        model(input_ids=ids).logits.sum().backward()
    assert both.get_total_flops() == 3 * dims.forward(b * s, b * s, b * s * s)


def test_generate_flops_drop_finished_rows():
    d = bench_step.Dims(layers=1, hidden=4, q_dim=4, kv_dim=2, ffn=8, vocab=10)
    kept = bench_step.generate_flops(d, [5, 5], [3, 1], drop_finished=False)  # the short row decodes padding
    dropped = bench_step.generate_flops(d, [5, 5], [3, 1], drop_finished=True)
    prefill = d.forward(2 * 5, 2, 2 * bench_step.tri(5))
    assert dropped == prefill + d.forward(2, 2, 2 * 5 + bench_step.tri(2))  # row 1: 2 decode steps; row 2: none
    assert kept == dropped + d.forward(2, 2, 2 * 5 + bench_step.tri(2))


def test_bench_ours_side_two_steps(tiny_models, tmp_path):
    out = tmp_path / "bench.json"
    absent = tmp_path / "no-trl-venv"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_step.py"), "--systems", "ours_full_jsd", "trl_distillation",
           "--trl-venv", str(absent), "--steps", "2", "--prompts", "2", "--samples", "2", "--max-new-tokens", "6",
           "--micro-batch", "2", "--threads", "1",  # one thread: a tiny model on a busy 2-core machine
           "--student", str(tiny_models / "student"), "--teacher", str(tiny_models / "teacher"),
           "--override", "data.size=8", "data.eval_size=0", "--peak-size", "128", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert f"TRL systems skipped: no TRL virtualenv at {absent}" in proc.stdout
    assert "--setup-trl" in proc.stdout

    rep = json.loads(out.read_text())
    assert rep["schema_version"] == bench_step.SCHEMA_VERSION
    for key in ("date", "command", "machine", "settings", "dims", "matmul_peak", "phases", "systems", "table"):
        assert key in rep
    assert rep["phases"] == list(bench_step.PHASES)
    assert rep["matmul_peak"]["gflops"] > 0
    skipped = rep["systems"]["trl_distillation"]
    assert "steps" not in skipped and "--setup-trl" in skipped["skipped"]

    ours = rep["systems"]["ours_full_jsd"]
    assert ours["kind"] == "ours" and ours["full_vocab"] is True
    assert [s["warmup"] for s in ours["steps"]] == [True, False]
    for s in ours["steps"]:
        assert set(s["phases"]) == set(bench_step.PHASES)
        assert all(v >= 0 for v in s["phases"].values()) and s["cpu_s"] > 0
        measured = sum(v for k, v in s["phases"].items() if k != "other")
        assert measured <= s["step_s"] + 1e-6
        assert math.isclose(sum(s["phases"].values()), s["step_s"], rel_tol=1e-6, abs_tol=1e-6)
        assert s["phases"]["rollout"] > 0 and s["phases"]["teacher_scoring"] > 0 and s["phases"]["update"] > 0
        # the teacher is fused into the update (one pass): its forward time is the teacher phase, not the update's
        assert 0 < s["subphases"]["update_teacher_forward"] <= s["phases"]["teacher_scoring"] + 1e-9
        assert s["timing_source"]["rollout"] == "step metrics"  # train_step exports time/rollout_s: used
        assert s["phases"]["rollout"] == s["step_time_metrics"]["time/rollout_s"]
        assert len(s["samples"]) == 4 and s["response_tokens"] == sum(x["response_len"] for x in s["samples"])
        assert all(1 <= x["response_len"] <= 6 for x in s["samples"])
    last = ours["steps"][-1]
    assert sum(last["flops_executed"].values()) > last["flops_model"] > 0  # padding + repeated passes
    summ = ours["summary"]
    assert summ["steps_timed"] == 1 and summ["step_s"] == last["step_s"]
    assert summ["tokens_per_s"] == pytest.approx(last["response_tokens"] / last["step_s"])
    assert 0 < summ["mfu_model"] < summ["mfu_executed"]
    assert "ours_full_jsd" in rep["table"] and "skipped" in rep["table"]
