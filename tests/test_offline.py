"""Offline distillation (supervised KD on teacher-written rollouts) and GKD-style mixing: start-up config errors,
the per-step rollout plan, the objective's offline term against a float64 reference, and the step's gradient on a
mixed batch against plain autograd with plain log_softmax (no ops) at TP 1, TP 2 and DP 2."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from megatron_tropd.config import ConfigError, load_config
from megatron_tropd.distributed.spawn import run_distributed
from megatron_tropd.objectives import (
    ObjectiveConfig, OfflineTerm, PrefixOptions, TokenInputs, build_objective, sample_prefix_lengths,
)
from megatron_tropd.rollout.base import Sample, SamplingParams
from megatron_tropd.rollout.offline import MixOptions, generate_mixed, plan_rollouts, student_counts

sys.path.insert(0, str(Path(__file__).parent))
from test_step import STUDENT, TEACHER, VOCAB, _init_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "examples/configs/smollm2_tropd_cpu.yaml"
TEMPERATURE = 0.9


# --------------------------------------------------------------------------------------------------------------
# Start-up errors (config validation, before any model loads)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,needles", [
    (["offline.lambda_student=1.5"], ["offline.lambda_student=1.5", "[0, 1]"]),
    (["offline.lambda_student=-0.1"], ["offline.lambda_student=-0.1", "[0, 1]"]),
    (["train.steps=12", "offline.warmup_steps=13"], ["offline.warmup_steps=13", "longer than the run",
                                                     "train.steps=12", "offline.warmup_steps <= 12"]),
    (["offline.warmup_steps=-1"], ["offline.warmup_steps=-1", ">= 0"]),
    (["offline.divergence=tvd"], ["offline.divergence", "forward, reverse, jsd", "'tvd'"]),
    (["offline.divergence=jsd", "offline.jsd_beta=1.0"], ["offline.jsd_beta=1.0", "(0, 1)"]),
    (["offline.lambda_student=0.5", "rollout.engine=sglang", "sglang.teacher_servers=0"],
     ["offline.lambda_student=0.5", "no teacher server", "sglang.teacher_servers >= 1"]),
    (["offline.warmup_steps=2", "teacher.megatron_checkpoint=/ckpt/teacher"],
     ["offline.warmup_steps=2", "teacher.megatron_checkpoint='/ckpt/teacher'", "set teacher.path"]),
    (["offline.lambda_student=0", "parallel.pipeline_model_parallel_size=2"],
     ["offline.lambda_student=0", "pipeline_model_parallel_size=1", "got 2"]),
])
def test_bad_offline_settings_fail_at_start_up(overrides, needles):
    with pytest.raises(ConfigError) as e:
        load_config(MAIN, overrides)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_offline_settings_that_are_fine():
    for ov in (["train.steps=12", "offline.warmup_steps=12"], ["offline.lambda_student=0"], ["offline.lambda_student=0.25"],
               ["offline.lambda_student=0.5", "rollout.engine=sglang"],  # launches a teacher server (default 1)
               ["rollout.engine=sglang", "sglang.teacher_servers=0", "guidance.enabled=false"]):  # offline off
        cfg = load_config(MAIN, ov)
        assert (cfg.offline.term() is not None) == cfg.offline.active
    assert load_config(MAIN, ["offline.divergence=jsd", "offline.jsd_beta=0.3"]).offline.term() is None  # inactive
    term = load_config(MAIN, ["offline.lambda_student=0", "offline.divergence=reverse"]).offline.term()
    assert term == OfflineTerm("reverse", 0.5)


def test_resume_refuses_a_changed_offline_section():
    from megatron_tropd.config import to_dict
    from megatron_tropd.training.checkpoint import config_differences

    saved = to_dict(load_config(MAIN, ["offline.warmup_steps=3"]))
    assert config_differences(saved, load_config(MAIN, ["offline.warmup_steps=3"])) == []
    assert config_differences(saved, load_config(MAIN, ["offline.warmup_steps=3", "offline.lambda_student=0.5"])) \
        == ["offline.lambda_student: 1.0 -> 0.5"]


def test_the_teacher_engine_is_built_when_the_teacher_writes():
    from megatron_tropd.rollout.factory import needs_teacher_engine

    base = ["guidance.enabled=false", "eval.teacher_samples=false"]
    assert not needs_teacher_engine(load_config(MAIN, base))
    assert needs_teacher_engine(load_config(MAIN, base + ["offline.warmup_steps=1"]))
    assert needs_teacher_engine(load_config(MAIN, base + ["offline.lambda_student=0.9"]))
    assert needs_teacher_engine(load_config(MAIN, ["guidance.enabled=false"]))  # held-out teacher samples
    assert not needs_teacher_engine(load_config(MAIN, ["guidance.enabled=false", "data.eval_size=0"]))


# --------------------------------------------------------------------------------------------------------------
# The rollout plan of a step
# --------------------------------------------------------------------------------------------------------------
def test_student_counts_split_the_step():
    assert student_counts(3, 4, 1.0) == [4, 4, 4]
    assert student_counts(3, 4, 0.0) == [0, 0, 0]
    assert student_counts(3, 4, 0.5) == [2, 2, 2]
    assert student_counts(3, 4, 0.25) == [1, 1, 1]
    assert student_counts(3, 4, 0.4) == [2, 2, 1]  # round(4.8) = 5 student rollouts, spread over the prompts
    assert sum(student_counts(5, 3, 0.3)) == 5  # round-half-up(4.5)


def test_plan_warmup_then_mixing_and_shifted_guidance():
    opts = PrefixOptions(total_steps=10, max_response_len=16, prefix_fraction=0.5, seed=3)
    ids = [11, 12, 13]
    # no offline rollouts: exactly the guidance plan (TrOPD's defaults untouched)
    for step in range(10):
        lengths, teacher = plan_rollouts(ids, 4, step, opts, MixOptions())
        assert teacher == [0, 0, 0]
        assert lengths == [sample_prefix_lengths(i, 4, step, opts) for i in ids]
    mix = MixOptions(warmup_steps=4, lambda_student=0.5)
    for step in range(4):  # warm-up: teacher-written only
        assert plan_rollouts(ids, 4, step, opts, mix) == ([[], [], []], [4, 4, 4])
    shifted = PrefixOptions(total_steps=6, max_response_len=16, prefix_fraction=0.5, seed=3)
    for step in range(4, 10):  # then half each; the prefix schedule restarts at the end of the warm-up
        lengths, teacher = plan_rollouts(ids, 4, step, opts, mix)
        assert teacher == [2, 2, 2]
        assert lengths == [sample_prefix_lengths(i, 2, step - 4, shifted) for i in ids]
    unshifted = [[sample_prefix_lengths(i, 2, step, opts) for i in ids] for step in range(4, 10)]
    assert [plan_rollouts(ids, 4, step, opts, mix)[0] for step in range(4, 10)] != unshifted


class _Engine:
    def __init__(self, name):
        self.name, self.weight_version, self.requests = name, 7 if name == "student" else 0, []

    def generate(self, requests, params):
        self.requests.append((requests, params))
        out = []
        for req in requests:
            out.append([Sample(prompt_ids=list(req.prompt_ids), response_ids=list(req.prefix_ids) + [5, 6, 7],
                               logprobs=[-1.0] * 3, finish_reason="length", weight_version=self.weight_version,
                               prefix_len=len(req.prefix_ids), request_id=req.request_id, meta={"sample_index": k})
                        for k in range(req.first_sample_index, req.first_sample_index + req.n)])
        return out


def test_generate_mixed_orders_and_marks_samples():
    from megatron_tropd.training.batch import build_batch

    student, teacher = _Engine("student"), _Engine("teacher")
    params = SamplingParams(max_new_tokens=8, seed=1)
    prompts = [[1, 2], [3, 4, 5]]
    out = generate_mixed(student, teacher, prompts, [[2, 0], [0]], [1, 3], params, request_ids=[40, 41])
    assert [len(g) for g in out] == [3, 4]
    kinds = [[bool(s.meta.get("offline")) for s in g] for g in out]
    assert kinds == [[False, False, True], [False, True, True, True]]
    assert [s.meta["sample_index"] for s in out[1]] == [0, 1, 2, 3]
    assert all(s.weight_version == 7 and s.prefix_len == 0 for g in out for s in g if s.meta.get("offline"))
    seeds = {p.seed for reqs, p in teacher.requests}
    assert len(seeds) == 2 and params.seed not in seeds  # prefixes and offline rollouts: their own streams
    batch = build_batch([s for g in out for s in g], pad_id=0)
    assert batch.offline_mask.any(-1).tolist() == [False, False, True, False, True, True, True]
    assert not (batch.offline_mask & batch.prefix_mask).any() and not (batch.offline_mask & ~batch.response_mask).any()
    # a step without teacher-written rollouts never calls the teacher for them; an all-teacher step skips the student
    student2, teacher2 = _Engine("student"), _Engine("teacher")
    generate_mixed(student2, teacher2, prompts, [[], []], [2, 2], params, request_ids=[1, 2])
    assert student2.requests == [] and len(teacher2.requests) == 1
    with pytest.raises(ValueError, match="need a teacher rollout engine"):
        generate_mixed(student, None, prompts, [[0], [0]], [1, 0], params, request_ids=[1, 2])


# --------------------------------------------------------------------------------------------------------------
# The offline term (objective level, float64)
# --------------------------------------------------------------------------------------------------------------
def _term_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, s = 3, 6
    lp_s = (-torch.rand(b, s, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    response = torch.ones(b, s, dtype=torch.bool)
    response[:, 0] = False
    prefix = torch.zeros(b, s, dtype=torch.bool)
    prefix[1, 1:3] = True
    offline = torch.zeros(b, s, dtype=torch.bool)
    offline[2, 1:] = True
    return TokenInputs(
        lp_s=lp_s, lp_old=lp_s.detach().clone(), lp_t=-torch.rand(b, s, generator=g, dtype=torch.float64) * 3,
        response_mask=response, prefix_mask=prefix, sample_ids=torch.arange(b),
        positions=torch.arange(s).expand(b, s).contiguous(), step=0, offline_mask=offline,
        offline_kl=(torch.rand(b, s, generator=g, dtype=torch.float64) + 0.1).requires_grad_(True))


def test_offline_term_against_reference():
    """Mixed batch, OPD objective:
    loss = [sum_student (-rho r) + sum_offline D] / N_on + beta sum_prefix (-lp_s) / N_pre,
    N_on = non-prefix response tokens (student and teacher-written together)."""
    from megatron_tropd.objectives import global_counts, token_weights

    inp = _term_inputs()
    objective = build_objective(ObjectiveConfig(name="opd"), offline=OfflineTerm("forward"))
    assert objective.requirements.offline_kl == "forward"
    counts = global_counts([(inp.response_mask, inp.prefix_mask)])
    loss, metrics = objective(inp, token_weights(inp.response_mask, inp.prefix_mask, counts, dtype=torch.float64))
    g_s, g_kl = torch.autograd.grad(loss, [inp.lp_s, inp.offline_kl])
    onp = inp.response_mask & ~inp.prefix_mask
    student = onp & ~inp.offline_mask
    n_on, n_pre = float(onp.sum()), float(inp.prefix_mask.sum())
    r, kl, lp_s = inp.lp_t - inp.lp_old, inp.offline_kl.detach(), inp.lp_s.detach()
    ref = (float((-r)[student].sum()) + float(kl[inp.offline_mask].sum())) / n_on \
        + 1e-3 * float((-lp_s)[inp.prefix_mask].sum()) / n_pre
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-12)
    torch.testing.assert_close(g_kl, inp.offline_mask.double() / n_on, rtol=1e-12, atol=0)  # D differentiated
    expect = torch.where(student, -r / n_on, 0.0) + inp.prefix_mask.double() * (-1e-3 / n_pre)
    torch.testing.assert_close(g_s, expect, rtol=1e-12, atol=1e-15)  # no reward gradient on teacher tokens
    s, c = metrics["loss/offline_forward"]
    assert float(s) / float(c) == pytest.approx(float(kl[inp.offline_mask].mean()), rel=1e-12)
    s, c = metrics["offline/token_frac"]
    assert float(s) / float(c) == pytest.approx(5 / 15)


def test_offline_tokens_need_the_term():
    inp = _term_inputs()
    with pytest.raises(ValueError, match="no offline term"):
        build_objective(ObjectiveConfig(name="opd"))(inp, torch.ones_like(inp.lp_old))
    inp.offline_kl = None
    with pytest.raises(ValueError, match="offline_kl"):
        build_objective(ObjectiveConfig(name="opd"), offline=OfflineTerm())(inp, torch.ones_like(inp.lp_old))
    with pytest.raises(ValueError, match="offline divergence 'kl'"):
        OfflineTerm("kl")


# --------------------------------------------------------------------------------------------------------------
# The step on a mixed batch: gradient = plain autograd of the documented loss, plain log_softmax
# --------------------------------------------------------------------------------------------------------------
def _mixed_samples(n=8, seed=0):
    """Student rollouts (every 4th with a teacher prefix) and teacher-written rollouts (every 2nd)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = int(torch.randint(3, 7, (1,), generator=g))
        r = int(torch.randint(4, 10, (1,), generator=g))
        offline = i % 2 == 1
        prefix = int(torch.randint(1, r, (1,), generator=g)) if i % 4 == 0 else 0
        out.append(Sample(prompt_ids=torch.randint(0, VOCAB, (p,), generator=g).tolist(),
                          response_ids=torch.randint(0, VOCAB, (r,), generator=g).tolist(),
                          logprobs=(-torch.rand(r - prefix, generator=g) * 3).tolist(), finish_reason="length",
                          weight_version=0, prefix_len=prefix, request_id=100 + i, meta={"offline": offline}))
    return out


