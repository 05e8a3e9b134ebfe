"""Every GPU check of the project in one command, on one GPU; `--cpu` runs the same checks on tiny sizes here.

    bash tools/gpu_wheels.sh                                  # once, with network: wheels into .gpu_wheels/
    bash tools/gpu_check.sh --out runs/gpu_check              # on the GPU machine (installs the wheels first)
    python tools/gpu_check.py --cpu --out /tmp/gpu_check      # tiny sizes, float32, gloo (tests/test_gpu_check.py)

The checks (each in its own process, with its own time limit: one failing or hanging does not hide the others):
  ops_reference    megatron_tropd.ops against a plain float64 unsharded reference: values and gradients of every
                   op in float64 / float32 / bfloat16, padding columns and extreme rows included (TP = 1)
  ops_bench        the ops against the gather baseline of tools/bench_ops.py (full log_softmax in float32) at
                   T = 4096, V = 151936, TP = 1, bf16 and fp32: CUDA-event times, peak memory from the allocator
  distill_step     one TrOPD distillation step on tiny megatron models in bf16, with megatron DDP and with the
                   distributed optimizer: time, peak memory, both updates equal
  resume           `tropd train` on tiny HF models: a run SIGKILLed after a checkpoint save, resumed, against the
                   uninterrupted run (metrics and saved weights); once per optimizer path
  embedded_engine  rollout/embedded.py generating on CUDA: tokens/s, log-probs against a full forward, weight update

Output: a table on stdout and OUT/gpu_check.json (environment, per-check status, numbers, and which code path ran:
checkpoint format, optimizer, dtype, device). Exit status 0 when every check passed or was skipped with a reason
(`--cpu`: the distributed optimizer refuses to run on CPU today, so its parts are skipped there and say so).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(TOOLS))

CHECKS = ("ops_reference", "ops_bench", "distill_step", "embedded_engine", "resume")  # the longest last

# Sizes per mode. GPU: the sizes the issue names; CPU: tiny, so the whole run stays well under a minute on 2 cores.
SIZES = {
    "gpu": dict(
        ref_shape=(4, 256), ref_vocab_padded=151936, ref_vocab=151643, ref_k=64,
        bench_tokens=4096, bench_vocab=151936, bench_vocab_real=151643, bench_k=64, bench_repeat=5,
        bench_dtypes=("bf16", "fp32"), bench_big_chunk=1 << 25,
        step_arch=dict(num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=1024,
                       vocab_size=32000, make_vocab_size_divisible_by=128),
        teacher_arch=dict(num_layers=6, hidden_size=384, num_attention_heads=8, num_query_groups=4,
                          ffn_hidden_size=1536, vocab_size=32000, make_vocab_size_divisible_by=128),
        step_batch=(16, 24, 104), step_micro=4, step_dtype="bfloat16", step_repeat=3,
        resume_dtype="bfloat16", resume_steps=3, resume_tokens=16,
        engine_model=dict(hidden=512, layers=8, heads=8, kv_heads=4, vocab=32000),
        engine_requests=32, engine_n=2, engine_new_tokens=128, engine_dtype="bfloat16",
        timeouts=dict(ops_reference=90, ops_bench=120, distill_step=120, embedded_engine=90, resume=300),
        budget_s=460,  # the whole run: within 8 minutes, checks that would start later are reported as not run
    ),
    "cpu": dict(
        ref_shape=(2, 4), ref_vocab_padded=256, ref_vocab=250, ref_k=6,
        bench_tokens=64, bench_vocab=2048, bench_vocab_real=2000, bench_k=8, bench_repeat=1,
        bench_dtypes=("bf16", "fp32"), bench_big_chunk=None,
        step_arch=dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                       vocab_size=200, make_vocab_size_divisible_by=8),
        teacher_arch=dict(num_layers=2, hidden_size=48, num_attention_heads=4, num_query_groups=4, ffn_hidden_size=96,
                          vocab_size=200, make_vocab_size_divisible_by=8),
        step_batch=(8, 4, 10), step_micro=2, step_dtype="float32", step_repeat=1,
        resume_dtype="float32", resume_steps=2, resume_tokens=6,
        engine_model=dict(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128),
        engine_requests=4, engine_n=2, engine_new_tokens=8, engine_dtype="float32",
        timeouts=dict(ops_reference=120, ops_bench=120, distill_step=120, embedded_engine=120, resume=400),
        budget_s=900,
    ),
}

TEMP = 0.7
BETA = 0.3
KL_KINDS = ("forward", "reverse", "jsd")
GRAD_OPS = ("lp", "ent", "at") + tuple(f"kl_{k}" for k in KL_KINDS)
OP_NAMES = {"lp": "token_logprobs", "ent": "entropy", "at": "logprobs_at", "kl_forward": "kl_forward",
            "kl_reverse": "kl_reverse", "kl_jsd": "kl_jsd"}
REF_TOL = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 1e-2}  # as tests/test_ops.py
MEM_TARGET = 0.25  # extra memory of an op <= 25% of the fp32 logits shard (docs/ops.md)


class Skip(Exception):
    """A check (or part of one) that cannot run in this mode; the message says why."""


# ---------------------------------------------------------------------------------------------------------------
# Helpers shared by the checks (run inside the check's own process)
# ---------------------------------------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> tuple[object, float]:
    """(result, seconds): CUDA events on the GPU, perf_counter on the CPU."""
    import torch

    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return out, start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _quiet_profiler() -> None:
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the CPU memory profile's start/stop lines off


def _peak_extra(fn, device) -> tuple[object, int]:
    """(result, peak bytes allocated inside fn above what was allocated before): torch.cuda's allocator statistics on
    the GPU, the profiler's allocator events on the CPU (megatron_tropd.training.memory_profile)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, max(torch.cuda.max_memory_allocated() - base, 0)
    from megatron_tropd.training.memory_profile import profile_allocations

    _quiet_profiler()

    out, stats = profile_allocations(fn)
    return out, stats.peak_bytes


