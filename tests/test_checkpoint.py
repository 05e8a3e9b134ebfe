"""Training checkpoints on megatron-core dist_checkpointing (training/checkpoint.py) and megatron's
DistributedOptimizer on CPU/gloo:

- optimizer level (tiny GPTModel, a vocabulary-parallel loss that excludes padding rows): the distributed
  optimizer's update equals the plain optimizer's; a resumed optimizer continues bit-exactly at the same layout and
  within 1e-5 after resharding (TP1 DP2 -> TP2 DP1; TP1 DP2 -> TP1 PP2 tensor for tensor; plain and distributed
  optimizer), while one that lost its Adam moments does not;
- the whole training loop (tiny HF models): saved at TP2 PP1 and resumed at TP2 PP1 (bit-exact), TP1 PP2 and
  TP1 PP1 DP2 (metrics, weights and optimizer moments within 1e-5 of the uninterrupted run);
- SIGKILL of a rank during a save leaves the previous checkpoint loadable; a changed objective/model/data config
  is refused in one line.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from megatron_tropd.distributed.spawn import run_distributed

sys.path.insert(0, str(Path(__file__).parent))
from tiny_hf import char_tokenizer, tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
from megatron_tropd.training.metrics import VOLATILE_PREFIXES as VOLATILE  # wall-clock metrics

# ----------------------------------------------------------------------------------------- optimizer level

V = 150  # padded to 192 rows at TP=1 and 256 at TP=2 (make_vocab_size_divisible_by=64): padding differs by TP


def _arch():
    from megatron_tropd.models.arch import ModelArch

    return ModelArch(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                     vocab_size=V, make_vocab_size_divisible_by=64)


def _relayout(tp: int, pp: int = 1):
    """Re-initialise megatron's parallel state at another TP/PP over the same ranks (DP = world / (TP * PP))."""
    from megatron.core import parallel_state as ps

    from megatron_tropd.distributed import parallel

    ps.destroy_model_parallel()
    return parallel.initialize(tp, pp)


def _student(groups, use_do: bool, lr: float = 1e-3):
    from megatron_tropd.config import OptimConfig
    from megatron_tropd.training.roles import build_student

    torch.manual_seed(0)  # the same initial weights at every layout (use_cpu_initialization: full-tensor init)
    optim = OptimConfig(lr=lr, lr_schedule="cosine", clip_grad=1.0, weight_decay=0.01)
    return build_student(_arch(), groups, None, optim, total_updates=10, use_distributed_optimizer=use_do)


def _step(student, groups, seed: int, batch: int = 4, seq: int = 8) -> float:
    """One update on a fixed global batch: mean of squared real-vocabulary logits (each TP rank's shard; megatron's
    column-parallel backward sums the input gradients over TP; DDP sums over DP). Returns the grad norm."""
    from megatron.core.distributed import finalize_model_grads

    tokens = torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))
    per = batch // groups.dp_size
    tokens = tokens[groups.dp_rank * per:(groups.dp_rank + 1) * per]
    pos = torch.arange(seq).unsqueeze(0).expand_as(tokens)
    student.model.zero_grad_buffer()
    student.optimizer.zero_grad()
    logits = student.model(tokens, pos, None)  # [b, s, V_padded/tp]
    shard = logits.shape[-1]
    real = torch.arange(groups.tp_rank * shard, (groups.tp_rank + 1) * shard) < V
    loss = (logits.square() * real).sum() / (batch * seq * V)
    loss.backward()
    finalize_model_grads([student.model])
    _, grad_norm, _ = student.optimizer.step()
    student.scheduler.step(1)
    return float(grad_norm)


def _weights(student, groups) -> dict[str, torch.Tensor]:
    """Full (TP-gathered) weights, real vocabulary rows only."""
    from megatron_tropd.models.sharding import EMBEDDING, TIED_OUTPUT, iter_full_tensors

    return {n: (t[:V] if n in (EMBEDDING, TIED_OUTPUT) else t).clone() for n, t in iter_full_tensors(student.gpt, groups)}


def _rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)


