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


# Published config.json numbers of the paper's math pair (a stand-in checkpoint: config + a shared tokenizer).
R1_DISTILL_1_5B = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536, "intermediate_size": 8960,
                   "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                   "vocab_size": 151936, "max_position_embeddings": 131072, "rope_theta": 10000.0,
                   "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
SKYWORK_OR1_7B = {**R1_DISTILL_1_5B, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                  "num_key_value_heads": 4, "vocab_size": 152064}


def test_paper_r1distill_skywork_recipe_passes_the_start_up_checks(tmp_path):
    """examples/configs/paper_r1distill1.5b_skywork7b.yaml with stand-in checkpoints (the real config.json numbers,
    a shared tokenizer): the vocabulary check accepts the 151936 / 152064-row pair, both archs fit the recipe's
    layout, and after alignment both build with the same padded row count at its TP."""
    import json
    import sys
    from pathlib import Path

    from megatron_tropd.config import load_config
    from megatron_tropd.models.arch import check_layout
    from megatron_tropd.models.hf_mapping import arch_from_hf_config
    from megatron_tropd.training.roles import check_vocab_compatible

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_hf import char_tokenizer

    dirs = {}
    for role, cfg in (("student", R1_DISTILL_1_5B), ("teacher", SKYWORK_OR1_7B)):
        d = tmp_path / role
        char_tokenizer().save_pretrained(d)
        (d / "config.json").write_text(json.dumps(cfg))
        dirs[role] = d
    root = Path(__file__).resolve().parents[1]
    run = load_config(root / "examples/configs/paper_r1distill1.5b_skywork7b.yaml",
                      [f"student.path={dirs['student']}", f"teacher.path={dirs['teacher']}"])
    tp, pp = run.parallel.tensor_model_parallel_size, run.parallel.pipeline_model_parallel_size
    s, t = arch_from_hf_config(dirs["student"]), arch_from_hf_config(dirs["teacher"])
    assert (s.vocab_size, t.vocab_size) == (151936, 152064)
    tokenizer_size = len(char_tokenizer())
    assert check_vocab_compatible(dirs["student"], dirs["teacher"], s, t, tokenizer_size) == tokenizer_size
    check_layout(s, tp, pp, "student")
    check_layout(t, tp, pp, "teacher")
    s, t = align_vocab_padding(s, t)
    assert s.padded_vocab_size(tp) == t.padded_vocab_size(tp) == 152064
