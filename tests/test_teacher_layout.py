"""A teacher in its own TP/PP layout (own process groups over the student's ranks) scores exactly like a teacher in
the student's layout, and the student's update is the same, for OPD, EOPD and TrOPD (fkl, with prefixes).
Tiny random megatron models, 4 gloo ranks on CPU; the reference is the same-layout teacher in the same run."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_tropd.config import OptimConfig
from megatron_tropd.distributed.spawn import run_distributed
from megatron_tropd.models.sharding import gather_full_state_dict, load_full_state_dict
from megatron_tropd.objectives import ObjectiveConfig, Requirements, build_objective
from megatron_tropd.training.batch import build_batch
from test_step import STUDENT, TEACHER, VOCAB, _init_weights, _samples

OBJECTIVES = {
    "opd": ObjectiveConfig(name="opd"),
    "eopd": ObjectiveConfig(name="eopd", eopd_topk=8, eopd_tau=0.5),
    "tropd_fkl": ObjectiveConfig(name="tropd", outlier="fkl", topk=16, seed=7),
}
ALL = Requirements(teacher_topk=16, teacher_entropy=True)
# Adam's first step moves every weight by ~lr * g / (|g| + eps): for |g| near eps it turns float32 rounding noise of
# the gradient (~1e-9 here) into weight differences of order lr. eps = 1e-6 keeps that map well conditioned; the
# gradients themselves are compared directly as well.
ADAM_EPS = 1e-6


def _scorer(groups, weights, teacher_tp=None, teacher_pp=None, sequence_parallel=False):
    """The teacher in the student's layout (MegatronTeacherScorer), or in its own (OwnLayoutTeacherScorer)."""
    from megatron_tropd.distributed.parallel import build_groups
    from megatron_tropd.training.own_layout import OwnLayoutTeacherScorer
    from megatron_tropd.training.roles import build_teacher
    from megatron_tropd.training.scoring import MegatronTeacherScorer, ScoreOptions

    opts = ScoreOptions(temperature=0.9, vocab_size=VOCAB)
    if teacher_tp is None:
        load = lambda m: load_full_state_dict(m, weights["teacher"], groups)  # noqa: E731
        return MegatronTeacherScorer(build_teacher(TEACHER, groups, load), groups, opts)
    tg = build_groups(teacher_tp, teacher_pp)
    teacher = build_teacher(TEACHER, tg, lambda m: load_full_state_dict(m, weights["teacher"], tg),
                            sequence_parallel=sequence_parallel)
    return OwnLayoutTeacherScorer(teacher, tg, groups, opts)


def _on_response(t, mb, r):
    """Row r's teacher outputs (lp_t, tk_lp, tk_ids, ent_t) on its response positions, 0 elsewhere: only those are
    defined (prompt positions get no logits: schedule.logits_start; with sequence parallelism they do)."""
    m = mb.response_mask[r]
    return tuple(torch.where(m.view(-1, *[1] * (x.dim() - 2)), x[r], 0) for x in (t.lp_t, t.tk_lp, t.tk_ids, t.ent_t))


def _score_and_step(groups, weights, teacher_tp=None, teacher_pp=None):
    """Teacher outputs by sample id (on the student's last stage) and, per objective, one step's metrics and the
    student's weights after it."""
    from megatron_tropd.training.roles import build_student
    from megatron_tropd.training.step import StepOptions, distill_step

    scorer = _scorer(groups, weights, teacher_tp, teacher_pp)
    mine = build_batch(_samples(), pad_id=0).dp_shard(groups.dp_size, groups.dp_rank)
    micro = mine.micro_batches(2)
    scores = scorer.score(micro, ALL)
    out = {"layout": getattr(scorer, "groups", groups), "scores": {}, "steps": {}}
    out["layout"] = (out["layout"].tp_size, out["layout"].pp_size, out["layout"].dp_size)
    assert len(scores) == (len(micro) if groups.is_last_stage else 0)
    for mb, t in zip(micro, scores):
        for r, sid in enumerate(mb.sample_ids.tolist()):
            out["scores"][sid] = _on_response(t, mb, r)
    # micro-batches trimmed to a multiple of 2: widths 10 and 12 here, so the own-layout teacher pads rows of
    # different widths to one and crops its records back (PP keeps one width)
    opts = StepOptions(temperature=0.9, vocab_size=VOCAB, micro_batch_size=2, trim_multiple=2)
    for name, cfg in OBJECTIVES.items():
        student = build_student(STUDENT, groups, lambda m: load_full_state_dict(m, weights["student"], groups),
                                OptimConfig(lr=1e-3, clip_grad=1.0, adam_eps=ADAM_EPS), total_updates=1)
        metrics = distill_step(student, scorer, mine, build_objective(cfg), groups, 0, opts)
        # the gradient of the step (summed over DP; the last optimizer step's, still in the grad buffer) and the
        # weights after it
        grads = gather_full_state_dict(student.gpt, groups, value=lambda p: p.main_grad)
        out["steps"][name] = (metrics, grads, gather_full_state_dict(student.gpt, groups))
    return out


@pytest.fixture(scope="module")
def weights():
    return run_distributed(_init_weights, 1)[0]


@pytest.fixture(scope="module")
def reference(weights):
    """One rank, the teacher in the student's layout: the whole batch's teacher outputs and each objective's step."""
    return run_distributed(_score_and_step, 1, args=(weights,))[0]


