"""Sequence packing (issue 14): each micro-batch's sequences run packed into fewer rows (block-diagonal causal
attention, per-sequence RoPE positions, hidden states put back in the padded layout before the output layer).
The packed step gives the padded step's loss, metrics and gradients (within 1e-5) at TP 1 and TP 2, for the
objectives that take every path (teacher scoring pass, in-micro-batch teacher, old-logprob pass), and at DP 2; the
body really ran fewer rows. Pipeline parallelism is refused (one p2p buffer shape per schedule)."""
import pytest
import torch

from megatron_tropd.config import OptimConfig
from megatron_tropd.distributed.spawn import run_distributed
from megatron_tropd.models.sharding import gather_full_state_dict, load_full_state_dict
from megatron_tropd.objectives import build_objective
from megatron_tropd.rollout.base import Sample
from megatron_tropd.training import packing
from megatron_tropd.training.batch import build_batch
from megatron_tropd.training.roles import build_student, build_teacher
from megatron_tropd.training.scoring import MegatronTeacherScorer
from megatron_tropd.training.step import StepOptions, distill_step
from test_grad_scale import OPTS, weights  # noqa: F401  (weights: the shared module fixture)
from test_redundant_passes import OBJECTIVES, _assert_same
from test_step import STUDENT, TEACHER, VOCAB

MBS = 4