def _plain_divergence(ls, lt, kind, beta):
    """Per-token divergence from full log-prob rows [n, V] (plain torch, no ops)."""
    if kind == "forward":
        return (lt.exp() * (lt - ls)).sum(-1)
    if kind == "reverse":
        return (ls.exp() * (ls - lt)).sum(-1)
    lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log(1 - beta)]), 0)
    return beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)


def _reference_grad(groups, weights, kind, beta):
    """One unsharded GPTModel, the whole batch in one forward, the documented loss with plain log_softmax."""
    from megatron_tropd.models.gpt import build_gpt_model
    from megatron_tropd.models.sharding import load_full_state_dict
    from megatron_tropd.training.batch import build_batch

    student, teacher = build_gpt_model(STUDENT, groups), build_gpt_model(TEACHER, groups)
    load_full_state_dict(student, weights["student"], groups)
    load_full_state_dict(teacher, weights["teacher"], groups)
    batch = build_batch(_mixed_samples(), pad_id=0)
    pos = torch.arange(batch.inputs.shape[1]).expand_as(batch.inputs)
    with torch.no_grad():
        lt = torch.log_softmax(teacher(batch.inputs, pos, None)[..., :VOCAB].double() / TEMPERATURE, -1)
    ls = torch.log_softmax(student(batch.inputs, pos, None)[..., :VOCAB].double() / TEMPERATURE, -1)
    x = batch.targets
    lp_s, lp_t = ls.gather(-1, x.unsqueeze(-1))[..., 0], lt.gather(-1, x.unsqueeze(-1))[..., 0]
    onp = batch.response_mask & ~batch.prefix_mask
    student_tokens, offline, prefix = onp & ~batch.offline_mask, batch.offline_mask, batch.prefix_mask
    n_on, n_pre = float(onp.sum()), float(prefix.sum())
    r = (lp_t - lp_s).detach()
    opd = -(torch.exp(lp_s - lp_s.detach()) * r)[student_tokens].sum()
    div = _plain_divergence(ls[offline], lt[offline], kind, beta)
    loss = (opd + div.sum()) / n_on + 1e-3 * (-lp_s[prefix]).sum() / n_pre
    loss.backward()
    return {"grads": {k: p.grad.detach().float().clone() for k, p in student.named_parameters()},
            "offline_div": float(div.mean()), "loss": float(loss)}