# (student tp, student pp) on 4 ranks, (teacher tp, teacher pp)
LAYOUTS = [((1, 1), (2, 2)), ((2, 1), (4, 1)), ((1, 2), (2, 1))]


@pytest.mark.parametrize("student,teacher", LAYOUTS,
                         ids=["s-tp1dp4_t-tp2pp2", "s-tp2dp2_t-tp4", "s-pp2dp2_t-tp2dp2"])
def test_own_layout_teacher_matches_same_layout(weights, reference, student, teacher):
    outs = run_distributed(_score_and_step, 4, tp=student[0], pp=student[1], args=(weights, *teacher))
    assert outs[0]["layout"] == (teacher[0], teacher[1], 4 // (teacher[0] * teacher[1]))
    # every sample's teacher outputs reach each last-stage rank that trains it (all its TP ranks), and match
    seen = {}
    for o in outs:
        for sid, got in o["scores"].items():
            seen[sid] = seen.get(sid, 0) + 1
            for g, want, what in zip(got, reference["scores"][sid], ("lp_t", "tk_lp", "tk_ids", "ent_t")):
                if what == "tk_ids":
                    assert torch.equal(g, want), f"sample {sid} {what}"
                else:
                    torch.testing.assert_close(g, want, rtol=0, atol=1e-5, msg=lambda m: f"{sid} {what}: {m}")
    assert seen == {sid: student[0] for sid in reference["scores"]}
    for name, (m_ref, g_ref, w_ref) in reference["steps"].items():
        assert m_ref["grad_norm"] > 0
        for o in outs:
            m_own, g_own, w_own = o["steps"][name]
            for key, value in m_ref.items():
                if isinstance(value, float) and math.isnan(value):
                    assert math.isnan(m_own[key]), f"{name} {key}"
                    continue
                assert m_own[key] == pytest.approx(value, rel=1e-5, abs=1e-6), f"{name} {key}"
            for what, ref, own, tol in (("grad", g_ref, g_own, 1e-6), ("weight", w_ref, w_own, 1e-5)):
                for pname, tensor in ref.items():
                    other = own[pname]
                    if pname in ("embedding.word_embeddings.weight", "output_layer.weight"):
                        tensor, other = tensor[:VOCAB], other[:VOCAB]  # padded rows differ by TP
                    torch.testing.assert_close(other, tensor, rtol=1e-5, atol=tol,
                                               msg=lambda m: f"{name} student {what} {pname}: {m}")


def _save_teacher(groups, weights, path):
    from megatron_tropd.conversion.megatron_io import save_megatron_checkpoint
    from megatron_tropd.models.gpt import build_gpt_model

    model = build_gpt_model(TEACHER, groups)
    load_full_state_dict(model, weights["teacher"], groups)
    save_megatron_checkpoint(model, path, groups)


def _load_own_layout_teacher(groups, path):
    from megatron_tropd.conversion.megatron_io import load_megatron_checkpoint
    from megatron_tropd.distributed.parallel import build_groups
    from megatron_tropd.training.roles import build_teacher

    tg = build_groups(2, 1)
    teacher = build_teacher(TEACHER, tg, lambda m: load_megatron_checkpoint(m, path, tg))
    return gather_full_state_dict(teacher.model, tg)


def test_own_layout_teacher_loads_a_megatron_checkpoint(weights, tmp_path):
    """teacher.megatron_checkpoint in an own layout: saved at TP 1, loaded at teacher TP 2 beside a student TP 1 x
    DP 2 (replica ids from the teacher's own DP group)."""
    run_distributed(_save_teacher, 1, args=(weights, str(tmp_path / "ckpt")))
    outs = run_distributed(_load_own_layout_teacher, 2, args=(str(tmp_path / "ckpt"),))
    for out in outs:
        for name, tensor in weights["teacher"].items():
            assert torch.equal(out[name][:tensor.shape[0]], tensor), name


def _scores_only(groups, weights, teacher_tp, teacher_pp, sequence_parallel):
    scorer = _scorer(groups, weights, teacher_tp, teacher_pp, sequence_parallel)
    assert scorer.teacher.model.config.sequence_parallel == sequence_parallel
    micro = build_batch(_samples(), pad_id=0).dp_shard(groups.dp_size, groups.dp_rank).micro_batches(2)
    out = {}
    for mb, t in zip(micro, scorer.score(micro, ALL)):
        for r, sid in enumerate(mb.sample_ids.tolist()):
            out[sid] = _on_response(t, mb, r)
    return out


def test_own_layout_teacher_with_sequence_parallelism(weights, reference):
    """Teacher TP 4 with sequence parallelism beside a student TP 1 x DP 4 (sequences padded to a multiple of 8)."""
    outs = run_distributed(_scores_only, 4, args=(weights, 4, 1, True))
    got = {sid: v for o in outs for sid, v in o.items()}
    assert sorted(got) == sorted(reference["scores"])
    for sid, (lp, tk, ids, ent) in got.items():
        want = reference["scores"][sid]
        torch.testing.assert_close(lp, want[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(tk, want[1], rtol=0, atol=1e-5)
        assert torch.equal(ids, want[2])
        torch.testing.assert_close(ent, want[3], rtol=0, atol=1e-5)
