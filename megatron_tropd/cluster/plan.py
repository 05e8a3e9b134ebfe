"""`tropd plan`: per-GPU memory estimate of a student/teacher pair, and the smallest layouts that fit.

    tropd plan --student r1-distill-qwen-1.5b --teacher skywork-or1-math-7b --tp 1 --pp 1 --dp 8 \
        --seq-len 8192 --micro-batch 1 --gpu-memory 80GiB

Everything is for the most loaded rank (the pipeline stage with the most parameters; the first stage for
activations, which under 1F1B keeps `pp` micro-batches in flight). Terms (bytes per GPU):

- weights      P_local * bytes(dtype)                       (teacher and student; P_local = stage params / TP)
- gradients    P_local * 4                                   (megatron DDP fp32 main-grad buffer)
- optimizer    P_local * (8 + 4 if dtype != fp32) / (DP if distributed optimizer else 1)
               (Adam m and v in fp32, plus an fp32 master copy for 16-bit params)
- activations  Korthikanti et al. (2022) per-layer count, redone for this architecture (SwiGLU MLP, GQA,
               RMSNorm, no dropout) and megatron-core's *local* attention (`DotProductAttention`, which
               materialises the [b, a/t, s, s] scores and repeats K/V to all heads). Per layer, in units of
               bytes(act) * s * b (s = sequence, b = micro-batch, t = TP):
                   norms                     6h   (each of the 2 RMSNorms keeps its input and the normalised
                                                   value, the next linear keeps the weighted output; /t with SP)
                   attention                 (qkv + q/k-norm inputs + 3 * a*d + a*d) / t
                                                  (q, k, v repeated to all a heads, o-proj input)
                   scores                    a * s / t  (softmax output, kept by the probs @ V matmul; the
                                                   masked scores are freed since softmax keeps its output)
                   MLP                       5f / t  (fc1 out = SwiGLU in, SwiGLU out = fc2 in, SiLU input)
               summed over L/pp layers x pp micro-batches in flight (= L layers' worth on the first stage).
               With full recompute only each layer's input (h, /t with SP) is kept, plus one layer's
               working set during backward.
- logits       student [s*b, V/t] in the activation dtype, kept for backward, + its gradient (same size and
               dtype) + the teacher's [s*b, V/t] shard + 2 float32 chunk temporaries of `ops.CHUNK_ELEMENTS`.
- teacher      forward only: one layer's working set (nothing is kept for backward).
With `--flash-attention` (the Transformer Engine spec on GPU) the a*s score term is dropped; the rest of the
count is kept, which makes it an approximation there (TE keeps q, k, v unrepeated and [a, s] softmax stats).

Model presets give the real config.json numbers of the paper's models, from memory of the public HF
configs (hidden, layers, heads, kv heads, ffn, vocab); check them against your checkpoint's config.json (or
pass the path instead of a preset name).
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass

from megatron_tropd.models.arch import DTYPE_BYTES, ModelArch, check_layout, head_dim

GIB = 1024**3
CHUNK_ELEMENTS = 1 << 21  # = megatron_tropd.ops.CHUNK_ELEMENTS (not imported: ops imports torch.distributed)

# Real architecture numbers (HF config.json), written from memory of the published configs.
PRESETS: dict[str, ModelArch] = {
    # DeepSeek-R1-Distill-Qwen-1.5B (Qwen2.5-Math-1.5B base; untied embeddings in the distill release)
    "r1-distill-qwen-1.5b": ModelArch(num_layers=28, hidden_size=1536, num_attention_heads=12, num_query_groups=2,
                                      ffn_hidden_size=8960, vocab_size=151936, add_qkv_bias=True,
                                      architecture="Qwen2ForCausalLM"),
    # Skywork-OR1-Math-7B (DeepSeek-R1-Distill-Qwen-7B base)
    "skywork-or1-math-7b": ModelArch(num_layers=28, hidden_size=3584, num_attention_heads=28, num_query_groups=4,
                                     ffn_hidden_size=18944, vocab_size=152064, add_qkv_bias=True,
                                     architecture="Qwen2ForCausalLM"),
    "qwen3-1.7b": ModelArch(num_layers=28, hidden_size=2048, num_attention_heads=16, num_query_groups=8,
                            ffn_hidden_size=6144, vocab_size=151936, kv_channels=128, tie_word_embeddings=True,
                            qk_layernorm=True, architecture="Qwen3ForCausalLM"),
    "qwen3-4b": ModelArch(num_layers=36, hidden_size=2560, num_attention_heads=32, num_query_groups=8,
                          ffn_hidden_size=9728, vocab_size=151936, kv_channels=128, tie_word_embeddings=True,
                          qk_layernorm=True, architecture="Qwen3ForCausalLM"),
    "qwen3-8b": ModelArch(num_layers=36, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                          ffn_hidden_size=12288, vocab_size=151936, kv_channels=128, qk_layernorm=True,
                          architecture="Qwen3ForCausalLM"),
    "qwen3-32b": ModelArch(num_layers=64, hidden_size=5120, num_attention_heads=64, num_query_groups=8,
                           ffn_hidden_size=25600, vocab_size=151936, kv_channels=128, qk_layernorm=True,
                           architecture="Qwen3ForCausalLM"),
}


def resolve_arch(name_or_path: str) -> ModelArch:
    """A preset name, or an HF checkpoint dir / config.json path."""
    if name_or_path.lower() in PRESETS:
        return PRESETS[name_or_path.lower()]
    from pathlib import Path

    if not Path(name_or_path).exists():
        raise ValueError(f"unknown model {name_or_path!r}: pass an HF checkpoint dir / config.json, or a preset "
                         f"({', '.join(PRESETS)})")
    from megatron_tropd.models.hf_mapping import arch_from_hf_config

    return arch_from_hf_config(name_or_path)


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '141G', '1e9' -> bytes (G/GiB = 2^30, GB = 10^9)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?B?)\s*", str(text))
    if not m:
        raise ValueError(f"cannot parse memory size {text!r}; use e.g. 80GiB, 80GB or 141G")
    value, unit, suffix = float(m.group(1)), m.group(2), m.group(3)
    power = "KMGT".index(unit) + 1 if unit else 0
    base = 1000 if suffix == "B" else 1024
    return int(value * base**power)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False


@dataclass(frozen=True)
class Workload:
    seq_len: int  # tokens per sequence (prompt + response)
    micro_batch: int = 1
    recompute: bool = False  # full activation recompute of the student
    student_dtype: str = "bfloat16"
    teacher_dtype: str = "bfloat16"
    flash_attention: bool = False  # TE/flash attention (GPU): no [s, s] scores are stored (approximation)


def layer_params(a: ModelArch, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank (norms are replicated, the rest split by TP)."""
    d, h = head_dim(a), a.hidden_size
    qkv_out = (a.num_attention_heads + 2 * a.num_query_groups) * d
    sharded = h * qkv_out + a.num_attention_heads * d * h + 3 * h * a.ffn_hidden_size
    if a.add_qkv_bias:
        sharded += qkv_out
    replicated = 2 * h + (2 * d if a.qk_layernorm else 0)
    return sharded // tp + replicated


