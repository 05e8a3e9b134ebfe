"""The gradient of a step is exactly the gradient of the documented loss (a global token mean), whatever the
micro-batch size, data-parallel size, pipeline/tensor layout or minibatching; clipping acts on that gradient.

The reference is plain autograd: one unsharded GPTModel (no DDP, no megatron schedule), the whole batch as one
forward, the objective's loss with the same global token weights, `loss.backward()`.
"""
import pytest
import torch

from megatron_tropd.config import OptimConfig
from megatron_tropd.distributed.spawn import run_distributed
from megatron_tropd.models.gpt import build_gpt_model
from megatron_tropd.models.sharding import gather_full_state_dict, load_full_state_dict
from megatron_tropd.objectives import ObjectiveConfig, TokenInputs, build_objective, global_counts, token_weights
from megatron_tropd.training.batch import build_batch
from megatron_tropd.training.roles import build_student, build_teacher
from megatron_tropd.training.scoring import MegatronTeacherScorer, ScoreOptions, score_student_old
from megatron_tropd.training.step import StepOptions, distill_step
from megatron_tropd import ops
from test_step import STUDENT, TEACHER, VOCAB, _init_weights, _samples

OPTS = ScoreOptions(temperature=0.9, vocab_size=VOCAB)
# fkl outliers: a loss term that is differentiated directly (not only through lp_s), and a prefix term
OBJECTIVE = ObjectiveConfig(name="tropd", outlier="fkl", topk=16, seed=7)


def _reference_grad(groups, weights, objective_cfg):
    """Plain autograd of the documented loss on one rank: {name: grad} and the global grad norm."""
    model = build_gpt_model(STUDENT, groups)
    load_full_state_dict(model, weights["student"], groups)
    teacher = MegatronTeacherScorer(
        build_teacher(TEACHER, groups, lambda m: load_full_state_dict(m, weights["teacher"], groups)), groups, OPTS)
    objective = build_objective(objective_cfg)
    req = objective.requirements
    batch = build_batch(_samples(), pad_id=0)
    (t,) = teacher.score([batch], req)
    (o,) = score_student_old(model, [batch], groups, req, OPTS, with_entropy=True)
    counts = global_counts([(batch.response_mask, batch.prefix_mask)], None, torch.device("cpu"))
    logits = model(batch.inputs, torch.arange(batch.inputs.shape[1]).expand_as(batch.inputs), None)
    kw = dict(temperature=OPTS.temperature, vocab_size=VOCAB)
    inputs = TokenInputs(
        lp_s=ops.token_logprobs(logits, batch.targets, None, **kw), lp_old=o.lp_old, lp_t=t.lp_t,
        response_mask=batch.response_mask, prefix_mask=batch.prefix_mask, sample_ids=batch.sample_ids,
        positions=batch.positions, step=0, tk_lp=t.tk_lp, tk_ids=t.tk_ids,
        sk_lp=ops.logprobs_at(logits, t.tk_ids, None, **kw) if req.student_at_teacher_topk else None,
        ent_t=t.ent_t, ent_s=o.ent_s)
    loss, _ = objective(inputs, token_weights(batch.response_mask, batch.prefix_mask, counts,
                                              objective.cfg.aggregation))
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))
    return {"grads": grads, "norm": norm}


def _step(groups, weights, objective_cfg, micro_batch_size, clip_grad=0.0, minibatches=1, dtype="float32",
          recompute=False, sequence_parallel=False):
    # Adam's first step moves a weight by ~lr * g / (|g| + eps): with the default eps = 1e-8 a gradient entry near
    # eps turns float32 reassociation noise (micro-batches of other widths: RolloutBatch.trimmed) into weight
    # differences of order lr (measured: 1.7e-6 at eps 1e-8, 1.2e-6 at eps 1e-6, for one entry of 4096). eps = 1e-4
    # keeps the update comparison well conditioned; the gradients themselves are compared directly, without it
    # (test_gradient_is_the_documented_loss_gradient: rtol 1e-5, atol 1e-7 at every layout).
    student = build_student(STUDENT, groups, lambda m: load_full_state_dict(m, weights["student"], groups),
                            OptimConfig(lr=1e-3, clip_grad=clip_grad, adam_eps=1e-4), total_updates=minibatches,
                            dtype=dtype, recompute=recompute, sequence_parallel=sequence_parallel)
    opts = StepOptions(temperature=OPTS.temperature, vocab_size=VOCAB, micro_batch_size=micro_batch_size,
                       minibatches_per_update=minibatches)
    teacher = MegatronTeacherScorer(
        build_teacher(TEACHER, groups, lambda m: load_full_state_dict(m, weights["teacher"], groups),
                      sequence_parallel=sequence_parallel), groups, opts.score)
    mine = build_batch(_samples(), pad_id=0).dp_shard(groups.dp_size, groups.dp_rank, minibatches)
    metrics = distill_step(student, teacher, mine, build_objective(objective_cfg), groups, 0, opts)
    # what the optimizer applied: the (clipped) gradients it holds after the step
    grads = gather_full_state_dict(student.gpt, groups, value=lambda p: p.main_grad.detach().float())
    return {"metrics": metrics, "grads": grads, "student": gather_full_state_dict(student.gpt, groups)}