def _local_optimizer_numel(student) -> int:
    return sum(t.numel() for opt in student.optimizer.chained_optimizers for st in opt.optimizer.state.values()
               for k, t in st.items() if k == "exp_avg")


def _optimizer_scenarios(groups, work: str, k: int = 2, n: int = 4) -> dict:
    """On 2 ranks. Reference: plain and distributed optimizer at TP1 DP2 for n steps, checkpoint after k.
    Then each checkpoint is resumed at TP1 DP2 (same layout) and TP2 DP1 (resharded) and stepped to n; a student that
    restores only the model weights (fresh Adam moments) is the control."""
    from megatron_tropd.training.checkpoint import load_checkpoint, save_checkpoint

    out = {}
    groups = _relayout(1)
    for use_do in (False, True):
        run_dir = f"{work}/{'do' if use_do else 'plain'}"
        st = _student(groups, use_do)
        norms = []
        for s in range(n):
            norms.append(_step(st, groups, s))
            if s == k - 1:
                save_checkpoint(run_dir, s, st, groups, {"sampler": None}, keep_last=1)
        out[use_do, "ref"] = (norms[k:], _weights(st, groups), _local_optimizer_numel(st))
    for tp in (1, 2):
        groups = _relayout(tp)
        for use_do in (False, True):
            ckpt = Path(f"{work}/{'do' if use_do else 'plain'}/checkpoints/step_{k - 1:06d}")
            st = _student(groups, use_do)
            state = load_checkpoint(ckpt, st, groups)
            out[use_do, f"tp{tp}"] = ([_step(st, groups, s) for s in range(k, n)], _weights(st, groups), state["step"])
        if tp == 2:  # control: the weights of the checkpoint, but the moments and step of a fresh optimizer
            from megatron_tropd.conversion.megatron_io import load_megatron_checkpoint

            st = _student(groups, False)
            load_megatron_checkpoint(st.gpt, ckpt, groups)  # a training checkpoint's weights, as a run's init
            out["lost_moments"] = ([_step(st, groups, s) for s in range(k, n)], _weights(st, groups), None)
    # PP: load each checkpoint at TP1 PP2 and save it again there; both hold the same model and optimizer tensors
    groups = _relayout(1, 2)
    for use_do in (False, True):
        ckpt = Path(f"{work}/{'do' if use_do else 'plain'}/checkpoints/step_{k - 1:06d}")
        st = _student(groups, use_do)
        load_checkpoint(ckpt, st, groups)
        again = save_checkpoint(f"{work}/pp2_{use_do}", k - 1, st, groups, {"sampler": None}, keep_last=1)
        out[use_do, "pp2_resaved"] = (_plain_tensors(ckpt), _plain_tensors(again))
    return out if groups.rank == 0 else None


