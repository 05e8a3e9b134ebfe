"""Several teachers routed per sample: two tiny teachers (one in the student's layout, one in its own TP 2 layout)
routed by the `task` field of a JSONL prompt file train a tiny student end to end on 2 gloo ranks; every sample is
scored by its routed teacher (recorded per call, and its scores equal that teacher's own scores of the row); the
per-teacher metrics reach metrics.jsonl and the plots. Bad teacher setups stop at start-up with one line."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from megatron_tropd.config import ConfigError, load_config
from megatron_tropd.distributed.spawn import run_distributed

sys.path.insert(0, str(Path(__file__).parent))
from tiny_hf import char_tokenizer, tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("add", "mul")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    tok = char_tokenizer()
    for name, layers, seed in (("student", 2, 0), ("teacher_add", 2, 1), ("teacher_mul", 2, 2)):
        tiny_llama(seed=seed, layers=layers).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    rows = [{"prompt": f"{a} {'+' if t == 'add' else '*'} {a + 1} =", "answer": str(a + a + 1 if t == "add" else
             a * (a + 1)), "task": t} for a in range(12) for t in TASKS]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _overrides(root: Path, run_dir: Path, **extra) -> list[str]:
    base = {
        "student.path": root / "student", "teacher.path": root / "teacher_add", "teacher.name": "add",
        "teacher.routes": "[add]", "teachers": f"[{{name: mul, path: {root / 'teacher_mul'}, routes: [mul], "
                                               f"tensor_model_parallel_size: 2}}]",
        "data.source": "jsonl", "data.path": root / "prompts.jsonl", "data.route_field": "task",
        "data.size": 20, "data.eval_size": 4, "data.system_prompt": "null", "train.run_dir": run_dir,
        "train.steps": 2, "train.progress": "false", "train.tensorboard": "false", "rollout.prompts_per_step": 4,
        "rollout.samples_per_prompt": 2, "rollout.max_new_tokens": 8, "optim.micro_batch_size": 2,
        "objective.topk": 8, "guidance.enabled": "true",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _train_routed(groups, overrides):
    """build_run, record which rows each teacher scores while training 2 steps, and compare the routed scores of
    one batch with each teacher scoring every row itself."""
    from megatron.core import parallel_state
    from megatron_tropd.training.batch import build_batch
    from megatron_tropd.training.loop import collect_rollouts, sample_prompts, train_step
    from megatron_tropd.training.run import build_run
    from megatron_tropd.training.teachers import RoutedTeacherScorer

    parallel_state.destroy_model_parallel()  # build_run sets up the layout (the gloo world stays up)
    cfg = load_config(ROOT / "examples/configs/smollm2_tropd_cpu.yaml", overrides)
    run = build_run(cfg)
    try:
        routed = run.teacher
        assert isinstance(routed, RoutedTeacherScorer) and routed.names == ["add", "mul"]
        seen = {name: [] for name in routed.names}  # sample ids each teacher was asked to score, per call

        def recording(index, scorer):
            original = scorer.score

            def score(micro, req):
                for mb in micro:
                    assert bool((mb.routes == index).all()), "a teacher got another teacher's rows"
                    seen[routed.names[index]].extend(mb.sample_ids.tolist())
                return original(micro, req)
            return score

        for i, s in enumerate(routed.scorers):
            s.score = recording(i, s)
        # one batch scored through the router vs each teacher scoring every row of it
        prompts = run.sampler.next_batch()
        rollouts = collect_rollouts(run, prompts, 0)
        samples, ids = rollouts.samples, rollouts.sample_ids
        tags = [p.metadata["task"] for p in sample_prompts(run, prompts, ids, 0)]
        routes = [run.router.route(p) for p in sample_prompts(run, prompts, ids, 0)]
        batch = build_batch(samples, run.pad_id, ids, pad_to_multiple=run.pad_multiple, routes=routes)
        micro = batch.dp_shard(groups.dp_size, groups.dp_rank).micro_batches(2)
        req = run.objective.requirements
        via_router = routed.score(micro, req)
        direct = [s.score([dataclasses.replace(mb, routes=torch.full_like(mb.routes, i)) for mb in micro], req)
                  for i, s in enumerate(routed.scorers)]  # each teacher scores every row itself
        checked = []
        for j, mb in enumerate(micro if groups.is_last_stage else []):
            for r in range(mb.size):
                mine, other = int(mb.routes[r]), 1 - int(mb.routes[r])
                assert torch.equal(via_router[j].lp_t[r], direct[mine][j].lp_t[r])
                assert torch.equal(via_router[j].tk_ids[r], direct[mine][j].tk_ids[r])
                assert not torch.allclose(via_router[j].lp_t[r], direct[other][j].lp_t[r])
                checked.append(int(mb.sample_ids[r]))
        for name in seen:
            seen[name].clear()
        run.sampler = type(run.sampler)(run.dataset.train, cfg.rollout.prompts_per_step, seed=cfg.data.seed)
        expected = {name: [] for name in routed.names}
        for step in range(cfg.train.steps):
            state = run.sampler.state_dict()
            prompts = run.sampler.next_batch()
            run.sampler.load_state_dict(state)  # train_step draws the same prompts again
            metrics = train_step(run, step)
            if run.logger:
                run.logger.log(step, metrics)
            n = cfg.rollout.samples_per_prompt
            for i, p in enumerate(prompts):
                sids = [(step * cfg.rollout.prompts_per_step + i) * n + k for k in range(n)]
                expected[p.metadata["task"]].extend(sids)
        if run.logger:
            run.logger.close()
        trained = {name: list(ids) for name, ids in seen.items()}
        # held-out metrics through the router (an own-layout teacher has no aligned logits: full-vocab KL is nan)
        held_out = run.evaluate(cfg.train.steps)
        return {"held_out": held_out, "tags": tags, "routes": routes, "checked": checked, "seen": trained,
                "expected": expected, "rank": groups.rank, "dp_rank": groups.dp_rank}
    finally:
        run.close()


def test_two_teachers_routed_by_task_train_end_to_end(setup, tmp_path):
    outs = run_distributed(_train_routed, 2, args=(_overrides(setup, tmp_path),), timeout=600)
    first = outs[0]
    assert first["routes"] == [TASKS.index(t) for t in first["tags"]]
    assert sorted(sum((o["checked"] for o in outs), [])) == sorted(set(sum((o["checked"] for o in outs), [])))
    assert len(sum((o["checked"] for o in outs), [])) == len(first["routes"])  # every row compared once
    for name in ("add", "mul"):
        # over the DP ranks, each teacher scored exactly the samples whose prompt has its task (pad repeats aside)
        got = set(sum((o["seen"][name] for o in outs), []))
        assert got == set(first["expected"][name]) and got, name
    held_out = first["held_out"]
    assert held_out["reverse_kl_k1"] == pytest.approx(held_out["reverse_kl_k1"])  # finite
    assert 0 <= held_out["token_agreement"] <= 1 and held_out["teacher_nll"] > 0
    assert held_out["reverse_kl"] != held_out["reverse_kl"]  # nan: not computed without aligned teacher logits
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    for name in ("add", "mul"):
        for key in ("reward/k1_rkl", "fkl_outlier", "response_tokens"):
            assert f"teacher/{name}/{key}" in records[0], sorted(records[0])
    from megatron_tropd.training.plot import plot_run

    written = {p.name for p in plot_run(tmp_path)}
    assert "teacher_add_reward_k1_rkl.png" in written and "teachers_reward_k1_rkl.png" in written


def _train_error(root: Path, tmp_path: Path, monkeypatch, capsys, **extra) -> str:
    """`tropd train` on 4 ranks (WORLD_SIZE, as torchrun sets it) with GPTModel construction refused: the one
    `tropd train:` line it prints."""
    from megatron.core.models.gpt import GPTModel

    from megatron_tropd.cli import build_parser
    from megatron_tropd.training import cli

    def refuse(*a, **k):
        raise AssertionError("a GPTModel was built before the bad input was reported")

    monkeypatch.setattr(GPTModel, "__init__", refuse)
    monkeypatch.setenv("WORLD_SIZE", "4")
    args = build_parser().parse_args(["train", "--config", str(ROOT / "examples/configs/smollm2_tropd_cpu.yaml"),
                                      *_overrides(root, tmp_path / "run", **extra)])
    assert cli.run(args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("tropd train:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_teacher_setups_are_one_line_before_models_load(setup, tmp_path, monkeypatch, capsys):
    other_tok = tmp_path / "other_tok"
    tiny_llama(seed=3).save_pretrained(other_tok)
    tok = char_tokenizer()
    tok.save_pretrained(other_tok)
    text = (other_tok / "tokenizer.json").read_text().replace('"a": ', '"A_": ', 1)
    (other_tok / "tokenizer.json").write_text(text)
    cases = {
        # mismatched tokenizer of the second teacher
        "tokenizers differ": {"teachers": f"[{{name: mul, path: {other_tok}, routes: [mul]}}]"},
        # a prompt tag no teacher takes, and no default teacher
        "route tag 'mul'": {"teachers": f"[{{name: mul, path: {setup / 'teacher_mul'}, routes: [div]}}]"},
        # a teacher layout that does not divide the world (4 ranks) or the model (4 heads)
        "does not divide the 4 ranks": {"teachers": f"[{{name: mul, path: {setup / 'teacher_mul'}, routes: [mul], "
                                                     f"tensor_model_parallel_size: 3}}]"},
        "does not divide num_hidden_layers=2": {"teachers": f"[{{name: mul, path: {setup / 'teacher_mul'}, "
                                                             f"routes: [mul], pipeline_model_parallel_size: 4}}]"},
        # an objective the own-layout scorer cannot serve (full-vocabulary KL), and one it can with one teacher only
        "cannot serve objective.name='full_vocab'": {"teachers": "[]", "teacher.routes": "[]",
                                                      "teacher.tensor_model_parallel_size": 2,
                                                      "objective.name": "full_vocab"},
        "one teacher only": {"objective.name": "full_vocab"},
        "scorer=same_layout runs the teacher in the student's layout": {
            "teacher.scorer": "same_layout", "teacher.tensor_model_parallel_size": 2},
    }
    for needle, extra in cases.items():
        msg = _train_error(setup, tmp_path, monkeypatch, capsys, **extra)
        assert needle in msg, (needle, msg)
    # config-level (no file read): duplicate names, two defaults, one tag routed twice
    for needle, extra in {
        "give each teacher a unique name": {"teachers": "[{name: add, path: x, routes: [mul]}]"},
        "both have no routes": {"teacher.routes": "[]", "teachers": "[{name: mul, path: x}]"},
        "each tag routes to one teacher": {"teachers": "[{name: mul, path: x, routes: [add]}]"},
    }.items():
        with pytest.raises(ConfigError, match=needle):
            load_config(ROOT / "examples/configs/smollm2_tropd_cpu.yaml", _overrides(setup, tmp_path, **extra))
        assert needle in _train_error(setup, tmp_path, monkeypatch, capsys, **extra)