def _samples(n=8, seed=3):
    """Responses of 1-20 tokens after prompts of 3-6: micro-batches of very different lengths, as rollouts that
    stop at EOS give."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, r = int(torch.randint(3, 7, (1,), generator=g)), int(torch.randint(1, 21, (1,), generator=g))
        prefix = int(torch.randint(0, r, (1,), generator=g)) if i % 2 else 0
        out.append(Sample(prompt_ids=torch.randint(0, VOCAB, (p,), generator=g).tolist(),
                          response_ids=torch.randint(0, VOCAB, (r,), generator=g).tolist(),
                          logprobs=(-torch.rand(r - prefix, generator=g) * 3).tolist(), finish_reason="stop",
                          weight_version=0, prefix_len=prefix, request_id=200 + i))
    return out


# ---------------------------------------------------------------------------------------------------- the plan
def _reference_visible(lengths, width):
    """Per sequence, written plainly: query position i of sequence j sees keys 0..i of sequence j."""
    return {(j, i): set(range(i + 1)) for j, n in enumerate(lengths) for i in range(n)}


def test_plan_places_every_token_once_and_attention_stays_inside_its_sequence():
    lengths, width = [9, 40, 12, 10], 40
    plan = packing.plan_packing(lengths, width)
    assert (plan.rows, plan.batch_size, plan.width) == (2, 4, 40)  # [40] and [9, 12, 10] (first fit, decreasing)
    assert plan.src.numel() == plan.dst.numel() == sum(lengths) and len(set(plan.dst.tolist())) == sum(lengths)
    where = {}  # packed flat index -> (sequence, position)
    for s_flat, d_flat in zip(plan.src.tolist(), plan.dst.tolist()):
        j, i = divmod(s_flat, width)
        assert i < lengths[j]
        where[d_flat] = (j, i)
        assert plan.position_ids.view(-1)[d_flat] == i  # RoPE / position at the token's place in its sequence
    visible = ~plan.attention_mask[:, 0]  # [r, s, s]
    for d_flat, (j, i) in where.items():
        r, q = divmod(d_flat, width)
        seen = {where[r * width + k][1] for k in visible[r, q].nonzero().flatten().tolist()
                if r * width + k in where and where[r * width + k][0] == j}
        assert seen == _reference_visible(lengths, width)[(j, i)]
        others = [k for k in visible[r, q].nonzero().flatten().tolist() if where.get(r * width + k, (j,))[0] != j]
        assert others == []  # nothing of another sequence (or of the free tail) is visible
    # free positions see only their own tail, and at least themselves (no fully masked softmax row)
    assert bool(visible.diagonal(dim1=1, dim2=2).all())
    x = torch.arange(4 * width).view(4, width)
    packed = packing.pack_rows(x, plan, fill=-1)
    assert sorted(v for v in packed.flatten().tolist() if v >= 0) == sorted(plan.src.tolist())
    hidden = torch.randn(width, plan.rows, 3)  # [s, r, h] -> [s, b, h]
    back = packing.unpack_hidden(hidden, plan)
    for s_flat, d_flat in zip(plan.src.tolist(), plan.dst.tolist()):
        (j, i), (r, c) = divmod(s_flat, width), divmod(d_flat, width)
        assert torch.equal(back[i, j], hidden[c, r])
    assert packing.plan_packing([30, 25, 20], 40) is None  # no row saved: the padded micro-batch runs as it is
    with pytest.raises(ValueError, match="do not fit rows of width 40"):
        packing.plan_packing([41], 40)


def test_sequence_lengths_end_at_the_last_response_target():
    batch = build_batch(_samples(4), pad_id=0)
    lengths = packing.sequence_lengths(batch.response_mask)
    for i, s in enumerate(_samples(4)):
        assert lengths[i] == len(s.prompt_ids) + len(s.response_ids) - 1  # inputs are tokens[:-1]


# ------------------------------------------------------------------------------------------ packed == padded step
def _step(groups, weights, cfg, pack, epochs=1):
    student = build_student(STUDENT, groups, lambda m: load_full_state_dict(m, weights["student"], groups),
                            OptimConfig(lr=1e-3, clip_grad=0.0), total_updates=epochs)
    opts = StepOptions(temperature=OPTS.temperature, vocab_size=VOCAB, micro_batch_size=MBS, updates_per_batch=epochs,
                       trim_multiple=4, pack_sequences=pack)
    teacher = MegatronTeacherScorer(
        build_teacher(TEACHER, groups, lambda m: load_full_state_dict(m, weights["teacher"], groups)), groups,
        opts.score)
    rows = {"student": 0, "teacher": 0}
    for key, model in (("student", student.gpt), ("teacher", teacher.teacher.model)):
        if not hasattr(model, "embedding"):  # not the first pipeline stage
            continue
        model.embedding.register_forward_hook(
            lambda module, args, out, key=key: rows.__setitem__(key, rows[key] + out.shape[1]))  # [s, b, h]
    mine = build_batch(_samples(), pad_id=0).dp_shard(groups.dp_size, groups.dp_rank, 1)
    metrics = distill_step(student, teacher, mine, build_objective(cfg), groups, 0, opts)
    grads = gather_full_state_dict(student.gpt, groups, value=lambda p: p.main_grad.detach().float())
    return {"metrics": metrics, "grads": grads, "rows": rows}


CASES = [("opd", 1), ("tropd_fkl", 1), ("full_jsd", 1), ("eopd", 1), ("tropd_fkl", 2)]  # (objective, epochs)


def _both(groups, weights):
    return {case: {pack: _step(groups, weights, OBJECTIVES[case[0]], pack, case[1]) for pack in (True, False)}
            for case in CASES}


@pytest.mark.parametrize("world,tp", [(1, 1), (2, 2), (2, 1)], ids=["tp1", "tp2", "dp2"])
def test_packed_step_matches_the_padded_step(weights, world, tp):
    outs = run_distributed(_both, world, tp=tp, args=(weights,))
    for case in CASES:
        for out in outs:
            packed, padded = out[case][True], out[case][False]
            _assert_same(packed, padded, f"{case} packed")
            assert padded["metrics"]["loss"] != 0.0
        for model in ("student", "teacher"):  # the body ran fewer rows for the same tokens (on some DP rank)
            rows = {pack: [out[case][pack]["rows"][model] for out in outs] for pack in (True, False)}
            assert all(0 < a <= b for a, b in zip(rows[True], rows[False])) and sum(rows[True]) < sum(rows[False]), \
                (case, model, rows)


def _pipelined(groups, weights):
    try:
        _step(groups, weights, OBJECTIVES["opd"], True)
    except ValueError as e:
        return str(e)
    return None


def test_packing_refuses_pipeline_parallelism(weights):
    errors = run_distributed(_pipelined, 2, pp=2, args=(weights,))
    assert all(e and "sequence packing needs pipeline_model_parallel_size = 1" in e for e in errors), errors


def _rope_rows(groups):
    from megatron_tropd.models.gpt import build_gpt_model

    model = build_gpt_model(STUDENT, groups)
    plan = packing.plan_packing([5, 7, 3], 12)
    padded = model.rotary_pos_emb(12)  # [s, 1, 1, d]: positions 0..s-1
    with packing.packed_forward(model, plan):
        packed = model.rotary_pos_emb(12)  # [s, r, 1, d]
    after = model.rotary_pos_emb(12)  # the hook is gone with the block
    return padded, packed, after, plan


def test_packed_rope_takes_each_token_at_its_own_position():
    """RoPE is relative, so an offset sequence gives the same attention in exact arithmetic (the step test cannot
    tell); the hook makes it exact in float too (large absolute angles lose precision) and is what learned
    absolute positions need. Checked directly: every packed token gets its own position's frequencies."""
    padded, packed, after, plan = run_distributed(_rope_rows, 1)[0]
    assert packed.shape == (12, plan.rows, 1, padded.shape[-1]) and torch.equal(after, padded)
    for s_flat, d_flat in zip(plan.src.tolist(), plan.dst.tolist()):
        (_, i), (r, c) = divmod(s_flat, 12), divmod(d_flat, 12)
        assert torch.equal(packed[c, r, 0], padded[i, 0, 0])


