"""`tropd plan`: parameter counts against published model sizes, one plan against a hand computation, and the
estimate for a small model against the peak memory measured on CPU."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_tropd import cli
from megatron_tropd.models.arch import ModelArch
from megatron_tropd.cluster.plan import (PRESETS, Layout, Workload, memory_plan, parse_bytes, stage_params,
                                 suggest_layouts, total_params)
from megatron_tropd.distributed.spawn import run_distributed

GIB = 1024**3


@pytest.mark.parametrize("name,total,non_embedding", [
    ("qwen3-1.7b", 1.72e9, 1.41e9),  # HF model card: 1.7B, 1.4B non-embedding
    ("qwen3-4b", 4.02e9, 3.63e9),  # 4.0B, 3.6B
    ("qwen3-32b", 32.76e9, 31.21e9),  # 32.8B, 31.2B
    ("skywork-or1-math-7b", 7.62e9, 6.53e9),  # Qwen2.5-7B: 7.61B, 6.53B
    ("r1-distill-qwen-1.5b", 1.78e9, 1.31e9),  # Qwen2.5-1.5B: 1.31B non-embedding; untied: 1.78B checkpoint
])
def test_preset_sizes_match_published_counts(name, total, non_embedding):
    a = PRESETS[name]
    emb = a.padded_vocab_size(1) * a.hidden_size * (1 if a.tie_word_embeddings else 2)
    assert total_params(a) == pytest.approx(total, rel=0.01)
    assert total_params(a) - emb == pytest.approx(non_embedding, rel=0.01)


def test_plan_matches_hand_computation():
    """Qwen3-1.7B student + Qwen3-4B teacher, bf16, TP 2, PP 1, DP 4, distributed optimizer, s = 4096, b = 1."""
    s_arch, t_arch = PRESETS["qwen3-1.7b"], PRESETS["qwen3-4b"]
    plan = memory_plan(s_arch, t_arch, Layout(tp=2, pp=1, dp=4, distributed_optimizer=True),
                       Workload(seq_len=4096, micro_batch=1))
    # student layer on one TP rank: q 2048x2048, kv 2x(2048x1024), o 2048x2048, mlp 3x2048x6144 -> /2;
    # replicated: 2 norms x 2048 + q/k norms 2 x 128
    s_layer = (2048 * 2048 + 2 * 2048 * 1024 + 2048 * 2048 + 3 * 2048 * 6144) // 2 + 2 * 2048 + 2 * 128
    assert s_layer == 25_165_824 + 4352  # 50,331,648 / 2 + 4,352
    # tied embeddings, PP 1: one table; 151936 = 1187 x 128 is padded to a multiple of 128 x TP = 256: 152064 / 2
    s_local = 28 * s_layer + 76_032 * 2048 + 2048
    assert plan.student_params_local == s_local
    t_layer = (2560 * 4096 + 2 * 2560 * 1024 + 4096 * 2560 + 3 * 2560 * 9728) // 2 + 2 * 2560 + 2 * 128
    assert plan.teacher_params_local == 36 * t_layer + 76_032 * 2560 + 2560
    assert plan.teacher_weights == plan.teacher_params_local * 2
    assert plan.student_weights == s_local * 2
    assert plan.gradients == s_local * 4
    assert plan.optimizer == -(-(s_local * 12) // 4)  # fp32 master + m + v, sharded over DP 4
    # activations per layer per token (bf16): 6h + (qkv 4096 + q/k-norm 3072 + 4 x 2048) / 2 + heads/2 x s + 5f/2
    per_token = 6 * 2048 + (4096 + 3072 + 4 * 2048) // 2 + 8 * 4096 + 5 * 6144 // 2
    assert plan.activations == 28 * 4096 * per_token * 2
    logits = 4096 * 76_032 * 2 * 2 + (1 << 21) * 4 * 2 + 4096 * 76_032 * 2
    assert plan.logits == logits
    t_per_token = 6 * 2560 + (6144 + 5120 + 4 * 4096) // 2 + 16 * 4096 + 5 * 9728 // 2
    assert plan.teacher_forward == 4096 * t_per_token * 2
    assert plan.total == sum(v for k, v in plan.as_dict().items() if k not in ("total",) and "params" not in k)
    flash = memory_plan(s_arch, t_arch, Layout(tp=2, pp=1, dp=4, distributed_optimizer=True),
                        Workload(seq_len=4096, micro_batch=1, flash_attention=True))
    assert plan.activations - flash.activations == 28 * 4096 * (8 * 4096) * 2  # the [a/t, s, s] scores
    # recompute keeps one [s, h] input per layer + one layer's working set
    rec = memory_plan(s_arch, t_arch, Layout(tp=2, dp=4), Workload(4096, 1, recompute=True))
    assert rec.activations == 28 * 4096 * 2048 * 2 + 4096 * per_token * 2


def test_pipeline_stage_and_suggestions():
    a = PRESETS["qwen3-32b"]
    # PP 2: 32 layers per stage; untied output layer (+ final norm) on the last stage == embedding size + h
    assert stage_params(a, 1, 2) == 32 * (total_params(a) - 2 * 151936 * 5120 - 5120) // 64 + 151936 * 5120 + 5120
    with pytest.raises(ValueError, match="does not divide num_hidden_layers"):
        stage_params(a, 1, 3)
    work = Workload(seq_len=9120, micro_batch=1, recompute=True)
    fits = suggest_layouts(PRESETS["qwen3-1.7b"], a, work, parse_bytes("80GiB"), num_gpus=16)
    assert fits, "a 32B teacher + 1.7B student fits 16 x 80 GiB"
    smallest = fits[0][0]
    assert smallest.tp * smallest.pp >= 2  # 64 GB of teacher weights alone cannot sit on one 80 GiB GPU
    assert all(p.total <= 0.9 * 80 * GIB for _, p in fits)
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("141G") == 141 * GIB
    with pytest.raises(ValueError, match="cannot parse"):
        parse_bytes("eighty")


def test_cli_json(capsys):
    assert cli.main(["plan", "--student", "qwen3-1.7b", "--teacher", "qwen3-4b", "--tp", "2", "--dp", "4",
                     "--distributed-optimizer", "--seq-len", "4096", "--gpu-memory", "80GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layout"]["tp"] == 2 and out["plan"]["total"] > out["plan"]["teacher_weights"] > 0
    assert out["fits"] and out["fits"][0]["total"] <= 0.9 * 80 * GIB


# ---------------------------------------------------------------------------------------------- measured on CPU
ARCH = ModelArch(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=320,
                 vocab_size=1000, qk_layernorm=True)
SEQ, MB = 256, 2


def _peak_step(groups, arch: ModelArch, seq: int, mb: int) -> dict:
    """One forward + backward + Adam step of a float32 GPTModel; returns parameter count and the peak of
    the bytes allocated during the step (torch.profiler memory events, summed in time order)."""
    from torch.profiler import ProfilerActivity, profile

    from megatron_tropd.models.gpt import build_gpt_model
    from megatron_tropd.ops import token_logprobs

    torch.manual_seed(0)
    model = build_gpt_model(arch, groups)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, arch.vocab_size, (mb, seq))
    pos = torch.arange(seq).unsqueeze(0).expand(mb, seq)

    def step():
        logits = model(tokens, pos, None)  # [b, s, v/tp]
        loss = -token_logprobs(logits, tokens, vocab_size=arch.vocab_size).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep .grad allocated, like megatron's persistent grad buffer

    step()  # creates Adam's m and v: the measured step then starts from the steady state
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return {"params": sum(p.numel() for p in model.parameters()), "peak_delta": peak, "end_delta": live}


def test_estimate_matches_measured_peak_on_cpu():
    """Measured peak = weights + grads + Adam m, v (16 bytes/param, live before the step; counted exactly) +
    the largest excess allocated during the step (activations, logits, their gradients, temporaries)."""
    res = run_distributed(_peak_step, 1, args=(ARCH, SEQ, MB))[0]
    plan = memory_plan(ARCH, None, Layout(), Workload(SEQ, MB, student_dtype="float32"))
    assert res["params"] == plan.student_params_local
    assert abs(res["end_delta"]) < 0.05 * res["peak_delta"]  # the step frees what it allocated
    measured = 16 * res["params"] + res["peak_delta"]
    assert plan.total == pytest.approx(measured, rel=0.20), (plan.as_dict(), res)
    # activations + logits are the part the formula predicts (states are exact): check them on their own too
    assert plan.activations + plan.logits == pytest.approx(res["peak_delta"], rel=0.30), (plan.as_dict(), res)


def test_chunk_size_matches_ops():
    from megatron_tropd import ops
    from megatron_tropd.cluster import plan

    assert plan.CHUNK_ELEMENTS == ops.CHUNK_ELEMENTS  # plan copies it to avoid importing torch.distributed


# ------------------------------------------------------------------------------ each role in its own layout
def test_plan_roles_match_hand_computation(capsys):
    """`tropd plan --json`: Qwen3-1.7B student at TP 1 x DP 8 (distributed optimizer) and a Qwen3-8B teacher in its
    own layout TP 2 x DP 4 (time-shared on the same 8 GPUs), bf16, s = 4096, b = 1, local attention."""
    assert cli.main(["plan", "--student", "qwen3-1.7b", "--teacher", "qwen3-8b", "--tp", "1", "--dp", "8",
                     "--teacher-tp", "2", "--distributed-optimizer", "--seq-len", "4096", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    s, t = out["student"], out["teacher"]
    # student, TP 1: q + k,v + o + SwiGLU mlp, plus 2 norms and q/k norms; tied embeddings (151936 = 1187 x 128)
    s_local = 28 * (2048 * 2048 + 2 * 2048 * 1024 + 2048 * 2048 + 3 * 2048 * 6144 + 2 * 2048 + 2 * 128) \
        + 151936 * 2048 + 2048
    assert s["params_local"] == s_local
    assert (s["weights"], s["gradients"], s["optimizer"]) == (2 * s_local, 4 * s_local, -(-12 * s_local // 8))
    s_token = 6 * 2048 + (16 + 2 * 8) * 128 + (16 + 8) * 128 + 4 * 16 * 128 + 16 * 4096 + 5 * 6144  # per layer
    assert s["activations"] == 28 * 4096 * s_token * 2
    assert s["logits"] == 4096 * 151936 * 2 * 2 + (1 << 21) * 4 * 2
    # teacher, TP 2 of 8 GPUs -> DP 4; untied embeddings, vocabulary padded to a multiple of 128 x 2: 152064 / 2
    assert (t["layout"]["tp"], t["layout"]["pp"], t["layout"]["dp"]) == (2, 1, 4)
    t_layer = (4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096 + 3 * 4096 * 12288) // 2 + 2 * 4096 + 2 * 128
    t_local = 36 * t_layer + 2 * 76_032 * 4096 + 4096
    assert t["params_local"] == t_local and t["weights"] == 2 * t_local
    assert (t["gradients"], t["optimizer"]) == (0, 0)  # frozen: no grad buffer, no optimizer state
    t_token = 6 * 4096 + (32 + 16) * 128 // 2 + (32 + 8) * 128 // 2 + 4 * 32 * 128 // 2 + 32 * 4096 // 2 \
        + 5 * 12288 // 2  # one layer's forward working set, per token
    assert t["activations"] == 4096 * t_token * 2
    assert t["logits"] == 4096 * 76_032 * 2 + (1 << 21) * 4 * 2
    # placements: time-shared peak = the larger phase; servers leave the student alone on the trainer GPUs
    s_total = 2 * s_local + 4 * s_local + -(-12 * s_local // 8) + s["activations"] + s["logits"]
    t_total = 2 * t_local + t["activations"] + t["logits"]
    scoring, training = 6 * s_local + -(-12 * s_local // 8) + t_total, s_total + 2 * t_local
    own = out["placements"]["own_layout"]
    assert (own["scoring"], own["training"], own["peak"]) == (scoring, training, max(scoring, training))
    assert out["placements"]["servers"]["peak"] == s_total
    # same layout (TP 1): the teacher at TP 1 plus both working sets at once is larger than the time-shared peak
    assert out["placements"]["same_layout"]["peak"] > own["peak"]


def test_plan_suggests_a_teacher_layout_and_offload_helps(capsys):
    """A 32B teacher beside a 1.7B student at TP 1 x DP 16 on 80 GiB: TP 1 does not fit both (64 GB of teacher
    weights); the suggestion is the smallest own teacher layout that does, and offloading lowers the peak."""
    base = ["plan", "--student", "qwen3-1.7b", "--teacher", "qwen3-32b", "--tp", "1", "--dp", "16", "--recompute",
            "--distributed-optimizer", "--flash-attention", "--seq-len", "9120", "--gpu-memory", "80", "--json"]
    assert cli.main(base) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu_memory"] == 80 * GIB  # a bare number is GiB
    first = out["teacher_fits"][0]
    assert first["layout"]["tp"] * first["layout"]["pp"] == 2 and first["peak"] <= 0.9 * 80 * GIB
    assert out["placements"]["same_layout"]["peak"] > 0.9 * 80 * GIB
    assert cli.main(base + ["--teacher-tp", "2", "--offload-teacher"]) == 0
    off = json.loads(capsys.readouterr().out)["placements"]["own_layout"]
    assert cli.main(base + ["--teacher-tp", "2"]) == 0
    on = json.loads(capsys.readouterr().out)["placements"]["own_layout"]
    assert off["training"] < on["training"] and off["scoring"] == on["scoring"]


@pytest.mark.parametrize("argv,message", [
    (["--sequence-parallel"], "--sequence-parallel needs --tp > 1"),
    (["--tp", "x"], "argument --tp: invalid int value"),
    (["--tp", "3"], "tensor parallel size 3 does not divide num_attention_heads=16"),
    (["--teacher", "qwen3-8b", "--dp", "8", "--teacher-tp", "3"], "teacher TP=3 x PP=1 does not divide the 8 GPUs"),
    (["--teacher-tp", "2"], "need --teacher"),
    (["--gpu-memory", "eighty"], "cannot parse memory size 'eighty'"),
    (["--micro-batch", "0"], "--micro-batch must be >= 1"),
])
def test_plan_bad_arguments_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) if "invalid int" in message else _no_raise():
        code = cli.main(["plan", "--student", "qwen3-1.7b", "--seq-len", "128", *argv])
        assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_gpu_memory_sizes():
    assert parse_bytes("80") == parse_bytes("80G") == parse_bytes("80GiB") == parse_bytes("80 gib") == 80 * GIB
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1000B") == 1000


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
