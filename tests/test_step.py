"""The distillation step (teacher scoring + student update) is layout invariant, keeps the teacher frozen, and
reduces the KL estimate on a fixed batch. Tiny random megatron models, gloo ranks on CPU."""
import math
import sys
from pathlib import Path

import pytest
import torch

from megatron_tropd.training.batch import build_batch
from megatron_tropd.config import OptimConfig
from megatron_tropd.models.arch import ModelArch
from megatron_tropd.models.gpt import build_gpt_model
from megatron_tropd.objectives import ObjectiveConfig, build_objective
from megatron_tropd.rollout.base import Sample
from megatron_tropd.models.sharding import gather_full_state_dict, load_full_state_dict
from megatron_tropd.distributed.spawn import run_distributed

VOCAB = 200
STUDENT = ModelArch(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                    vocab_size=VOCAB, make_vocab_size_divisible_by=8)
TEACHER = ModelArch(num_layers=4, hidden_size=48, num_attention_heads=4, num_query_groups=4, ffn_hidden_size=96,
                    vocab_size=VOCAB, make_vocab_size_divisible_by=8)
OBJECTIVES = {
    "opd": ObjectiveConfig(name="opd"),
    "reopold": ObjectiveConfig(name="reopold"),
    "eopd": ObjectiveConfig(name="eopd", eopd_topk=8, eopd_tau=0.5),
    "tropd_fkl": ObjectiveConfig(name="tropd", outlier="fkl", topk=16, seed=7),
}


def _init_weights(groups):
    out = {}
    for role, arch in (("student", STUDENT), ("teacher", TEACHER)):
        torch.manual_seed(0 if role == "student" else 1)
        full = gather_full_state_dict(build_gpt_model(arch, groups), groups)
        out[role] = {k: v + 0.02 * torch.randn_like(v) for k, v in full.items()}
    return out