def _char_tokenizer():
    """A character-level HF tokenizer with a chat template (built offline; tools never read from tests/)."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.ascii_letters + string.digits + string.punctuation
                                                           + " \n"))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    hf.add_special_tokens({"additional_special_tokens": specials[3:]})
    hf.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return hf


def _tiny_llama(seed: int, layers: int, hidden: int, vocab: int, heads: int = 4, kv_heads: int = 2,
                sharpen: float = 20.0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper logits than the default init, so sampling is not uniform noise
        model.lm_head.weight.mul_(sharpen)
    return model


# ---------------------------------------------------------------------------------------------------------------
# 1. ops against a float64 reference
# ---------------------------------------------------------------------------------------------------------------
def _ref_inputs(sz: dict, device):
    """Full padded student/teacher logits [b, s, V] (float64) with extreme rows, ids and upstream gradients."""
    import torch

    b, s = sz["ref_shape"]
    vp, vocab, k = sz["ref_vocab_padded"], sz["ref_vocab"], sz["ref_k"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, s, vp, generator=g, dtype=torch.float64) * 2
    t = torch.randn(b, s, vp, generator=g, dtype=torch.float64) * 2
    x[0, 0, 5] = 1e4  # one dominant logit
    x[0, 1, :30:3] = -1e4  # very negative logits
    t[0, 1, 1:40:4] = -1e4
    x[0, 2] += 1e4  # large common offset (centering before / T)
    x[1, 0] = torch.randint(-2, 3, (vp,), generator=g).double()  # many ties (top-k: lowest id first)
    t[1, 1] = torch.randint(-1, 2, (vp,), generator=g).double()
    x[..., vocab:] = 1e6  # padding: must never leak
    t[..., vocab:] = 1e6
    tokens = torch.randint(0, vocab, (b, s), generator=g)
    tokens[0, 0] = 5
    ids = torch.randint(0, vocab, (b, s, 5), generator=g)
    ids[..., 0] = ids[..., 1]  # duplicate ids
    ids[..., 2] = vocab - 1  # the last real id
    grads = {op: torch.randn(b, s, *((5,) if op == "at" else ()), generator=g, dtype=torch.float64)
             for op in GRAD_OPS}
    mv = lambda v: v.to(device)  # noqa: E731
    return dict(s=mv(x), t=mv(t), tokens=mv(tokens), ids=mv(ids), grads={k_: mv(v) for k_, v in grads.items()},
                vocab=vocab, k=k)


def _ref_logp(full, vocab: int):
    import torch

    z = full[..., :vocab] / TEMP
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def _ref_kl(ls, lt, kind: str):
    import torch

    ps, pt = ls.exp(), lt.exp()
    if kind == "forward":
        return (pt * (lt - ls)).sum(-1)
    if kind == "reverse":
        return (ps * (ls - lt)).sum(-1)
    lm = torch.logaddexp(lt + math.log(BETA), ls + math.log(1 - BETA))
    return BETA * (pt * (lt - lm)).sum(-1) + (1 - BETA) * (ps * (ls - lm)).sum(-1)


def _reference(inp: dict, dtype) -> dict:
    """{op: (value, grad w.r.t. the full padded logits)}: plain float64 autograd on the dtype-rounded values."""
    import torch

    vocab = inp["vocab"]
    t64 = inp["t"].to(dtype).double()
    fns = {
        "lp": lambda ls: ls.gather(-1, inp["tokens"].unsqueeze(-1)).squeeze(-1),
        "ent": lambda ls: -(ls.exp() * ls).sum(-1),
        "at": lambda ls: ls.gather(-1, inp["ids"]),
        **{f"kl_{k}": (lambda ls, k=k: _ref_kl(ls, _ref_logp(t64, vocab), k)) for k in KL_KINDS},
    }
    out = {}
    for name, fn in fns.items():
        x = inp["s"].to(dtype).double().requires_grad_(True)
        y = fn(_ref_logp(x, vocab))
        (grad,) = torch.autograd.grad(y, x, inp["grads"][name])
        out[name] = (y.detach(), grad)
    out["logp"] = _ref_logp(inp["s"].to(dtype).double(), vocab)
    return out


def _ours(inp: dict, dtype) -> dict:
    import torch

    from megatron_tropd import ops

    kw = dict(temperature=TEMP, vocab_size=inp["vocab"])
    s, t = inp["s"].to(dtype), inp["t"].to(dtype)
    calls = {
        "lp": lambda x: ops.token_logprobs(x, inp["tokens"], None, **kw),
        "ent": lambda x: ops.entropy(x, None, **kw),
        "at": lambda x: ops.logprobs_at(x, inp["ids"], None, **kw),
        **{f"kl_{k}": (lambda x, k=k: ops.kl_divergence(x, t, None, kind=k, beta=BETA, **kw)) for k in KL_KINDS},
    }
    out, before = {}, s.clone()
    for name, fn in calls.items():
        x = s.detach().clone().requires_grad_(True)
        y = fn(x)
        y.backward(inp["grads"][name].to(y.dtype))
        out[name] = (y.detach(), x.grad)
    out["unmodified"] = bool(torch.equal(s, before))
    out["topk"] = ops.topk_logprobs(s, inp["k"], None, **kw)
    return out


def _err_ratio(actual, ref, tol: float, scale: float) -> tuple[float, float]:
    """(max |actual - ref|, max of |actual - ref| / (tol * (|ref| + scale))): <= 1 passes (tests/test_ops.py's bound)."""
    err = (actual.double() - ref).abs()
    ratio = err / (tol * (ref.abs() + scale))
    return float(err.max()), float(ratio.max()) if ratio.numel() else 0.0


def check_ops_reference(groups, mode: str) -> dict:
    import torch

    sz, device = SIZES[mode], groups.device
    inp = _ref_inputs(sz, device)
    vocab, rows, ok = inp["vocab"], [], True
    for dname in ("float64", "float32", "bfloat16"):
        dtype = getattr(torch, dname)
        ref, res, tol = _reference(inp, dtype), _ours(inp, dtype), REF_TOL[dname]
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        for name in GRAD_OPS:
            val, grad = res[name]
            v_err, v_ratio = _err_ratio(val, ref[name][0], tol, 1.0)
            g_ref = ref[name][1]
            g_err, g_ratio = _err_ratio(grad, g_ref, tol, float(g_ref.abs().max()))
            pad_clean = bool((grad[..., vocab:] == 0).all())
            good = (v_ratio <= 1 and g_ratio <= 1 and pad_clean and val.dtype == out_dtype and grad.dtype == dtype
                    and res["unmodified"])
            ok &= good
            rows.append(dict(op=OP_NAMES[name], dtype=dname, value_max_abs_err=v_err, value_err_over_bound=v_ratio,
                             grad_max_abs_err=g_err, grad_err_over_bound=g_ratio, padding_grad_zero=pad_clean,
                             result_dtype=str(val.dtype), ok=good))
        vals, ids = res["topk"]
        stable = torch.sort(ref["logp"], dim=-1, descending=True, stable=True).indices[..., :inp["k"]]
        id_mismatch = int((ids != stable).sum())
        t_err, t_ratio = _err_ratio(vals, ref["logp"].gather(-1, ids), tol, 1.0)
        good = id_mismatch == 0 and t_ratio <= 1 and bool((ids < vocab).all())
        ok &= good
        rows.append(dict(op="topk_logprobs", dtype=dname, value_max_abs_err=t_err, value_err_over_bound=t_ratio,
                         id_mismatches=id_mismatch, ok=good))
        del ref, res
    ratio = lambda r: max(r.get("value_err_over_bound", 0), r.get("grad_err_over_bound", 0))  # noqa: E731
    per_dtype = {d: max(ratio(r) for r in rows if r["dtype"] == d) for d in REF_TOL}
    b, s = sz["ref_shape"]
    return dict(ok=ok, rows=rows, device=str(device), tokens=b * s, vocab_padded=sz["ref_vocab_padded"],
                vocab=vocab, tolerances=REF_TOL, worst_err_over_bound=per_dtype,
                summary=f"{len(rows)} op x dtype rows at T={b * s}, V={sz['ref_vocab_padded']}; worst error / bound: "
                        + ", ".join(f"{d} {v:.2g}" for d, v in per_dtype.items())
                        + f"; {sum(not r['ok'] for r in rows)} failed")


# ---------------------------------------------------------------------------------------------------------------
# 2. ops benchmark against the gather baseline (tools/bench_ops.py's two implementations)
# ---------------------------------------------------------------------------------------------------------------
def check_ops_bench(groups, mode: str) -> dict:
    import torch

    import bench_ops
    from megatron_tropd import ops

    sz, device = SIZES[mode], groups.device
    n, v, k = sz["bench_tokens"], sz["bench_vocab"], sz["bench_k"]
    g = torch.Generator().manual_seed(7)
    base = dict(
        tokens=torch.randint(0, sz["bench_vocab_real"], (n,), generator=g).to(device),
        ids=torch.randint(0, sz["bench_vocab_real"], (n, k), generator=g).to(device),
        grad_tok=torch.randn(n, generator=g).to(device), grad_at=torch.randn(n, k, generator=g).to(device),
        vocab_size=sz["bench_vocab_real"], k=k, temperature=1.0, baseline_block=n if device.type == "cuda" else 256)
    s32 = (torch.randn(n, v, generator=g) * 2).to(device)
    t32 = (torch.randn(n, v, generator=g) * 2).to(device)
    impls = [("ops", None), ("gather", None)]
    if sz["bench_big_chunk"] and device.type == "cuda":
        impls.insert(1, (f"ops_chunk{sz['bench_big_chunk']}", sz["bench_big_chunk"]))
    default_chunk = ops.CHUNK_ELEMENTS
    shard_fp32 = n * v * 4
    rows, agree = [], []
    for dname in sz["bench_dtypes"]:
        dtype = bench_ops.DTYPES[dname]
        d = dict(base, s=s32.to(dtype), t=t32.to(dtype))
        for op in bench_ops.OPS:
            first = {}
            for impl, chunk in impls:
                ops.CHUNK_ELEMENTS = chunk or default_chunk
                fn = bench_ops.run_baseline if impl == "gather" else bench_ops.run_ours
                call = lambda: fn(op, d, groups.tp)  # noqa: E731
                kept, peak = _peak_extra(call, device)  # also the warm-up
                kept_bytes = sum(x.numel() * x.element_size() for x in kept if x is not None)
                if impl in ("ops", "gather"):
                    first[impl] = kept
                del kept
                times = []
                for _ in range(sz["bench_repeat"]):
                    out, dt = _timed(call, device)
                    del out
                    times.append(dt)
                extra = max(peak - kept_bytes, 0)
                rows.append(dict(op=op, dtype=dname, impl=impl, chunk_elements=ops.CHUNK_ELEMENTS,
                                 time_s=statistics.median(times), times_s=times, peak_bytes=peak,
                                 extra_bytes=extra, extra_frac_of_fp32_logits=extra / shard_fp32))
            agree.append(_agreement(op, dname, first["ops"], first["gather"]))
            del first
    ops.CHUNK_ELEMENTS = default_chunk
    on_gpu = device.type == "cuda"
    table, missed = [], [f"{a['op']}/{a['dtype']} results differ from the baseline" for a in agree if not a["ok"]]
    for dname in sz["bench_dtypes"]:
        for op in bench_ops.OPS:
            get = {r["impl"]: r for r in rows if r["op"] == op and r["dtype"] == dname}
            o, b = get["ops"], get["gather"]
            line = dict(op=op, dtype=dname, ops_time_s=o["time_s"], gather_time_s=b["time_s"],
                        time_ratio=o["time_s"] / max(b["time_s"], 1e-12), ops_extra_mib=o["extra_bytes"] / 2**20,
                        gather_extra_mib=b["extra_bytes"] / 2**20,
                        mem_ratio=o["extra_bytes"] / max(b["extra_bytes"], 1),
                        ops_extra_frac=o["extra_frac_of_fp32_logits"],
                        mem_target_met=o["extra_frac_of_fp32_logits"] <= MEM_TARGET,
                        time_target_met=o["time_s"] <= b["time_s"])
            for impl, r in get.items():
                if impl.startswith("ops_chunk"):
                    line[f"{impl}_time_s"], line[f"{impl}_extra_mib"] = r["time_s"], r["extra_bytes"] / 2**20
            table.append(line)
            # The targets are about the full size: the CPU run's tiny logits are below the ops' chunk floor
            # (ops.MIN_CHUNK_ELEMENTS) and its times are noise, so there only the agreement is checked.
            if on_gpu and not line["mem_target_met"]:
                missed.append(f"{op}/{dname} memory")
            if on_gpu and not line["time_target_met"]:
                missed.append(f"{op}/{dname} time")
    ratios = [t["time_ratio"] for t in table]
    return dict(ok=not missed, table=table, rows=rows, agreement=agree, targets_missed=missed, tokens=n, vocab=v,
                vocab_real=sz["bench_vocab_real"], tp=1, device=str(device), repeat=sz["bench_repeat"],
                targets_apply=on_gpu, mem_target_frac=MEM_TARGET,
                summary=f"ops/gather time x{min(ratios):.2f}..x{max(ratios):.2f}, ops extra memory <= "
                        f"{100 * max(t['ops_extra_frac'] for t in table):.1f}% of fp32 logits, results agree: "
                        f"{sum(a['ok'] for a in agree)}/{len(agree)}"
                        + (f"; missed: {', '.join(missed)}" if missed else ""))


def _agreement(op: str, dname: str, ours: list, gather: list) -> dict:
    """Our op's outputs (and input gradient) against the gather baseline's, same inputs."""
    tol = 2e-2 if dname == "bf16" else 1e-4
    a, b = ours[0].double(), gather[0].double()
    v_err = float((a - b).abs().max())
    ok = v_err <= tol * (1 + float(b.abs().max()))
    res = dict(op=op, dtype=dname, value_max_abs_diff=v_err, tolerance=tol)
    if op != "topk_logprobs":  # top-k ids on exact ties may differ (torch.topk picks any); values are compared
        ga, gb = ours[1].double(), gather[1].double()
        g_err = float((ga - gb).abs().max())
        res["grad_max_abs_diff"] = g_err
        ok &= g_err <= tol * max(float(gb.abs().max()), 1e-30)
    res["ok"] = bool(ok)
    return res


# ---------------------------------------------------------------------------------------------------------------
# 3. a bf16 distillation step, megatron DDP and the distributed optimizer
# ---------------------------------------------------------------------------------------------------------------
def _step_samples(sz: dict, vocab: int):
    import torch

    from megatron_tropd.rollout.base import Sample

    n, prompt, resp = sz["step_batch"]
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        p = int(torch.randint(max(2, prompt // 2), prompt + 1, (1,), generator=g))
        r = int(torch.randint(max(2, resp // 2), resp + 1, (1,), generator=g))
        prefix = int(torch.randint(1, r, (1,), generator=g)) if i % 2 else 0  # half the rollouts have a prefix
        out.append(Sample(prompt_ids=torch.randint(0, vocab, (p,), generator=g).tolist(),
                          response_ids=torch.randint(0, vocab, (r,), generator=g).tolist(),
                          logprobs=(-torch.rand(r - prefix, generator=g) * 3).tolist(), finish_reason="length",
                          weight_version=0, prefix_len=prefix, request_id=100 + i))
    return out


def _one_step_variant(groups, sz, weights, arch, t_arch, distributed_optimizer: bool) -> dict:
    import torch

    from megatron_tropd.config import OptimConfig
    from megatron_tropd.models.sharding import gather_full_state_dict, load_full_state_dict
    from megatron_tropd.objectives import ObjectiveConfig, build_objective
    from megatron_tropd.training.batch import build_batch
    from megatron_tropd.training.roles import build_student, build_teacher
    from megatron_tropd.training.scoring import MegatronTeacherScorer
    from megatron_tropd.training.step import StepOptions, distill_step

    device, dtype, repeat = groups.device, sz["step_dtype"], sz["step_repeat"]
    torch.cuda.empty_cache() if device.type == "cuda" else None
    student = build_student(arch, groups, lambda m: load_full_state_dict(m, weights["student"], groups),
                            OptimConfig(lr=1e-3, clip_grad=1.0), total_updates=repeat, dtype=dtype,
                            use_distributed_optimizer=distributed_optimizer)
    opts = StepOptions(temperature=0.9, vocab_size=arch.vocab_size, micro_batch_size=sz["step_micro"])
    teacher = MegatronTeacherScorer(
        build_teacher(t_arch, groups, lambda m: load_full_state_dict(m, weights["teacher"], groups), dtype=dtype),
        groups, opts.score)
    objective = build_objective(ObjectiveConfig(name="tropd", topk=16, seed=7))
    batch = build_batch(_step_samples(sz, arch.vocab_size), pad_id=0)
    mine = batch.dp_shard(groups.dp_size, groups.dp_rank)
    before = {k: v.float().cpu() for k, v in gather_full_state_dict(student.gpt, groups).items()}
    history, times, first_update = [], [], None
    peak = 0
    for step in range(repeat):
        (metrics, dt) = _timed(lambda: distill_step(student, teacher, mine, objective, groups, step, opts), device)
        if step == 0:
            first_update = {k: v.float().cpu() - before[k] for k, v in gather_full_state_dict(student.gpt, groups).items()}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        history.append(metrics)
        times.append(dt)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    teacher_dtypes = sorted({str(p.dtype) for p in teacher.teacher.model.parameters()})
    student_dtypes = sorted({str(p.dtype) for p in student.gpt.parameters()})
    return dict(metrics=history, times_s=times, update=first_update, peak_bytes=peak,
                optimizer=_optimizer_name(student.optimizer), student_param_dtypes=student_dtypes,
                teacher_param_dtypes=teacher_dtypes)


def _optimizer_name(opt) -> str:
    """megatron's optimizer class, with the ones a ChainedOptimizer wraps (e.g. ChainedOptimizer[DistributedOptimizer])."""
    inner = getattr(opt, "chained_optimizers", None)
    name = type(opt).__name__
    return f"{name}[{', '.join(type(o).__name__ for o in inner)}]" if inner else name


def check_distill_step(groups, mode: str) -> dict:
    import torch

    from megatron_tropd.models.arch import ModelArch
    from megatron_tropd.models.gpt import build_gpt_model
    from megatron_tropd.models.sharding import gather_full_state_dict

    sz = SIZES[mode]
    arch, t_arch = ModelArch(**sz["step_arch"]), ModelArch(**sz["teacher_arch"])
    weights = {}
    for role, a, seed in (("student", arch, 0), ("teacher", t_arch, 1)):
        torch.manual_seed(seed)
        weights[role] = {k: v.cpu() for k, v in gather_full_state_dict(build_gpt_model(a, groups), groups).items()}
    out = dict(dtype=sz["step_dtype"], device=str(groups.device), dp=groups.dp_size,
               sequences=sz["step_batch"][0], micro_batch_size=sz["step_micro"], objective="tropd (fkl, top-16)",
               variants={})
    for name, distopt in (("ddp", False), ("distributed_optimizer", True)):
        try:
            res = _one_step_variant(groups, sz, weights, arch, t_arch, distopt)
        except ValueError as e:
            if groups.device.type == "cpu" and "distributed_optimizer" in str(e):
                out["variants"][name] = dict(status="skip", reason=f"refused on CPU: {e}")
                continue
            raise
        m = res["metrics"]
        finite = all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in m)
        moved = max(float(u.abs().max()) for u in res["update"].values())
        steady = res["times_s"][1:] or res["times_s"]
        out["variants"][name] = dict(
            status="pass" if finite and moved > 0 else "fail", optimizer=res["optimizer"],
            student_param_dtypes=res["student_param_dtypes"], teacher_param_dtypes=res["teacher_param_dtypes"],
            step_time_s=statistics.median(steady), first_step_time_s=res["times_s"][0],
            peak_mib=res["peak_bytes"] / 2**20 if res["peak_bytes"] else None,
            loss=[h["loss"] for h in m], grad_norm=[h["grad_norm"] for h in m], finite=finite,
            max_abs_update=moved, _update=res["update"])
    ddp, dist_opt = out["variants"]["ddp"], out["variants"]["distributed_optimizer"]
    if ddp.get("status") != "skip" and dist_opt.get("status") not in (None, "skip"):
        a, b = ddp["_update"], dist_opt["_update"]
        num = math.sqrt(sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a))
        den = math.sqrt(sum(float(a[k].double().pow(2).sum()) for k in a))
        out["ddp_vs_distributed_optimizer_update_rel_diff"] = num / max(den, 1e-30)
        out["ddp_vs_distributed_optimizer_loss"] = (ddp["loss"][0], dist_opt["loss"][0])
        if num / max(den, 1e-30) > 0.05:
            dist_opt["status"] = "fail"
            dist_opt["reason"] = "first update differs from DDP's by more than 5% (relative norm)"
    for v in out["variants"].values():
        v.pop("_update", None)
    statuses = [v["status"] for v in out["variants"].values()]
    out["ok"] = "fail" not in statuses
    out["skipped_parts"] = [k for k, v in out["variants"].items() if v["status"] == "skip"]
    parts = []
    for k, v in out["variants"].items():
        if v["status"] == "skip":
            parts.append(f"{k}: skipped")
        else:
            mem = f", {v['peak_mib']:.0f} MiB" if v.get("peak_mib") else ""
            parts.append(f"{k}: {v['status']} {1e3 * v['step_time_s']:.0f} ms/step{mem}")
    if "ddp_vs_distributed_optimizer_update_rel_diff" in out:
        parts.append(f"update rel diff {out['ddp_vs_distributed_optimizer_update_rel_diff']:.1e}")
    out["summary"] = f"{sz['step_dtype']}: " + "; ".join(parts)
    return out


# ---------------------------------------------------------------------------------------------------------------
# 4. save, SIGKILL, resume: `tropd train` on tiny HF models
# ---------------------------------------------------------------------------------------------------------------
PROMPTS = [("What is 2+3?", "5"), ("What is 7-4?", "3"), ("What is 3*3?", "9"), ("What is 8/2?", "4"),
           ("What is 1+6?", "7"), ("What is 9-5?", "4"), ("What is 2*4?", "8"), ("What is 6/3?", "2"),
           ("What is 5+5?", "10"), ("What is 4+4?", "8"), ("What is 7+1?", "8"), ("What is 9-9?", "0")]


def _resume_setup(work: Path, sz: dict) -> tuple[Path, list[str]]:
    """Tiny HF student/teacher with one tokenizer, a JSONL prompt file and the run config; returns (config, overrides)."""
    tok = _char_tokenizer()
    for name, layers, seed in (("student", 2, 0), ("teacher", 3, 1)):
        _tiny_llama(seed=seed, layers=layers, hidden=32, vocab=128).save_pretrained(work / name)
        tok.save_pretrained(work / name)
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in PROMPTS))
    cfg = work / "config.yaml"
    cfg.write_text(
        f"student: {{path: {work / 'student'}, dtype: {sz['resume_dtype']}}}\n"
        f"teacher: {{path: {work / 'teacher'}, dtype: {sz['resume_dtype']}}}\n"
        "objective: {name: tropd, topk: 8}\n"
        f"rollout: {{prompts_per_step: 2, samples_per_prompt: 2, max_new_tokens: {sz['resume_tokens']}}}\n"
        "guidance: {enabled: true, prefix_fraction: 0.5}\n"
        "optim: {lr: 1.0e-3, micro_batch_size: 2}\n"
        f"data: {{source: jsonl, path: {data}, size: 10, eval_size: 0, max_prompt_tokens: 128}}\n"
        f"train: {{steps: {sz['resume_steps']}, save_interval: 1, keep_last: {sz['resume_steps']}, "
        "progress: false, tensorboard: false}\n")
    return cfg, []


def _train_in_process(groups, config: str, overrides: list[str]):
    import contextlib

    from megatron_tropd.config import load_config
    from megatron_tropd.distributed import parallel
    from megatron_tropd.training.loop import train

    parallel.destroy()  # train() owns initialisation, as under torchrun
    cfg = load_config(config, overrides)
    Path(cfg.train.run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(cfg.train.run_dir) / "train.log", "a") as log, contextlib.redirect_stdout(log):
        return train(cfg)


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    from megatron_tropd.training.metrics import VOLATILE_PREFIXES  # wall-clock metrics differ between runs

    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE_PREFIXES)} for r in rows]