def _plain_tensors(ckpt) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, whole (collective: all ranks read)."""
    from megatron.core import dist_checkpointing

    return {k: v for k, v in dist_checkpointing.load_plain_tensors(str(ckpt)).items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def optimizer_runs(tmp_path_factory):
    return run_distributed(_optimizer_scenarios, 2, args=(str(tmp_path_factory.mktemp("optim")),))[0]


def test_distributed_optimizer_runs_on_gloo_and_matches_the_plain_update(optimizer_runs):
    plain_norms, plain_w, plain_numel = optimizer_runs[False, "ref"]
    do_norms, do_w, do_numel = optimizer_runs[True, "ref"]
    assert do_numel < 0.6 * plain_numel  # DP=2: each rank holds about half of the Adam state
    assert do_norms == pytest.approx(plain_norms, rel=1e-5)
    assert _rel(plain_w, do_w) < 1e-5


@pytest.mark.parametrize("use_do", [False, True], ids=["plain", "distributed"])
def test_resume_restores_model_and_optimizer(optimizer_runs, use_do):
    ref_norms, ref_w, _ = optimizer_runs[use_do, "ref"]
    same_norms, same_w, step = optimizer_runs[use_do, "tp1"]
    assert step == 1
    assert same_norms == ref_norms and all(torch.equal(ref_w[k], same_w[k]) for k in ref_w)  # same layout: exact
    tp2_norms, tp2_w, _ = optimizer_runs[use_do, "tp2"]  # saved at TP1 DP2, resumed at TP2 DP1
    assert tp2_norms == pytest.approx(ref_norms, rel=1e-5)
    assert _rel(ref_w, tp2_w) < 1e-5


@pytest.mark.parametrize("use_do", [False, True], ids=["plain", "distributed"])
def test_checkpoint_loads_at_pp2_with_its_optimizer_state(optimizer_runs, use_do):
    """Saved at TP1 PP1 DP2, loaded at TP1 PP2 DP1 and saved again: the same model weights, Adam moments (and with
    the distributed optimizer fp32 main weights), tensor for tensor."""
    saved, resaved = optimizer_runs[use_do, "pp2_resaved"]
    assert saved.keys() == resaved.keys()
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in saved)
    assert use_do == any(k.startswith("optimizer.state.param.") for k in saved)  # the DO's fp32 main weights
    for k in saved:
        assert torch.equal(saved[k], resaved[k]), k  # same padded rows: PP does not change the vocabulary padding


def test_lost_adam_moments_change_the_next_update(optimizer_runs):
    """The control for the test above: the same weights with fresh optimizer state give a different step k+1."""
    ref_norms, ref_w, _ = optimizer_runs[False, "ref"]
    lost_norms, lost_w, _ = optimizer_runs["lost_moments"]
    assert lost_norms[0] == pytest.approx(ref_norms[0], rel=1e-5)  # same weights before step k+1 ...
    assert _rel(ref_w, lost_w) > 1e-3  # ... different weights after it


# ------------------------------------------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_models")
    tok = char_tokenizer()
    for name, layers, seed in (("student", 2, 0), ("teacher", 2, 1)):  # 2 layers: PP=2 divides both
        tiny_llama(seed=seed, layers=layers).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(4) for b in range(4)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _overrides(setup: Path, run_dir: Path, **extra) -> list[str]:
    base = {
        "student.path": setup / "student", "teacher.path": setup / "teacher", "train.run_dir": run_dir,
        "train.steps": 4, "train.save_interval": 2, "train.keep_last": 2, "train.progress": "false",
        "train.tensorboard": "false", "rollout.prompts_per_step": 2, "rollout.samples_per_prompt": 2,
        "rollout.max_new_tokens": 8, "optim.micro_batch_size": 2, "data.source": "jsonl",
        "data.path": setup / "prompts.jsonl", "data.size": 16, "data.eval_size": 0, "objective.topk": 8,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _layout_overrides(tp: int, pp: int) -> dict:
    return {"parallel.tensor_model_parallel_size": tp, "parallel.pipeline_model_parallel_size": pp}


RESUME_LAYOUTS = {"tp2pp1": (2, 1), "tp1pp2": (1, 2), "tp1pp1dp2": (1, 1)}


def _loop_scenarios(groups, setup: Path, work: Path) -> dict | None:
    """On 2 ranks: the uninterrupted run at TP2 PP1 (4 steps; checkpoints after steps 1 and 3), then that run's
    step-1 checkpoint resumed at each of RESUME_LAYOUTS for steps 2-3. Returns (metrics, final checkpoint tensors)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_tropd.config import load_config
    from megatron_tropd.distributed import parallel
    from megatron_tropd.training.loop import train

    def run(run_dir, tp, pp, resume):
        ps.destroy_model_parallel()  # train() initialises megatron's state at its own layout
        ov = _overrides(setup, run_dir, **_layout_overrides(tp, pp), **({"train.resume": "true"} if resume else {}))
        train(load_config(ROOT / "examples/configs/smollm2_tropd_cpu.yaml", ov))

    def result(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rows = [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]
        return rows, _plain_tensors(run_dir / "checkpoints" / "step_000003")  # model + optimizer tensors

    real_destroy = parallel.destroy
    parallel.destroy = ps.destroy_model_parallel  # train() ends with parallel.destroy(): keep the process group
    try:
        out = {}
        run(work / "full", 2, 1, resume=False)
        for name, (tp, pp) in RESUME_LAYOUTS.items():
            if groups.rank == 0:
                (work / name / "checkpoints").mkdir(parents=True)
                shutil.copytree(work / "full/checkpoints/step_000001", work / name / "checkpoints/step_000001")
            dist.barrier()
            run(work / name, tp, pp, resume=True)
        out = {name: result(work / name) for name in ("full", *RESUME_LAYOUTS)}  # load_plain_tensors: collective
    finally:
        parallel.destroy = real_destroy
    return out if groups.rank == 0 else None


@pytest.fixture(scope="module")
def loop_runs(tiny_setup, tmp_path_factory):
    return run_distributed(_loop_scenarios, 2, args=(tiny_setup, tmp_path_factory.mktemp("loop")), timeout=600)[0]


def _plain_rel(a: dict, b: dict, vocab: int = 128) -> float:
    """Max relative difference over every tensor of two checkpoints (model and optimizer state), real vocabulary
    rows only (the padded row count depends on TP)."""
    assert a.keys() == b.keys()
    worst = 0.0
    for k, x in a.items():
        y = b[k]
        if x.shape != y.shape:
            assert "word_embeddings" in k or "output_layer" in k, k
            x, y = x[:vocab], y[:vocab]
        worst = max(worst, float((x - y).abs().max() / x.abs().max().clamp_min(1e-12)))
    return worst


@pytest.mark.parametrize("layout", list(RESUME_LAYOUTS))
def test_resumed_loop_matches_uninterrupted(loop_runs, layout):
    full_rows, full_ckpt = loop_runs["full"]
    rows, ckpt = loop_runs[layout]
    assert [r["step"] for r in full_rows] == [0, 1, 2, 3]
    resumed = [r for r in rows if r["step"] >= 2]
    assert [r["step"] for r in resumed] == [2, 3]
    expected = full_rows[2:]
    if layout == "tp2pp1":  # same layout: bit-exact
        assert resumed == expected
        assert all(torch.equal(full_ckpt[k], ckpt[k]) for k in full_ckpt)
        return
    for got, want in zip(resumed, expected):
        assert got.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
            else:
                assert got[key] == value, key
    assert _plain_rel(full_ckpt, ckpt) < 1e-5


# -------------------------------------------------------------------------------------------------- kill -9

def _save_then_hang(groups, run_dir: str) -> None:
    """Checkpoint 0, one more update, then checkpoint 1 stops mid-save (common.pt written, the tensors next) until
    the test SIGKILLs rank 0."""
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from megatron_tropd.training.checkpoint import save_checkpoint

    st = _student(groups, False)
    _step(st, groups, 0)
    save_checkpoint(run_dir, 0, st, groups, {"sampler": {"epoch": 0}})
    weights = _weights(st, groups)
    if groups.rank == 0:
        torch.save(weights, Path(run_dir) / "weights_step0.pt")
    _step(st, groups, 1)

    def hang(self, sharded_state_dict, checkpoint_dir):
        Path(run_dir, f"MID_SAVE_{groups.rank}").write_text(str(os.getpid()))
        time.sleep(300)

    TorchDistSaveShardedStrategy.save = hang
    save_checkpoint(run_dir, 1, st, groups, {"sampler": {"epoch": 1}})


def _load_latest(groups, run_dir: str):
    from megatron_tropd.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    st = _student(groups, False)
    latest = latest_checkpoint(run_dir)
    state = load_checkpoint(latest, st, groups)
    weights = _weights(st, groups)
    saved = torch.load(Path(run_dir) / "weights_step0.pt")
    same = all(torch.equal(weights[k], saved[k]) for k in saved)
    save_checkpoint(run_dir, 1, st, groups, {"sampler": {"epoch": 1}})  # the next save replaces the leftover
    return latest.name, state, same, sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir())


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    from megatron_tropd.distributed.spawn import DistributedTestError

    killed = {}

    def kill_rank0_mid_save():
        marker, deadline = tmp_path / "MID_SAVE_0", time.time() + 300
        while not (marker.exists() and (tmp_path / "MID_SAVE_1").exists()) and time.time() < deadline:
            time.sleep(0.05)
        if marker.exists():
            killed["pid"] = int(marker.read_text())
            os.kill(killed["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_rank0_mid_save)
    killer.start()
    with pytest.raises(DistributedTestError, match="died without a report") as err:
        run_distributed(_save_then_hang, 2, tp=2, args=(str(tmp_path),), timeout=300)
    killer.join()
    assert killed and "-9" in str(err.value)  # rank 0 died of SIGKILL while both ranks were inside the save
    entries = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert entries == [".step_000001.tmp", "step_000000"]  # the interrupted save is only a temp dir ...
    assert (tmp_path / "checkpoints/.step_000001.tmp/common.pt").is_file()  # ... written halfway
    latest, state, same, entries = run_distributed(_load_latest, 2, tp=2, args=(str(tmp_path),))[0]
    assert (latest, state["step"], state["sampler"]) == ("step_000000", 0, {"epoch": 0})
    assert same  # the previous checkpoint's weights, bit-exact
    assert entries == ["step_000000", "step_000001"]


# ----------------------------------------------------------------------------------------- config refusal


def _fake_checkpoint(run_dir: Path, cfg) -> Path:
    from megatron_tropd.config import save_config
    from megatron_tropd.training import checkpoint

    ckpt = checkpoint.checkpoint_root(run_dir) / "step_000004"
    ckpt.mkdir(parents=True)
    save_config(cfg, ckpt / checkpoint.CONFIG_FILE)
    (ckpt / checkpoint.META_FILE).write_text(json.dumps({"format": checkpoint.FORMAT, "step": 4, "layout": {}}))
    (ckpt / checkpoint.COMPLETE).write_text("ok\n")
    return ckpt


def test_resume_refuses_a_changed_objective_model_or_data(tmp_path, capsys):
    from megatron_tropd.config import ConfigError, load_config
    from megatron_tropd.training import checkpoint
    from megatron_tropd.training.cli import add_arguments, run

    config = ROOT / "examples/configs/smollm2_tropd_cpu.yaml"
    base = [f"train.run_dir={tmp_path}"]
    ckpt = _fake_checkpoint(tmp_path, load_config(config, base))
    allowed = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2", "optim.lr=3e-4",
               "optim.lr_schedule=cosine", "optim.warmup_steps=2", "optim.micro_batch_size=2", "train.steps=40",
               "train.save_interval=2", "eval.interval=3"]
    checkpoint.check_resume_config(ckpt, load_config(config, base + allowed))  # no error
    changed = ["objective.name=opd", "student.path=builtin:smollm2-135m-instruct", "data.task=chain_sum",
               "rollout.temperature=0.7", "parallel.use_distributed_optimizer=true"]
    with pytest.raises(ConfigError) as err:
        checkpoint.check_resume_config(ckpt, load_config(config, base + changed))
    msg = str(err.value)
    assert "\n" not in msg
    for key in ("objective.name: 'tropd' -> 'opd'", "student.path", "data.task: 'basic_arithmetic' -> 'chain_sum'",
                "rollout.temperature: 1.0 -> 0.7", "parallel.use_distributed_optimizer: False -> True"):
        assert key in msg
    named = msg.split(" (checkpoint -> this run)")[0]
    assert "tensor_model_parallel" not in named and "optim." not in named
    # `tropd train --resume` stops with that one line before any model is built
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    capsys.readouterr()
    assert run(parser.parse_args(["--config", str(config), "--resume", *base, "objective.name=opd"])) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("tropd train: cannot resume from")
    assert "objective.name: 'tropd' -> 'opd'" in err_lines[0]
    # an old per-rank checkpoint is refused with the reason
    old = checkpoint.checkpoint_root(tmp_path) / "step_000009"
    old.mkdir()
    (old / "rank_00000.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="per-rank format"):
        checkpoint.check_resume_config(old, load_config(config, base))
