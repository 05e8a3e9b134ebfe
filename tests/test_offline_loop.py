"""Offline distillation through `tropd train`'s loop on tiny random HF models: an offline warm-up followed by
GKD-style mixing, and an offline stage of its own that lowers the held-out forward KL on teacher samples."""
import json
import sys
from pathlib import Path

import pytest

from megatron_tropd.distributed.spawn import run_distributed

sys.path.insert(0, str(Path(__file__).parent))
from test_train_loop import _overrides, _train  # noqa: E402

HELD_OUT = ("forward_kl", "reverse_kl", "top1_agreement", "top1_agreement_teacher", "teacher_nll",
            "student_entropy", "teacher_entropy", "distinct_2", "distinct_3", "student_nll_teacher",
            "reverse_kl_k1", "token_agreement", "accuracy", "response_length")


def _records(run_dir: Path, name="metrics.jsonl"):
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def test_warmup_then_mixing(tiny_models, tmp_path):
    ov = _overrides(tiny_models, tmp_path, **{"train.steps": 2, "offline.warmup_steps": 1,
                                              "offline.lambda_student": 0.5, "objective.name": "tropd",
                                              "eval.interval": 1})
    summary = run_distributed(_train, 1, args=(ov,))[0]
    rows = _records(tmp_path)
    assert [r["offline_fraction"] for r in rows] == [1.0, 0.5]  # warm-up: teacher-written only; then half
    assert rows[0]["prefixed_fraction"] == 0.0 and rows[0]["offline/token_frac"] == 1.0
    assert all(r["loss/offline_forward"] > 0 for r in rows)
    assert rows[1]["offline/token_frac"] < 1.0 and "trust/frac" in rows[1]
    for when in ("before", "after"):
        for key in HELD_OUT:
            assert summary[when][key] == pytest.approx(summary[when][key]), (when, key)  # present, not nan
    evals = _records(tmp_path, "eval_metrics.jsonl")
    assert [e["step"] for e in evals] == [0, 1, 2] and all("forward_kl" in e for e in evals)


def test_offline_stage_lowers_heldout_forward_kl(tiny_models, tmp_path):
    """lambda_student = 0: supervised KD on the teacher's samples (dense forward KL) for every step."""
    ov = _overrides(tiny_models, tmp_path, **{"train.steps": 4, "offline.lambda_student": 0,
                                              "objective.name": "full_vocab", "optim.lr": 3e-3,
                                              "guidance.enabled": "false", "rollout.samples_per_prompt": 4})
    summary = run_distributed(_train, 1, args=(ov,))[0]
    rows = _records(tmp_path)
    assert all(r["offline_fraction"] == 1.0 for r in rows)
    before, after = summary["before"], summary["after"]
    assert after["forward_kl"] < 0.9 * before["forward_kl"], (before["forward_kl"], after["forward_kl"])
    assert after["student_nll_teacher"] < before["student_nll_teacher"]