def _compare_metrics(a: list[dict], b: list[dict]) -> tuple[bool, float]:
    """(bit-exact, max relative difference over every numeric metric of every step)."""
    if [r.get("step") for r in a] != [r.get("step") for r in b] or [sorted(r) for r in a] != [sorted(r) for r in b]:
        return False, math.inf
    worst, exact = 0.0, True
    for ra, rb in zip(a, b):
        for key, va in ra.items():
            vb = rb[key]
            if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
                if math.isnan(va) and math.isnan(vb):
                    continue
                exact &= va == vb
                worst = max(worst, abs(va - vb) / max(abs(va), abs(vb), 1e-12))
            elif va != vb:
                exact, worst = False, math.inf
    return exact, worst


def _checkpoint_format(ckpt: Path) -> str:
    names = [p.name for p in ckpt.rglob("*") if p.is_file()]
    if any(n.endswith(".distcp") for n in names) or ".metadata" in names:
        return "dist_checkpointing"
    if any(n.startswith("rank_") and n.endswith(".pt") for n in names):
        return "per-rank torch.save"
    return "unknown"


def _checkpoint_tensors(ckpt: Path) -> dict:
    """Every tensor of a checkpoint directory, RNG states left out (they are per-process generator states): the
    torch.save files (*.pt) and, for megatron dist checkpoints, the torch DCP shards read back whole."""
    import torch

    out = {}
    for f in sorted(ckpt.rglob("*.pt")):
        out[str(f.relative_to(ckpt))] = torch.load(f, map_location="cpu", weights_only=False)
    for meta in sorted(ckpt.rglob(".metadata")):
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(meta.parent), f"{tmp}/whole.pt")
            out[str(meta.parent.relative_to(ckpt)) + "/<dcp>"] = torch.load(f"{tmp}/whole.pt", map_location="cpu",
                                                                           weights_only=False)
    return out