def stage_params(a: ModelArch, tp: int, pp: int) -> int:
    """Parameters on the most loaded (tp, pp) rank: L/pp layers + the embedding (first stage) or the output
    layer and final norm (last stage). Tied embeddings still cost a copy on the last stage when pp > 1."""
    check_layout(a, tp, pp)
    layers = (a.num_layers // pp) * layer_params(a, tp)
    vocab = a.padded_vocab_size(tp) // tp * a.hidden_size
    output = 0 if (a.tie_word_embeddings and pp == 1) else vocab
    if pp == 1:
        return layers + vocab + output + a.hidden_size
    return layers + max(vocab, output + a.hidden_size)


def total_params(a: ModelArch) -> int:
    vocab = a.padded_vocab_size(1) * a.hidden_size
    return a.num_layers * layer_params(a, 1) + vocab * (1 if a.tie_word_embeddings else 2) + a.hidden_size


def layer_activation_elements(a: ModelArch, seq: int, mb: int, tp: int, sp: bool, flash: bool = False) -> int:
    """Elements one layer keeps for backward (local attention, no recompute); see the module docstring."""
    h, d, f = a.hidden_size, head_dim(a), a.ffn_hidden_size
    heads, kv = a.num_attention_heads, a.num_query_groups
    norms = 6 * h // (tp if sp else 1)
    qkv = (heads + 2 * kv) * d // tp
    qk_norm = (heads + kv) * d // tp if a.qk_layernorm else 0
    attn = 3 * heads * d // tp + heads * d // tp  # q, k, v after repeat to all heads + o-proj input
    scores = 0 if flash else heads * seq // tp
    mlp = 5 * f // tp
    return seq * mb * (norms + qkv + qk_norm + attn + scores + mlp)


@dataclass
class MemoryPlan:
    student_params_local: int
    teacher_params_local: int
    teacher_weights: int
    student_weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    teacher_forward: int

    @property
    def total(self) -> int:
        return (self.teacher_weights + self.student_weights + self.gradients + self.optimizer + self.activations
                + self.logits + self.teacher_forward)

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def memory_plan(student: ModelArch, teacher: ModelArch | None, layout: Layout, work: Workload) -> MemoryPlan:
    """Per-GPU bytes for the most loaded rank (formulas in the module docstring)."""
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    for role, a in (("student", student), ("teacher", teacher)):
        if a is not None:
            check_layout(a, tp, pp, role)
    if layout.sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel needs tp > 1")
    for name in (work.student_dtype, work.teacher_dtype):
        if name not in DTYPE_BYTES:
            raise ValueError(f"dtype {name!r} not in {sorted(DTYPE_BYTES)}")
    ps = stage_params(student, tp, pp)
    pt = stage_params(teacher, tp, pp) if teacher is not None else 0
    act_b, t_b = DTYPE_BYTES[work.student_dtype], DTYPE_BYTES[work.teacher_dtype]
    optim_per_param = 8 + (4 if work.student_dtype != "float32" else 0)
    optimizer = ps * optim_per_param
    if layout.distributed_optimizer:
        optimizer = -(-optimizer // dp)
    s, b = work.seq_len, work.micro_batch
    one_layer = layer_activation_elements(student, s, b, tp, layout.sequence_parallel,
                                          work.flash_attention) * act_b
    if work.recompute:
        kept = s * b * student.hidden_size // (tp if layout.sequence_parallel else 1) * act_b
        activations = student.num_layers * kept + one_layer
    else:
        activations = student.num_layers * one_layer  # (L/pp layers) x (pp micro-batches in flight)
    tokens = s * b
    v_local = student.padded_vocab_size(tp) // tp
    chunk = min(tokens * v_local, CHUNK_ELEMENTS) * 4 * 2
    logits = tokens * v_local * act_b * 2 + chunk
    teacher_forward = 0
    if teacher is not None:
        logits += tokens * (teacher.padded_vocab_size(tp) // tp) * t_b
        teacher_forward = layer_activation_elements(teacher, s, b, tp, layout.sequence_parallel,
                                                    work.flash_attention) * t_b
    return MemoryPlan(
        student_params_local=ps, teacher_params_local=pt, teacher_weights=pt * t_b, student_weights=ps * act_b,
        gradients=ps * 4, optimizer=optimizer, activations=activations, logits=logits,
        teacher_forward=teacher_forward,
    )


def suggest_layouts(student: ModelArch, teacher: ModelArch | None, work: Workload, gpu_memory: int,
                    num_gpus: int, distributed_optimizer: bool = True, sequence_parallel: bool = True,
                    headroom: float = 0.9) -> list[tuple[Layout, MemoryPlan]]:
    """Layouts (tp, pp) with tp*pp dividing num_gpus whose plan fits headroom * gpu_memory, smallest tp*pp first
    (then smaller tp: TP communication is per layer, PP's per micro-batch)."""
    out = []
    for mp in range(1, num_gpus + 1):
        if num_gpus % mp:
            continue
        for tp in range(1, mp + 1):
            if mp % tp:
                continue
            pp = mp // tp
            layout = Layout(tp, pp, num_gpus // mp, sequence_parallel=sequence_parallel and tp > 1,
                            distributed_optimizer=distributed_optimizer)
            try:
                plan = memory_plan(student, teacher, layout, work)
            except ValueError:
                continue
            if plan.total <= headroom * gpu_memory:
                out.append((layout, plan))
    return sorted(out, key=lambda lp: (lp[0].tp * lp[0].pp, lp[0].tp))


def format_plan(plan: MemoryPlan, layout: Layout) -> str:
    rows = [("teacher weights", plan.teacher_weights), ("student weights", plan.student_weights),
            ("student gradients (fp32)", plan.gradients), ("optimizer state", plan.optimizer),
            ("student activations", plan.activations), ("logits shards + temporaries", plan.logits),
            ("teacher forward working set", plan.teacher_forward), ("total", plan.total)]
    head = (f"layout TP={layout.tp} PP={layout.pp} DP={layout.dp} SP={layout.sequence_parallel} "
            f"dist-opt={layout.distributed_optimizer}; params/GPU student {plan.student_params_local / 1e6:.1f}M "
            f"teacher {plan.teacher_params_local / 1e6:.1f}M")
    return "\n".join([head] + [f"  {name:<30} {value / GIB:9.2f} GiB" for name, value in rows])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--student", required=True, help=f"HF dir / config.json or preset: {', '.join(PRESETS)}")
    parser.add_argument("--teacher", default=None, help="same forms as --student (omit for a student-only plan)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per sequence (prompt + response)")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--recompute", action="store_true", help="full activation recompute of the student")
    parser.add_argument("--flash-attention", action="store_true", help="TE/flash attention: no [s, s] scores")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES), help="student and teacher dtype")
    parser.add_argument("--gpu-memory", default=None, help="e.g. 80GiB: also list the smallest layouts that fit")
    parser.add_argument("--num-gpus", type=int, default=None, help="GPUs for --gpu-memory suggestions "
                        "(default tp*pp*dp)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    student = resolve_arch(args.student)
    teacher = resolve_arch(args.teacher) if args.teacher else None
    layout = Layout(args.tp, args.pp, args.dp, args.sequence_parallel, args.distributed_optimizer)
    work = Workload(args.seq_len, args.micro_batch, args.recompute, args.dtype, args.dtype, args.flash_attention)
    plan = memory_plan(student, teacher, layout, work)
    result = {"layout": asdict(layout), "workload": asdict(work), "plan": plan.as_dict()}
    fits = None
    if args.gpu_memory:
        mem = parse_bytes(args.gpu_memory)
        n = args.num_gpus or args.tp * args.pp * args.dp
        fits = suggest_layouts(student, teacher, work, mem, n)[:5]
        result["gpu_memory"] = mem
        result["fits"] = [{"layout": asdict(lay), "total": p.total} for lay, p in fits]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(format_plan(plan, layout))
    if fits is not None:
        print(f"smallest layouts that fit {result['gpu_memory'] / GIB:.0f} GiB (90% headroom) on "
              f"{args.num_gpus or args.tp * args.pp * args.dp} GPUs:")
        for lay, p in fits:
            print(f"  TP={lay.tp} PP={lay.pp} DP={lay.dp} SP={lay.sequence_parallel} dist-opt: "
                  f"{p.total / GIB:.1f} GiB")
        if not fits:
            print("  none: add GPUs, enable --recompute, or shorten --seq-len")
    return 0