def _step(groups, weights, kind, beta, micro_batch_size=2, fused=True):
    from megatron_tropd.config import OptimConfig
    from megatron_tropd.models.sharding import gather_full_state_dict, load_full_state_dict
    from megatron_tropd.training.batch import build_batch
    from megatron_tropd.training.roles import build_student, build_teacher
    from megatron_tropd.training.scoring import MegatronTeacherScorer
    from megatron_tropd.training.step import StepOptions, distill_step

    student = build_student(STUDENT, groups, lambda m: load_full_state_dict(m, weights["student"], groups),
                            OptimConfig(lr=1e-3, clip_grad=0.0), total_updates=1)
    opts = StepOptions(temperature=TEMPERATURE, vocab_size=VOCAB, micro_batch_size=micro_batch_size,
                       fused_teacher=fused)  # fused: the teacher runs once per micro-batch, inside the update
    teacher = MegatronTeacherScorer(
        build_teacher(TEACHER, groups, lambda m: load_full_state_dict(m, weights["teacher"], groups)), groups,
        opts.score)
    mine = build_batch(_mixed_samples(), pad_id=0).dp_shard(groups.dp_size, groups.dp_rank)
    objective = build_objective(ObjectiveConfig(name="opd"), offline=OfflineTerm(kind, beta))
    timings = {}
    metrics = distill_step(student, teacher, mine, objective, groups, 0, opts, timings=timings)
    grads = gather_full_state_dict(student.gpt, groups, value=lambda p: p.main_grad.detach().float())
    return {"metrics": metrics, "grads": grads, "timings": timings}


