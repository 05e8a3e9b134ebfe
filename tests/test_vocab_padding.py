"""Student and teacher that share a tokenizer but pad their embeddings to different row counts (Qwen2.5-1.5B /
R1-Distill-1.5B: 151936 rows, Qwen2.5-7B / Skywork-OR1-7B: 152064): the padding rows are excluded everywhere and
the two models' vocabulary shards are aligned, so the step equals the one of an equal-padding pair."""
import pytest
import torch

from megatron_tropd.config import OptimConfig
from megatron_tropd.distributed.spawn import run_distributed
from megatron_tropd.models.arch import align_vocab_padding
from megatron_tropd.models.sharding import fit_vocab_rows, gather_full_state_dict, load_full_state_dict
from megatron_tropd.objectives import ObjectiveConfig, build_objective
from megatron_tropd.training.batch import build_batch
from megatron_tropd.training.roles import build_student, build_teacher
from megatron_tropd.training.scoring import MegatronTeacherScorer
from megatron_tropd.training.step import StepOptions, distill_step
from test_step import STUDENT, TEACHER, VOCAB, _init_weights, _samples

TEACHER_ROWS = 216  # the teacher's checkpoint has 16 extra (padding) rows beyond the shared 200-token vocabulary
VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _padded_teacher_weights(weights):
    """The equal-padding teacher's tensors with 16 extra rows of large random values: if a padding row leaked into a
    softmax, top-k or KL, the step would change."""
    g = torch.Generator().manual_seed(5)
    out = dict(weights["teacher"])
    for name in VOCAB_TENSORS:
        if name in out:
            t = out[name][:VOCAB]
            out[name] = torch.cat([t, 8.0 * torch.randn(TEACHER_ROWS - VOCAB, t.shape[1], generator=g)])
    return out


def _step(groups, weights, objective_cfg, unequal):
    s_arch, t_arch = STUDENT, TEACHER
    t_weights = weights["teacher"]
    if unequal:
        s_arch, t_arch = align_vocab_padding(STUDENT, TEACHER.replace(vocab_size=TEACHER_ROWS))
        t_weights = _padded_teacher_weights(weights)

    def load(arch, full):
        def fn(model):
            rows = arch.padded_vocab_size(groups.tp_size)
            load_full_state_dict(model, {k: fit_vocab_rows(v, rows) if k in VOCAB_TENSORS else v
                                         for k, v in full.items()}, groups)
        return fn

    student = build_student(s_arch, groups, load(s_arch, weights["student"]), OptimConfig(lr=1e-3), total_updates=1)
    opts = StepOptions(temperature=0.9, vocab_size=VOCAB, micro_batch_size=2)  # the real (tokenizer) vocabulary
    teacher = MegatronTeacherScorer(build_teacher(t_arch, groups, load(t_arch, t_weights)), groups, opts.score)
    mine = build_batch(_samples(), pad_id=0).dp_shard(groups.dp_size, groups.dp_rank)
    metrics = distill_step(student, teacher, mine, build_objective(objective_cfg), groups, 0, opts)
    rows = {"student_rows": student.gpt.embedding.word_embeddings.weight.shape[0] * groups.tp_size,
            "teacher_rows": teacher.teacher.model.embedding.word_embeddings.weight.shape[0] * groups.tp_size}
    return {"metrics": metrics, "student": gather_full_state_dict(student.gpt, groups), **rows}


@pytest.fixture(scope="module")
def weights():
    return run_distributed(_init_weights, 1)[0]


OBJECTIVES = {"tropd_fkl": ObjectiveConfig(name="tropd", outlier="fkl", topk=16, seed=7),
              "full_forward_kl": ObjectiveConfig(name="full_vocab", full_vocab_kind="forward")}


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_unequal_padding_gives_the_equal_padding_update(weights, name, tp):
    cfg = OBJECTIVES[name]
    ref = run_distributed(_step, tp, tp=tp, args=(weights, cfg, False))[0]
    out = run_distributed(_step, tp, tp=tp, args=(weights, cfg, True))[0]
    # both models are built with the teacher's (larger) row count, so their shards line up at every TP
    assert out["student_rows"] == out["teacher_rows"] >= TEACHER_ROWS
    for key, value in ref["metrics"].items():
        assert out["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key
    for pname, t in ref["student"].items():
        a = out["student"][pname][:VOCAB] if pname in VOCAB_TENSORS else out["student"][pname]
        b = t[:VOCAB] if pname in VOCAB_TENSORS else t
        # atol 1e-5 = 1% of one Adam step (lr 1e-3): different shard sizes reorder float sums, and Adam's first step
        # (~ lr * g / |g|) amplifies that on near-zero gradients; grad_norm above agrees to rel 1e-5
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{pname}: {m}")