# ------------------------------------------------------------------------------------------ config and the loop
def test_config_refuses_packing_where_it_cannot_run():
    from megatron_tropd.config import ConfigError, load_config
    from test_config import MAIN

    with pytest.raises(ConfigError, match="optim.pack_sequences needs parallel.pipeline_model_parallel_size = 1"):
        load_config(MAIN, ["optim.pack_sequences=true", "parallel.pipeline_model_parallel_size=2"])
    with pytest.raises(ConfigError, match="optim.pack_sequences does not run with parallel.sequence_parallel"):
        load_config(MAIN, ["optim.pack_sequences=true", "parallel.tensor_model_parallel_size=2",
                           "parallel.sequence_parallel=true"])


def test_train_with_packing_matches_the_padded_run(tiny_models, tmp_path):
    """`tropd train optim.pack_sequences=true` end to end (rollouts of different lengths, micro-batches of 4): the
    step's metrics and the held-out eval after it equal the padded run's."""
    import json

    from test_train_loop import VOLATILE, _overrides, _train

    # short prompts, and 8 of the 128 ids stop a response: the random models' rollouts are 1-96 tokens long
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i % 7}=", "answer": str(i + i % 7)}) + "\n"
                            for i in range(30)))
    out = {}
    for pack in (True, False):
        run_dir = tmp_path / f"pack_{pack}"
        extra = {"train.steps": 1, "optim.micro_batch_size": 4, "rollout.samples_per_prompt": 4,
                 "rollout.max_new_tokens": 96, "rollout.stop_token_ids": f"[{','.join(map(str, range(6, 14)))}]",
                 "optim.adam_eps": 1e-4, "optim.pack_sequences": str(pack).lower(), "guidance.enabled": "false",
                 "data.source": "jsonl", "data.path": data, "data.use_chat_template": "false", "data.size": 20,
                 "data.eval_size": 4}
        summary = run_distributed(_train, 1, args=(_overrides(tiny_models, run_dir, **extra),))[0]
        record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
        out[pack] = {"step": {k: v for k, v in record.items() if not k.startswith(VOLATILE)}, "after": summary["after"],
                     "body": record["throughput/body_positions"], "logits": record["throughput/logit_positions"]}
    assert out[True]["step"].keys() == out[False]["step"].keys()
    assert out[False]["step"]["response_length"] < 96  # some rollouts stopped early: there was padding to pack
    assert out[True]["body"] < out[False]["body"] and out[True]["logits"] == out[False]["logits"], out
    for part in ("step", "after"):
        for key, value in out[False][part].items():
            if isinstance(value, float):
                assert out[True][part][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (part, key)