def _compare_checkpoints(a: Path, b: Path) -> dict:
    """Tensors compared value by value (RNG states left out); JSON files compared as parsed; *.yaml (the run config,
    which names the run directory) and the raw shard files (compared through their tensors) are not compared."""
    import torch

    def listing(d: Path) -> list[str]:
        return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())

    out = dict(files=len(listing(a)), same_files=listing(a) == listing(b), tensors=0, optimizer_tensors=0,
               max_abs_diff=0.0,
               bit_exact=listing(a) == listing(b), json_equal=True)
    if not out["same_files"]:
        return out

    def walk(x, y, key=""):
        if "rng" in key.lower():
            return
        if isinstance(x, torch.Tensor):
            out["tensors"] += 1
            out["optimizer_tensors"] += "optimizer" in key
            if not isinstance(y, torch.Tensor) or x.shape != y.shape or x.dtype != y.dtype:
                out["bit_exact"], out["max_abs_diff"] = False, math.inf
            elif not torch.equal(x, y):
                out["bit_exact"] = False
                if x.is_floating_point():
                    out["max_abs_diff"] = max(out["max_abs_diff"], float((x.double() - y.double()).abs().max()))
        elif isinstance(x, dict):
            for k in x:
                if k not in y:
                    out["bit_exact"] = False
                    continue
                walk(x[k], y[k], f"{key}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, (xi, yi) in enumerate(zip(x, y)):
                walk(xi, yi, f"{key}[{i}]")

    walk(_checkpoint_tensors(a), _checkpoint_tensors(b))
    for rel in listing(a):
        if rel.endswith(".json"):
            same = json.loads((a / rel).read_text()) == json.loads((b / rel).read_text())
            out["json_equal"] &= same
            out["bit_exact"] &= same
    return out


def _kill_after_first_save(cmd: list[str], marker: Path, timeout: float) -> dict:
    """Start `cmd` (a real `tropd train` process) and SIGKILL it as soon as `marker` (its first COMPLETE checkpoint)
    exists. Returns what happened."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    finished_early = proc.poll() is not None
    if not finished_early:
        os.kill(proc.pid, signal.SIGKILL)
    log = proc.communicate()[0]
    return dict(finished_early=finished_early, saved=marker.exists(), log=log, returncode=proc.returncode)


def _resume_variant(work: Path, mode: str, sz: dict, cfg: Path, extra: list[str], timeout: float) -> dict:
    import threading

    from megatron_tropd.distributed.spawn import DistributedTestError, run_distributed

    steps = sz["resume_steps"]
    full_dir, killed_dir = work / "full", work / "killed"
    over = lambda d: [f"train.run_dir={d}", *extra]  # noqa: E731
    # The run to be killed (a `tropd train` process) and the uninterrupted run (spawned rank) run side by side.
    cmd = [sys.executable, "-m", "megatron_tropd.cli", "train", "--config", str(cfg), *over(killed_dir)]
    marker = killed_dir / "checkpoints" / "step_000000" / "COMPLETE"
    killed: dict = {}
    watcher = threading.Thread(target=lambda: killed.update(_kill_after_first_save(cmd, marker, timeout)))
    watcher.start()
    t0 = time.time()
    try:
        run_distributed(_train_in_process, 1, args=(str(cfg), over(full_dir)), timeout=timeout)
    except DistributedTestError as e:
        watcher.join()
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        if mode == "cpu" and "use_distributed_optimizer" in str(e):
            raise Skip(f"refused on CPU: {lines[-1]}") from None
        raise
    t_full = time.time() - t0
    watcher.join()
    if not killed["saved"]:
        raise RuntimeError(f"the run to be killed wrote no checkpoint (exit {killed['returncode']}):\n"
                           f"{killed['log'][-3000:]}")
    ckpts = killed_dir / "checkpoints"
    done = sorted(p.name for p in ckpts.iterdir() if (p / "COMPLETE").exists())
    killed_at = int(done[-1].split("_")[1])
    t0 = time.time()
    run_distributed(_train_in_process, 1, args=(str(cfg), over(killed_dir) + ["train.resume=true"]), timeout=timeout)
    t_resume = time.time() - t0
    bit_exact, rel = _compare_metrics(_metrics(killed_dir), _metrics(full_dir))
    last = f"step_{steps - 1:06d}"
    weights = _compare_checkpoints(full_dir / "checkpoints" / last, ckpts / last)
    tol = 0.0 if mode == "cpu" else 1e-3
    proves = killed_at < steps - 1 and not killed["finished_early"]
    ok = proves and rel <= tol and (weights["bit_exact"] if mode == "cpu" else
                                    weights["same_files"] and weights["max_abs_diff"] <= 1e-2)
    return dict(status="pass" if ok else "fail", killed_after_checkpoint=killed_at, steps=steps,
                kill_landed_before_end=proves, metrics_bit_exact=bit_exact, metrics_max_rel_diff=rel,
                metrics_tolerance=tol, weights=weights, checkpoint_format=_checkpoint_format(ckpts / last),
                full_run_s=t_full, resumed_run_s=t_resume,
                reason=None if ok else ("the run ended before the kill: proves nothing" if not proves else
                                        "resumed run differs from the uninterrupted one"))


def check_resume(mode: str, work: str, deadline: float) -> dict:
    """Runs in the driver process: every training run below is a process of its own (spawned ranks, and one real
    `tropd train` process that is SIGKILLed), each with its own time limit (and none past `deadline`)."""
    sz, work = SIZES[mode], Path(work)
    work.mkdir(parents=True, exist_ok=True)
    cfg, _ = _resume_setup(work, sz)
    out = dict(dtype=sz["resume_dtype"], device="cuda" if mode == "gpu" else "cpu", steps=sz["resume_steps"],
               engine="embedded", variants={})
    for name, extra in (("ddp", []), ("distributed_optimizer", ["parallel.use_distributed_optimizer=true"])):
        vdir = work / name
        vdir.mkdir(exist_ok=True)
        timeout = min(SIZES[mode]["timeouts"]["resume"] / 2, deadline - time.time())
        if timeout < 20:
            out["variants"][name] = dict(status="fail", reason="not run: the time budget (--budget-s) is spent")
            continue
        try:
            out["variants"][name] = _resume_variant(vdir, mode, sz, cfg, extra, timeout)
        except Skip as e:
            out["variants"][name] = dict(status="skip", reason=str(e))
        except Exception as e:  # noqa: BLE001 - one variant failing does not hide the other
            out["variants"][name] = dict(status="fail", reason=f"{type(e).__name__}: {str(e)[-2000:]}")
    statuses = [v["status"] for v in out["variants"].values()]
    out["ok"] = "fail" not in statuses and "pass" in statuses
    out["skipped_parts"] = [k for k, v in out["variants"].items() if v["status"] == "skip"]
    parts = []
    for k, v in out["variants"].items():
        if v["status"] == "skip":
            parts.append(f"{k}: skipped")
        elif "metrics_max_rel_diff" in v:
            m = "bit-exact" if v["metrics_bit_exact"] else f"rel {v['metrics_max_rel_diff']:.1e}"
            w = "bit-exact" if v["weights"]["bit_exact"] else f"max {v['weights']['max_abs_diff']:.1e}"
            parts.append(f"{k}: {v['status']} ({v['checkpoint_format']}, killed after step "
                         f"{v['killed_after_checkpoint']}, metrics {m}, weights {w})")
        else:
            parts.append(f"{k}: {v['status']}")
    out["summary"] = "; ".join(parts)
    return out


# ---------------------------------------------------------------------------------------------------------------
# 5. the embedded engine generating on CUDA
# ---------------------------------------------------------------------------------------------------------------
def check_embedded_engine(groups, mode: str) -> dict:
    import torch

    from megatron_tropd.rollout.base import GenerationRequest, SamplingParams
    from megatron_tropd.rollout.embedded import EmbeddedEngine

    sz, device = SIZES[mode], groups.device
    em = sz["engine_model"]
    model = _tiny_llama(seed=3, layers=em["layers"], hidden=em["hidden"], vocab=em["vocab"], heads=em["heads"],
                        kv_heads=em["kv_heads"], sharpen=4.0)
    g = torch.Generator().manual_seed(0)
    reqs = [GenerationRequest(prompt_ids=tuple(torch.randint(3, em["vocab"], (int(torch.randint(8, 33, (1,),
                                                                                                generator=g)),),
                                                             generator=g).tolist()),
                              n=sz["engine_n"], request_id=i) for i in range(sz["engine_requests"])]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=sz["engine_new_tokens"], seed=11)
    dtype = getattr(torch, sz["engine_dtype"])
    engine = EmbeddedEngine(model, dtype=dtype, device=device, vocab_size=em["vocab"])
    engine.generate(reqs[:2], SamplingParams(max_new_tokens=4, seed=1))  # warm-up (kernels, allocator)
    _sync(device)
    t0 = time.perf_counter()
    out = engine.generate(reqs, params)
    _sync(device)
    dt = time.perf_counter() - t0
    generated = sum(len(s.response_ids) for group in out for s in group)
    on_device = {str(p.device) for p in engine.model.parameters()}
    # Log-probs against a full forward of the same weights in float32 (a few samples).
    ref_model = engine.model.float()
    worst = 0.0
    with torch.no_grad():
        check = [s for group in out[:4] for s in group]
        for s in check:
            ids = torch.tensor([s.prompt_ids + s.response_ids], device=device)
            logits = ref_model(input_ids=ids).logits[0, len(s.prompt_ids) - 1:-1, :em["vocab"]].float()
            lp = torch.log_softmax(logits / params.temperature, -1).gather(
                -1, torch.tensor(s.response_ids, device=device)[:, None]).squeeze(-1)
            worst = max(worst, float((lp.cpu() - torch.tensor(s.logprobs)).abs().max()))
    lp_tol = 0.25 if dtype == torch.bfloat16 else 1e-3  # bf16 decoding vs an fp32 forward of the same weights
    # Weight update streamed from CPU tensors: version and outputs change.
    engine32 = EmbeddedEngine(ref_model, dtype=torch.float32, device=device, vocab_size=em["vocab"])
    small = [GenerationRequest(prompt_ids=reqs[0].prompt_ids, n=1, request_id=0)]
    p8 = SamplingParams(temperature=1.0, max_new_tokens=8, seed=5)
    before = engine32.generate(small, p8)[0][0].logprobs
    new = {k: (v.detach().float().cpu() * 1.5) for k, v in ref_model.state_dict().items()}
    engine32.update_weights(iter(new.items()), version=7)
    after = engine32.generate(small, p8)[0][0]
    updated = engine32.weight_version == 7 and after.weight_version == 7 and after.logprobs != before
    ok = generated > 0 and worst <= lp_tol and updated and on_device == {str(torch.empty(0, device=device).device)}
    return dict(ok=ok, device=str(device), param_devices=sorted(on_device), dtype=sz["engine_dtype"],
                model=em, requests=len(reqs), samples=len(reqs) * sz["engine_n"], new_tokens=generated,
                generate_s=dt, tokens_per_s=generated / dt, logprob_vs_fp32_forward_max_abs=worst,
                logprob_tolerance=lp_tol, weight_update_ok=updated,
                summary=f"{generated} tokens in {dt:.2f}s = {generated / dt:.0f} tok/s ({sz['engine_dtype']}, "
                        f"{len(reqs) * sz['engine_n']} samples); log-prob vs fp32 forward {worst:.1e}; "
                        f"update {'ok' if updated else 'FAILED'}")


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------
def _selftest_fail(groups, mode: str) -> dict:
    raise RuntimeError("--selftest-fail: this check was made to fail on purpose")


def environment(mode: str) -> dict:
    import importlib

    import torch

    env = dict(mode=mode, python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               cuda_available=torch.cuda.is_available(), host=platform.node(), cpu_count=os.cpu_count())
    if torch.cuda.is_available() and mode == "gpu":
        env.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                   device_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
                   bf16_supported=torch.cuda.is_bf16_supported())
    versions, missing = {}, []
    for mod, dist_name in (("megatron.core", "megatron-core"), ("transformers", "transformers"),
                           ("tokenizers", "tokenizers"), ("safetensors", "safetensors"), ("omegaconf", "omegaconf"),
                           ("yaml", "PyYAML"), ("numpy", "numpy"), ("transformer_engine", "transformer-engine"),
                           ("apex", "apex")):
        try:
            m = importlib.import_module(mod)
            versions[dist_name] = getattr(m, "__version__", "?")
        except Exception as e:  # noqa: BLE001
            versions[dist_name] = None
            if dist_name not in ("transformer-engine", "apex"):
                missing.append(f"{dist_name} ({type(e).__name__}: {e})")
    env["versions"], env["missing"] = versions, missing
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        env["git_commit"] = None
    return env


def run_check(name: str, mode: str, out_dir: Path, fail: set[str], deadline: float) -> dict:
    from megatron_tropd.distributed.spawn import run_distributed

    fn = {"ops_reference": check_ops_reference, "ops_bench": check_ops_bench, "distill_step": check_distill_step,
          "resume": check_resume, "embedded_engine": check_embedded_engine}[name]
    if name in fail:
        fn = _selftest_fail
    t0 = time.time()
    timeout = min(SIZES[mode]["timeouts"][name], deadline - t0)
    if timeout < 20:
        return dict(name=name, status="fail", seconds=0.0, error="not run: the time budget (--budget-s) is spent",
                    summary="not run: the time budget (--budget-s) is spent")
    try:
        if name == "resume" and fn is check_resume:  # it starts processes of its own
            res = check_resume(mode, str(out_dir / "resume_work"), t0 + timeout)
        else:
            res = run_distributed(fn, 1, args=(mode,), timeout=timeout)[0]
        status = "pass" if res.pop("ok") else "fail"
        error = None
    except Exception as e:  # noqa: BLE001 - reported, and the next check runs
        res, status = {}, "fail"
        error = f"{type(e).__name__}: {e}"
        res["summary"] = error.strip().splitlines()[-1][:200]
    return dict(name=name, status=status, seconds=time.time() - t0, error=error, **res)


def table(results: list[dict]) -> str:
    lines = ["| check | status | s | result |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {r.get('summary', '')} |")
    return "\n".join(lines)


def bench_table(bench: dict) -> str:
    lines = ["| op | dtype | ops ms | gather ms | time ops/gather | ops extra MiB | gather extra MiB | targets |",
             "|---|---|---|---|---|---|---|---|"]
    for t in bench.get("table", []):
        targets = "n/a (tiny CPU sizes)"
        if bench.get("targets_apply"):
            targets = ("mem ok" if t["mem_target_met"] else "mem MISSED") + \
                (", time ok" if t["time_target_met"] else ", time MISSED")
        lines.append(f"| {t['op']} | {t['dtype']} | {1e3 * t['ops_time_s']:.2f} | {1e3 * t['gather_time_s']:.2f} | "
                     f"{t['time_ratio']:.2f} | {t['ops_extra_mib']:.1f} | {t['gather_extra_mib']:.1f} | {targets} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for gpu_check.json (created)")
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (float32, gloo); no GPU needed")
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    p.add_argument("--selftest-fail", default="", help="make these checks raise (tests that one failing check "
                                                       "does not hide the others)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of the whole run (default 460 on the GPU, 900 with --cpu); a check that "
                        "would start with too little left is reported as not run")
    a = p.parse_args(argv)
    mode = "cpu" if a.cpu else "gpu"
    if a.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before any child process starts: the checks never see a GPU
    names = [n for n in a.only.split(",") if n]
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        p.error(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")
    import torch

    if mode == "gpu" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible; run with --cpu for the CPU dry run", file=sys.stderr)
        return 2
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    env = environment(mode)
    print(f"gpu_check ({mode}): torch {env['torch']}, {env.get('device', 'cpu')}, megatron-core "
          f"{env['versions'].get('megatron-core')}" + (f"; MISSING: {env['missing']}" if env["missing"] else ""),
          flush=True)
    deadline = t0 + (a.budget_s if a.budget_s is not None else SIZES[mode]["budget_s"])
    results, path = [], out_dir / "gpu_check.json"
    for name in names:
        print(f"-- {name} ...", flush=True)
        r = run_check(name, mode, out_dir, set(a.selftest_fail.split(",")) - {""}, deadline)
        results.append(r)
        print(f"   {r['status']} in {r['seconds']:.0f}s: {r.get('summary', '')}", flush=True)
        if r.get("error"):
            print("   " + r["error"][-3000:].replace("\n", "\n   "), flush=True)
        report = dict(env=env, sizes=SIZES[mode], checks=results, complete=len(results) == len(names),
                      passed=len(results) == len(names) and all(r["status"] == "pass" for r in results),
                      wall_s=time.time() - t0)
        path.write_text(json.dumps(report, indent=1, default=str))  # after every check: a killed run keeps its part
    print()
    print(table(results))
    bench = next((r for r in results if r["name"] == "ops_bench" and r.get("table")), None)
    if bench:
        print()
        print(f"ops vs gather, T={bench['tokens']}, V={bench['vocab']}, TP=1 ({bench['device']}):")
        print(bench_table(bench))
    print(f"\nwrote {path} ({report['wall_s']:.0f}s); {'all passed' if report['passed'] else 'FAILED'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.exit(130)