@pytest.fixture(scope="module")
def weights():
    return run_distributed(_init_weights, 1)[0]


@pytest.fixture(scope="module")
def reference(weights):
    return run_distributed(_reference_grad, 1, args=(weights, OBJECTIVE))[0]


def _trim(name, t):
    return t[:VOCAB] if name in ("embedding.word_embeddings.weight", "output_layer.weight") else t


def _assert_grads(got, ref, scale=1.0):
    for name, g in ref.items():
        torch.testing.assert_close(_trim(name, got[name]), _trim(name, g) * scale, rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"grad {name}: {m}")


LAYOUTS = [  # (world, tp, pp, micro_batch_size)
    (1, 1, 1, 1), (1, 1, 1, 2), (1, 1, 1, 4), (2, 1, 1, 1), (2, 1, 1, 2), (2, 2, 1, 2), (2, 1, 2, 1), (4, 2, 2, 1),
]


@pytest.mark.parametrize("world,tp,pp,mbs", LAYOUTS, ids=[f"w{w}-tp{t}-pp{p}-mbs{m}" for w, t, p, m in LAYOUTS])
def test_gradient_is_the_documented_loss_gradient(weights, reference, world, tp, pp, mbs):
    outs = run_distributed(_step, world, tp=tp, pp=pp, args=(weights, OBJECTIVE, mbs))
    for out in outs:
        assert out["metrics"]["grad_norm"] == pytest.approx(reference["norm"], rel=1e-5)
        assert out["metrics"]["grad_norm/max"] == pytest.approx(reference["norm"], rel=1e-5)
    _assert_grads(outs[0]["grads"], reference["grads"])


def test_updates_agree_across_micro_batch_and_dp_sizes(weights):
    ref = run_distributed(_step, 1, args=(weights, OBJECTIVE, 4))[0]["student"]
    for world, mbs in ((1, 1), (2, 2)):
        out = run_distributed(_step, world, args=(weights, OBJECTIVE, mbs))[0]["student"]
        for name, t in ref.items():
            torch.testing.assert_close(_trim(name, out[name]), _trim(name, t), rtol=1e-5, atol=1e-6)


def test_clip_grad_below_the_true_norm_clips_the_update(weights, reference):
    clip = 0.25 * reference["norm"]
    out = run_distributed(_step, 2, args=(weights, OBJECTIVE, 2), kwargs={"clip_grad": clip})[0]
    assert out["metrics"]["grad_norm"] == pytest.approx(reference["norm"], rel=1e-5)  # logged before clipping
    _assert_grads(out["grads"], reference["grads"], scale=clip / reference["norm"])


def test_grad_norm_of_every_optimizer_step_is_logged(weights):
    out = run_distributed(_step, 1, args=(weights, OBJECTIVE, 2), kwargs={"minibatches": 2})[0]["metrics"]
    assert out["grad_norm/max"] >= out["grad_norm"] > 0  # grad_norm is the mean over the 2 optimizer steps
    assert out["optimizer_steps"] == 2


# The GPU recipes' settings (examples/configs): sequence parallelism, full activation recompute, bf16 parameters with
# fp32 main gradients. Same gradient as the plain float32 reference (bf16: to bf16 precision).
RECIPE_SETTINGS = [  # (id, world, tp, pp, mbs, kwargs, rel)
    ("tp2-sp", 2, 2, 1, 2, {"sequence_parallel": True}, 1e-5),
    ("recompute-pp2", 2, 1, 2, 1, {"recompute": True}, 1e-5),
    ("bf16-dp2", 2, 1, 1, 2, {"dtype": "bfloat16"}, 3e-2),
]


@pytest.mark.parametrize("world,tp,pp,mbs,kwargs,rel", [r[1:] for r in RECIPE_SETTINGS],
                         ids=[r[0] for r in RECIPE_SETTINGS])
def test_recipe_settings_give_the_reference_gradient(weights, reference, world, tp, pp, mbs, kwargs, rel):
    outs = run_distributed(_step, world, tp=tp, pp=pp, args=(weights, OBJECTIVE, mbs), kwargs=kwargs)
    for out in outs:
        assert out["metrics"]["grad_norm"] == pytest.approx(reference["norm"], rel=rel)
    if rel <= 1e-5:
        _assert_grads(outs[0]["grads"], reference["grads"])
    else:  # bf16 weights: the fp32 main gradient points the same way as the float32 reference's
        got = torch.cat([_trim(n, outs[0]["grads"][n]).flatten() for n in reference["grads"]])
        ref = torch.cat([_trim(n, g).flatten() for n, g in reference["grads"].items()])
        assert torch.nn.functional.cosine_similarity(got, ref, dim=0) > 0.999