@pytest.fixture(scope="module")
def weights():
    return run_distributed(_init_weights, 1)[0]


def _trim(name, t):
    return t[:VOCAB] if name in ("embedding.word_embeddings.weight", "output_layer.weight") else t


CASES = [("forward", 0.5, 1, 1, True), ("forward", 0.5, 2, 2, True), ("forward", 0.5, 2, 1, True),
         ("forward", 0.5, 2, 2, False), ("reverse", 0.5, 2, 2, True), ("jsd", 0.3, 2, 2, True)]


@pytest.mark.parametrize("kind,beta,world,tp,fused", CASES,
                         ids=[f"{c[0]}-w{c[2]}-tp{c[3]}" + ("" if c[4] else "-separate") for c in CASES])
def test_mixed_step_gradient_is_the_documented_loss_gradient(weights, kind, beta, world, tp, fused):
    ref = run_distributed(_reference_grad, 1, args=(weights, kind, beta))[0]
    outs = run_distributed(_step, world, tp=tp, args=(weights, kind, beta), kwargs={"fused": fused})
    assert outs[0]["timings"]["passes/teacher"] == (1.0 if fused else 2.0)
    for out in outs:
        m = out["metrics"]
        assert m[f"loss/offline_{kind}"] == pytest.approx(ref["offline_div"], rel=1e-4)
        assert m["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-6)
        assert m["offline_fraction"] == 0.5 and m["offline/nonfinite_frac"] == 0.0
    for name, g in ref["grads"].items():
        torch.testing.assert_close(_trim(name, outs[0]["grads"][name]), _trim(name, g), rtol=1e-4, atol=1e-6,
                                   msg=lambda msg: f"{kind} grad {name}: {msg}")


def test_offline_step_refuses_pipeline_parallelism(weights):
    with pytest.raises(Exception, match="pipeline_model_parallel_size = 1"):
        run_distributed(_step, 2, pp=2, args=(weights, "forward", 0.5))