def _samples(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = int(torch.randint(3, 7, (1,), generator=g))
        r = int(torch.randint(4, 10, (1,), generator=g))
        prefix = int(torch.randint(1, r, (1,), generator=g)) if i % 2 else 0  # half the rollouts have a prefix
        out.append(Sample(prompt_ids=torch.randint(0, VOCAB, (p,), generator=g).tolist(),
                          response_ids=torch.randint(0, VOCAB, (r,), generator=g).tolist(),
                          logprobs=(-torch.rand(r - prefix, generator=g) * 3).tolist(), finish_reason="length",
                          weight_version=0, prefix_len=prefix, request_id=100 + i))
    return out


def _run_step(groups, weights, objective_cfg, steps=1, micro_batch_size=2, lr=1e-3, epochs=1, minibatches=1):
    from megatron_tropd.training.roles import build_student, build_teacher
    from megatron_tropd.training.scoring import MegatronTeacherScorer
    from megatron_tropd.training.step import StepOptions, distill_step

    student = build_student(STUDENT, groups, lambda m: load_full_state_dict(m, weights["student"], groups),
                            OptimConfig(lr=lr, clip_grad=1.0), total_updates=steps * epochs * minibatches)
    batch = build_batch(_samples(), pad_id=0)
    mine = batch.dp_shard(groups.dp_size, groups.dp_rank, minibatches)
    objective = build_objective(objective_cfg)
    opts = StepOptions(temperature=0.9, vocab_size=VOCAB, micro_batch_size=micro_batch_size,
                       updates_per_batch=epochs, minibatches_per_update=minibatches)
    teacher = MegatronTeacherScorer(
        build_teacher(TEACHER, groups, lambda m: load_full_state_dict(m, weights["teacher"], groups)), groups, opts.score)
    history = [distill_step(student, teacher, mine, objective, groups, step, opts) for step in range(steps)]
    return {
        "metrics": history,
        "student": gather_full_state_dict(student.gpt, groups),
        "teacher": gather_full_state_dict(teacher.teacher.model, groups),
        "teacher_requires_grad": any(p.requires_grad for p in teacher.teacher.model.parameters()),
    }


@pytest.fixture(scope="module")
def weights():
    return run_distributed(_init_weights, 1)[0]


@pytest.fixture(scope="module")
def references(weights):
    return {name: run_distributed(_run_step, 1, args=(weights, cfg))[0] for name, cfg in OBJECTIVES.items()}


def _close(a, b, what):
    # Weights after one Adam step (lr 1e-3): atol 3e-5 = 3% of one step. Adam's first update is ~ lr * g / |g|, so a
    # gradient element near zero turns float-reordering noise between layouts into a visible weight difference; the
    # gradients themselves agree to rel 1e-5 at every layout (tests/test_grad_scale.py).
    torch.testing.assert_close(a, b, rtol=1e-5, atol=3e-5, msg=lambda m: f"{what}: {m}")


LAYOUTS = [(2, 2, 1), (2, 1, 2), (4, 2, 2), (2, 1, 1)]


@pytest.mark.parametrize("world,tp,pp", LAYOUTS, ids=["tp2", "pp2", "tp2xpp2", "dp2"])
def test_step_is_layout_invariant(weights, references, world, tp, pp):
    for name, cfg in OBJECTIVES.items():
        ref = references[name]
        outs = run_distributed(_run_step, world, tp=tp, pp=pp, args=(weights, cfg))
        for out in outs:
            for key, value in ref["metrics"][0].items():
                got = out["metrics"][0][key]
                if math.isnan(value):
                    assert math.isnan(got), f"{name} {key}"
                else:
                    assert got == pytest.approx(value, rel=1e-5, abs=1e-6), f"{name} metric {key}"
            for pname, tensor in ref["student"].items():
                if pname == "embedding.word_embeddings.weight" or pname == "output_layer.weight":
                    tensor, other = tensor[:VOCAB], out["student"][pname][:VOCAB]  # padded rows differ by TP
                else:
                    other = out["student"][pname]
                _close(other, tensor, f"{name} student {pname}")


def test_teacher_frozen_student_moves_and_kl_decreases(weights):
    # The full-vocabulary reverse KL objective's loss IS the KL to the teacher at the batch's positions.
    cfg = ObjectiveConfig(name="full_vocab", full_vocab_kind="reverse")
    out = run_distributed(_run_step, 1, args=(weights, cfg), kwargs={"steps": 6, "lr": 1e-2})[0]
    for k, v in weights["teacher"].items():
        assert torch.equal(out["teacher"][k], v), f"teacher weight {k} changed"
    assert not out["teacher_requires_grad"]
    moved = [k for k, v in weights["student"].items() if not torch.equal(out["student"][k], v)]
    assert len(moved) == len(weights["student"])
    kl = [m["loss/full_reverse"] for m in out["metrics"]]
    assert kl[-1] < 0.7 * kl[0], kl


def test_metrics_cover_method_md(references):
    m = references["tropd_fkl"]["metrics"][0]
    for key in ("loss", "grad_norm", "lr", "response_length", "prefix_length", "reward/k1_rkl", "reward/mean_r",
                "trust/frac", "trust/outlier_frac", "fkl_outlier", "entropy/student"):
        assert key in m, sorted(m)


def test_no_rank_allocates_a_full_vocabulary_tensor():
    """V = 151936 at TP = 2: the largest allocation inside a TrOPD step is one logits shard [T, V/2] (float32), never
    a [T, V] tensor, and the step's peak stays within a few shards (tools/bench_step_memory.py, docs/ops.md)."""
    sys_path = str(Path(__file__).resolve().parents[1] / "tools")
    if sys_path not in sys.path:
        sys.path.insert(0, sys_path)
    from bench_step_memory import measure

    for row in run_distributed(measure, 2, tp=2, args=(151936, 2, 40, "tropd")):
        assert row["largest_alloc_bytes"] <= row["logits_shard_fp32_bytes"]
        assert row["largest_alloc_bytes"] < row["full_vocab_fp32_bytes"]
        assert row["peak_bytes"] < 4 * row["logits_shard_fp32_bytes"]


def test_ppo_epochs_and_minibatches_are_layout_invariant(weights):
    """2 epochs x 2 minibatches = 4 optimizer steps per rollout batch; the second epoch sees rho != 1 (the PPO clip
    of EOPD engages) and DP=2 x micro-batches gives the same weights as one rank."""
    cfg = OBJECTIVES["eopd"]
    kw = {"epochs": 2, "minibatches": 2, "micro_batch_size": 1, "lr": 1e-3}
    ref = run_distributed(_run_step, 1, args=(weights, cfg), kwargs=kw)[0]
    out = run_distributed(_run_step, 2, args=(weights, cfg), kwargs=kw)[0]
    for pname, tensor in ref["student"].items():
        _close(out["student"][pname], tensor, f"student {pname}")
    assert ref["metrics"][0]["loss"] == pytest.approx(out["metrics"][0]["loss"], rel=1e-5)
    assert ref["metrics"][0]["clipped_frac"] > 0  # ratios moved away from 1 within the step


def test_vocabulary_compatibility_check(tmp_path):
    from megatron_tropd.training.roles import check_vocab_compatible

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_hf import char_tokenizer

    a, b = tmp_path / "a", tmp_path / "b"
    char_tokenizer().save_pretrained(a)
    char_tokenizer().save_pretrained(b)
    assert check_vocab_compatible(a, b, STUDENT, STUDENT, VOCAB) == VOCAB  # same tokenizer files: fine
    # a teacher that pads its embedding to more rows shares the vocabulary (the tokenizer's)
    assert check_vocab_compatible(a, b, STUDENT, STUDENT.replace(vocab_size=300), VOCAB) == VOCAB
    with pytest.raises(ValueError, match="student .*vocab_size=200 is smaller than the shared tokenizer's 256"):
        check_vocab_compatible(a, b, STUDENT, STUDENT.replace(vocab_size=300), 256)
    (b / "tokenizer.json").write_text((b / "tokenizer.json").read_text().replace('"a": ', '"A_": ', 1))
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_vocab_compatible(a, b, STUDENT, STUDENT, VOCAB)