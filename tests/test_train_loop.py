"""The whole training loop on tiny random HF models (seconds per run): every objective end to end, exact resume
after a SIGKILL, and a crash mid-save that leaves the previous checkpoint loadable."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_tropd.distributed.spawn import run_distributed

sys.path.insert(0, str(Path(__file__).parent))
from conftest import kill_after_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
from megatron_tropd.training.metrics import VOLATILE_PREFIXES as VOLATILE  # wall-clock metrics


def _overrides(models: Path, run_dir: Path, **extra) -> list[str]:
    base = {
        "student.path": models / "student", "teacher.path": models / "teacher", "train.run_dir": run_dir,
        "train.steps": 2, "train.progress": "false", "train.tensorboard": "false", "rollout.prompts_per_step": 2,
        "rollout.samples_per_prompt": 2, "rollout.max_new_tokens": 8, "optim.micro_batch_size": 2,
        "data.size": 16, "data.eval_size": 2, "objective.topk": 8, "objective.eopd_topk": 4,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _train(groups, overrides):
    from megatron_tropd.distributed import parallel
    from megatron_tropd.config import load_config
    from megatron_tropd.training.loop import train

    parallel.destroy()  # train() owns initialisation, as under torchrun
    return train(load_config(ROOT / "examples/configs/smollm2_tropd_cpu.yaml", overrides))


OBJECTIVE_OVERRIDES = {
    "tropd_fkl": {"objective.name": "tropd", "eval.benchmark": "rg:basic_arithmetic", "eval.benchmark_limit": 2},
    "tropd_clip": {"objective.name": "tropd", "objective.outlier": "clip"},
    "tropd_mask": {"objective.name": "tropd", "objective.outlier": "mask"},
    "opd": {"objective.name": "opd", "guidance.enabled": "false"},
    "reopold": {"objective.name": "reopold", "objective.switch_step": 1, "guidance.enabled": "false"},
    "eopd": {"objective.name": "eopd", "guidance.enabled": "false"},
    "entropy_opd": {"objective.name": "entropy_opd", "guidance.enabled": "false"},
    "jsd": {"objective.name": "jsd", "guidance.enabled": "false"},
    "full_vocab_reverse": {"objective.name": "full_vocab", "objective.full_vocab_kind": "reverse"},
}


@pytest.mark.parametrize("name", list(OBJECTIVE_OVERRIDES))
def test_loop_runs_with_every_objective(tiny_models, tmp_path, name):
    summary = run_distributed(_train, 1, args=(_overrides(tiny_models, tmp_path, **OBJECTIVE_OVERRIDES[name]),))[0]
    assert summary["steps"] == 2
    for when in ("before", "after"):
        assert summary[when]["reverse_kl_k1"] == pytest.approx(summary[when]["reverse_kl_k1"])  # finite, not nan
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["weight_version"] == 2
    # throughput: analytic-FLOPs MFU against the measured peak, and the phase times (training/flops.py)
    assert 0 < records[-1]["throughput/mfu"] < 1 and records[-1]["throughput/peak_flops"] > 0
    assert all(records[-1][k] >= 0 for k in ("time/teacher_s", "time/old_logprobs_s", "time/update_s", "time/sync_s"))
    assert (tmp_path / "checkpoints" / "step_000001" / "COMPLETE").exists()
    if "eval.benchmark" in OBJECTIVE_OVERRIDES[name]:  # the `tropd eval` harness inside the trainer's eval
        assert summary["after"]["bench/rg_basic_arithmetic/pass@1"] in (0.0, 0.5, 1.0)
        assert (tmp_path / "eval" / "step_000002").is_dir()


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _cli(overrides, resume=False):
    cmd = [sys.executable, "-m", "megatron_tropd.cli", "train", "--config",
           str(ROOT / "examples/configs/smollm2_tropd_cpu.yaml"), *overrides] + (["--resume"] if resume else [])
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_resume_after_kill_matches_uninterrupted_run(tiny_models, tmp_path):
    extra = {"train.steps": 4, "train.save_interval": 1, "train.keep_last": 3}
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    proc = _cli(_overrides(tiny_models, full_dir, **extra))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    # Same run, SIGKILLed as soon as its second checkpoint is complete, then resumed.
    proc = _cli(_overrides(tiny_models, killed_dir, **extra))
    killed_at = kill_after_checkpoint(proc, killed_dir, 1)
    resumed = _cli(_overrides(tiny_models, killed_dir, **extra), resume=True)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    assert killed_at < 3, "the run finished before it could be killed; the test proves nothing"
    assert _metrics(killed_dir) == _metrics(full_dir)
    # --resume of a complete run: its summary, nothing trained or appended (what scripts/run_main.sh relies on)
    before = (full_dir / "metrics.jsonl").read_text()
    again = _cli(_overrides(tiny_models, full_dir, **extra), resume=True)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    assert f"{full_dir} is complete (step_000003); nothing to resume" in out and "tropd train finished" in out
    assert (full_dir / "metrics.jsonl").read_text() == before
    # a longer run continues from it instead
    more = _cli(_overrides(tiny_models, full_dir, **{**extra, "train.steps": 5}), resume=True)
    out, _ = more.communicate(timeout=600)
    assert more.returncode == 0, out
    assert "resumed from" in out and [r["step"] for r in _metrics(full_dir)] == [0, 1, 2, 3, 4]


def _crash_mid_save(groups, run_dir):
    from megatron_tropd.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from megatron_tropd.config import OptimConfig
    from megatron_tropd.models.arch import ModelArch
    from megatron_tropd.training.roles import build_student

    arch = ModelArch(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                     vocab_size=100, make_vocab_size_divisible_by=8)
    student = build_student(arch, groups, None, OptimConfig(), total_updates=4)
    saved = {k: v.clone() for k, v in student.gpt.state_dict().items() if isinstance(v, torch.Tensor)}
    save_checkpoint(run_dir, 0, student, groups, {"sampler": {"epoch": 0}})
    with torch.no_grad():
        for p in student.gpt.parameters():
            p.add_(1.0)
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError("disk full (simulated crash mid-save)")

    torch.save = failing_save
    try:
        save_checkpoint(run_dir, 1, student, groups, {"sampler": {"epoch": 1}})
        crashed = False
    except OSError:
        crashed = True
    finally:
        torch.save = real_save
    latest = latest_checkpoint(run_dir)
    state = load_checkpoint(latest, student, groups)
    restored = {k: v for k, v in student.gpt.state_dict().items() if isinstance(v, torch.Tensor)}
    same = all(torch.equal(restored[k], v) for k, v in saved.items())
    return crashed, latest.name, state["step"], same, sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_crash_mid_save_leaves_previous_checkpoint_loadable(tmp_path):
    crashed, latest, step, same, entries = run_distributed(_crash_mid_save, 1, args=(tmp_path,))[0]
    assert crashed
    assert latest == "step_000000" and step == 0 and same
    assert "step_000001" not in entries  # only a .tmp leftover, never a half-written checkpoint
