"""`tropd plan`: per-GPU memory of a student/teacher pair, each role planned in its own layout, and the layouts
that fit.

    tropd plan --student qwen3-1.7b --teacher qwen3-32b --tp 1 --dp 16 --teacher-tp 4 --teacher-pp 2 \
        --seq-len 9120 --micro-batch 1 --gpu-memory 80GiB --recompute --distributed-optimizer

Three placements of the teacher (docs/cluster.md):
- same layout: the teacher shares the student's TP/PP; both live on every GPU at once (the plan of the pair).
- own layout (time-shared, `teacher.scorer: own_layout`): the teacher has its own TP/PP/DP over the same GPUs; it
  scores the whole rollout batch, then the student trains. Peak = both models' resident state + the larger of the
  two phases' working sets (with `--offload-teacher` the teacher's weights are on the host during training).
- servers: the teacher runs elsewhere (SGLang servers on their own GPUs); the trainer GPUs hold the student only.
Without --teacher-tp/--teacher-pp the plan also suggests the smallest teacher layouts that fit beside the student.

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
    """GPU memory sizes -> bytes: '80', '80G', '80GiB' = 80 x 2^30 (a bare number is GiB: GPUs are sold in GiB-ish
    sizes), '80GB' = 80 x 10^9, '512MiB', '1T'; 'B' alone means bytes ('1000B')."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT]?)(i?)([bB]?)\s*", str(text))
    if not m or (m.group(3) and not m.group(2)):
        raise ValueError(f"cannot parse memory size {text!r}; use e.g. 80 (GiB), 80G, 80GiB or 80GB")
    value, unit, binary, suffix = float(m.group(1)), m.group(2).upper(), m.group(3), m.group(4)
    if not unit:
        return int(value * (1 if suffix else GIB))
    power = "KMGT".index(unit) + 1
    base = 1000 if (suffix and not binary) else 1024
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


# ---------------------------------------------------------------------------------------------------------------
# Each role in its own layout, and the three placements of the teacher
# ---------------------------------------------------------------------------------------------------------------
PLACEMENTS = ("same_layout", "own_layout", "servers")


@dataclass
class RolePlan:
    """Per-GPU bytes of one role in its own layout, for its most loaded rank."""

    role: str  # student | teacher
    layout: Layout
    params_local: int
    weights: int
    gradients: int = 0  # student: fp32 main-grad buffer
    optimizer: int = 0  # student: Adam state (/ DP with the distributed optimizer)
    activations: int = 0  # student: kept for backward (1F1B); teacher: one layer's forward working set
    logits: int = 0  # this role's logits shard(s) + the fp32 chunk temporaries of `ops`

    @property
    def resident(self) -> int:
        """Held through the whole step (both phases)."""
        return self.weights + self.gradients + self.optimizer

    @property
    def working(self) -> int:
        """Held only while this role runs (the teacher scores, then the student trains)."""
        return self.activations + self.logits

    @property
    def total(self) -> int:
        return self.resident + self.working

    def as_dict(self) -> dict:
        return {**asdict(self), "resident": self.resident, "working": self.working, "total": self.total}


def student_plan(student: ModelArch, layout: Layout, work: Workload) -> RolePlan:
    """The student alone in `layout` (the student terms of `memory_plan`)."""
    m = memory_plan(student, None, layout, work)
    return RolePlan("student", layout, m.student_params_local, m.student_weights, m.gradients, m.optimizer,
                    m.activations, m.logits)


def teacher_plan(teacher: ModelArch, layout: Layout, work: Workload) -> RolePlan:
    """The frozen teacher alone in `layout`: weights + one layer's forward working set (nothing is kept for a
    backward) + its logits shard [s*b, V/t] and the two fp32 chunk temporaries the scores are computed in."""
    tp, pp = layout.tp, layout.pp
    check_layout(teacher, tp, pp, "teacher")
    if work.teacher_dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {work.teacher_dtype!r} not in {sorted(DTYPE_BYTES)}")
    t_b = DTYPE_BYTES[work.teacher_dtype]
    params = stage_params(teacher, tp, pp)
    tokens = work.seq_len * work.micro_batch
    v_local = teacher.padded_vocab_size(tp) // tp
    logits = tokens * v_local * t_b + min(tokens * v_local, CHUNK_ELEMENTS) * 4 * 2
    sp = layout.sequence_parallel and tp > 1
    forward = layer_activation_elements(teacher, work.seq_len, work.micro_batch, tp, sp, work.flash_attention) * t_b
    return RolePlan("teacher", layout, params, params * t_b, activations=forward, logits=logits)


@dataclass
class PairPlan:
    """Per-GPU peak of the trainer GPUs for one placement of the teacher."""

    placement: str  # same_layout | own_layout | servers
    student: RolePlan
    teacher: RolePlan | None  # None for servers (the teacher is on other GPUs)
    offload: bool = False  # own layout: the teacher's weights wait in host memory while the student trains
    same_layout_total: int = 0  # same layout: memory_plan(...).total (both models' working sets at once)

    @property
    def scoring(self) -> int:
        """own layout: the student's resident state + the whole teacher while it scores."""
        return self.student.resident + (self.teacher.total if self.teacher else 0)

    @property
    def training(self) -> int:
        """own layout: the whole student while it trains + the teacher's weights unless offloaded."""
        return self.student.total + (self.teacher.weights if self.teacher and not self.offload else 0)

    @property
    def peak(self) -> int:
        if self.placement == "same_layout":
            return self.same_layout_total
        if self.placement == "servers":
            return self.student.total
        return max(self.scoring, self.training)

    def as_dict(self) -> dict:
        out = {"placement": self.placement, "peak": self.peak, "offload": self.offload}
        if self.placement == "own_layout":
            out.update(scoring=self.scoring, training=self.training)
        return out


def pair_plan(student: ModelArch, teacher: ModelArch | None, s_layout: Layout, t_layout: Layout | None,
              work: Workload, placement: str, offload: bool = False) -> PairPlan:
    """The trainer GPUs' peak for `placement` (t_layout: the teacher's own layout; ignored for same_layout)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r} not in {PLACEMENTS}")
    s_plan = student_plan(student, s_layout, work)
    if teacher is None or placement == "servers":
        return PairPlan("servers", s_plan, None)
    if placement == "same_layout":
        t_plan = teacher_plan(teacher, s_layout, work)
        total = memory_plan(student, teacher, s_layout, work).total
        return PairPlan(placement, s_plan, t_plan, same_layout_total=total)
    return PairPlan(placement, s_plan, teacher_plan(teacher, t_layout, work), offload=offload)


def teacher_layout(tp: int, pp: int, num_gpus: int, sequence_parallel: bool = False) -> Layout:
    if tp < 1 or pp < 1 or num_gpus % (tp * pp):
        raise ValueError(f"teacher TP={tp} x PP={pp} does not divide the {num_gpus} GPUs the student uses; choose "
                         f"teacher sizes whose product divides {num_gpus}")
    return Layout(tp, pp, num_gpus // (tp * pp), sequence_parallel=sequence_parallel and tp > 1)


def suggest_teacher_layouts(student: ModelArch, teacher: ModelArch, s_layout: Layout, work: Workload,
                            gpu_memory: int, offload: bool = False, headroom: float = 0.9,
                            ) -> list[tuple[Layout, PairPlan]]:
    """Own (time-shared) teacher layouts on the student's GPUs whose peak fits headroom * gpu_memory, smallest
    tp*pp first (more teacher DP: fewer, larger matmuls per GPU and no extra communication), then smaller tp."""
    n = s_layout.tp * s_layout.pp * s_layout.dp
    out = []
    for mp in range(1, n + 1):
        if n % mp:
            continue
        for tp in range(1, mp + 1):
            if mp % tp:
                continue
            lay = teacher_layout(tp, mp // tp, n, s_layout.sequence_parallel)
            try:
                plan = pair_plan(student, teacher, s_layout, lay, work, "own_layout", offload)
            except ValueError:
                continue
            if plan.peak <= headroom * gpu_memory:
                out.append((lay, plan))
    return sorted(out, key=lambda lp: (lp[0].tp * lp[0].pp, lp[0].tp))


def format_role(plan: RolePlan, name: str = "", note: str = "") -> str:
    lay = plan.layout
    head = (f"{plan.role} {name}: TP={lay.tp} PP={lay.pp} DP={lay.dp} SP={lay.sequence_parallel}"
            f"{' dist-opt=' + str(lay.distributed_optimizer) if plan.role == 'student' else ''}"
            f"{' ' + note if note else ''}; params/GPU {plan.params_local / 1e6:.1f}M")
    if plan.role == "student":
        rows = [("weights", plan.weights), ("gradients (fp32)", plan.gradients), ("optimizer state", plan.optimizer),
                ("activations", plan.activations), ("logits shard + grad + temporaries", plan.logits)]
    else:
        rows = [("weights", plan.weights), ("forward working set (one layer)", plan.activations),
                ("logits shard + temporaries", plan.logits)]
    rows.append(("total", plan.total))
    return "\n".join([head] + [f"  {n:<34} {v / GIB:9.2f} GiB" for n, v in rows])


def format_pair(plan: PairPlan) -> str:
    if plan.placement == "own_layout":
        return (f"own layout (time-shared{', teacher offloaded while training' if plan.offload else ''}): peak "
                f"{plan.peak / GIB:.2f} GiB = max(scoring {plan.scoring / GIB:.2f}, "
                f"training {plan.training / GIB:.2f})")
    if plan.placement == "same_layout":
        return f"same layout (both models resident, co-scheduled): peak {plan.peak / GIB:.2f} GiB"
    return f"servers (teacher on its own GPUs; trainer GPUs hold the student only): peak {plan.peak / GIB:.2f} GiB"


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
    parser.add_argument("--tp", type=int, default=1, help="student tensor parallel size")
    parser.add_argument("--pp", type=int, default=1, help="student pipeline parallel size")
    parser.add_argument("--dp", type=int, default=1, help="student data parallel size (GPUs = tp x pp x dp)")
    parser.add_argument("--teacher-tp", type=int, default=0, help="teacher's own TP (0 = the student's)")
    parser.add_argument("--teacher-pp", type=int, default=0, help="teacher's own PP (0 = the student's)")
    parser.add_argument("--offload-teacher", action="store_true",
                        help="own layout: the teacher's weights wait in host memory while the student trains")
    parser.add_argument("--sequence-parallel", action="store_true", help="needs --tp > 1")
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per sequence (prompt + response)")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--recompute", action="store_true", help="full activation recompute of the student")
    parser.add_argument("--flash-attention", action="store_true", help="TE/flash attention: no [s, s] scores")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES), help="student dtype")
    parser.add_argument("--teacher-dtype", default=None, choices=sorted(DTYPE_BYTES), help="default: --dtype")
    parser.add_argument("--gpu-memory", default=None, help="GPU memory: 80 (GiB), 80G, 80GiB or 80GB: also list "
                        "the layouts that fit")
    parser.add_argument("--num-gpus", type=int, default=None, help="GPUs for the student-layout suggestions "
                        "(default tp*pp*dp)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.error = _one_line_error  # argparse's own errors (a bad int, a missing flag): one line, no usage dump


def _one_line_error(message: str):
    import sys

    print(f"tropd plan: {message} (see tropd plan --help)", file=sys.stderr)
    raise SystemExit(2)


def check_args(args: argparse.Namespace) -> None:
    """One clear line per bad argument (ValueError), before any planning."""
    for flag in ("tp", "pp", "dp", "seq_len", "micro_batch"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(args, flag)}")
    for flag in ("teacher_tp", "teacher_pp"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1 (or 0 = the student's); got "
                             f"{getattr(args, flag)}")
    if args.sequence_parallel and args.tp == 1:
        raise ValueError("--sequence-parallel needs --tp > 1 (it splits activations over the student's tensor-"
                         "parallel group); add e.g. --tp 2 or drop --sequence-parallel")
    if (args.teacher_tp or args.teacher_pp or args.offload_teacher) and not args.teacher:
        raise ValueError("--teacher-tp / --teacher-pp / --offload-teacher need --teacher")
    if args.num_gpus is not None and args.num_gpus < 1:
        raise ValueError(f"--num-gpus must be >= 1; got {args.num_gpus}")
    if args.gpu_memory is not None and parse_bytes(args.gpu_memory) <= 0:
        raise ValueError(f"--gpu-memory must be > 0; got {args.gpu_memory!r}")


def run(args: argparse.Namespace) -> int:
    import sys

    try:
        return _run(args)
    except ValueError as e:  # every bad argument or layout: one line, no traceback
        print(f"tropd plan: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    check_args(args)
    student = resolve_arch(args.student)
    teacher = resolve_arch(args.teacher) if args.teacher else None
    s_layout = Layout(args.tp, args.pp, args.dp, args.sequence_parallel, args.distributed_optimizer)
    work = Workload(args.seq_len, args.micro_batch, args.recompute, args.dtype, args.teacher_dtype or args.dtype,
                    args.flash_attention)
    n = args.tp * args.pp * args.dp
    own = bool(args.teacher_tp or args.teacher_pp)
    t_layout = (teacher_layout(args.teacher_tp or args.tp, args.teacher_pp or args.pp, n, args.sequence_parallel)
                if teacher is not None else None)
    s_plan = student_plan(student, s_layout, work)
    result: dict = {"workload": asdict(work), "student": s_plan.as_dict(), "layout": asdict(s_layout)}
    pairs: list[PairPlan] = []
    same_error = None
    if teacher is not None:
        t_plan = teacher_plan(teacher, t_layout, work)
        result["teacher"] = t_plan.as_dict()
        try:
            pairs.append(pair_plan(student, teacher, s_layout, None, work, "same_layout"))
        except ValueError as e:  # the teacher may not fit the student's layout (heads, layers)
            same_error = str(e)
        if own:
            pairs.append(pair_plan(student, teacher, s_layout, t_layout, work, "own_layout", args.offload_teacher))
        pairs.append(pair_plan(student, teacher, s_layout, None, work, "servers"))
        result["placements"] = {p.placement: p.as_dict() for p in pairs}
        if same_error:
            result["placements"]["same_layout"] = {"error": same_error}
    if not own:  # the classic plan of the pair in one layout (kept for scripts that read "plan")
        try:
            result["plan"] = memory_plan(student, teacher, s_layout, work).as_dict()
        except ValueError:
            pass
    fits = t_fits = None
    if args.gpu_memory:
        mem = parse_bytes(args.gpu_memory)
        result["gpu_memory"] = mem
        fits = suggest_layouts(student, teacher, work, mem, args.num_gpus or n)[:5]
        result["fits"] = [{"layout": asdict(lay), "total": p.total} for lay, p in fits]
        if teacher is not None:
            t_fits = suggest_teacher_layouts(student, teacher, s_layout, work, mem, args.offload_teacher)[:5]
            result["teacher_fits"] = [{"layout": asdict(lay), **p.as_dict()} for lay, p in t_fits]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(format_role(s_plan, args.student))
    if teacher is not None:
        note = "(own layout, time-shared)" if own else "(the student's layout)"
        print(format_role(teacher_plan(teacher, t_layout, work), args.teacher, note))
        print("per-GPU peak of the trainer GPUs by teacher placement:")
        for pair in pairs:
            print(f"  {format_pair(pair)}")
        if same_error:
            print(f"  same layout: impossible ({same_error})")
    if fits is not None:
        mem_gib = result["gpu_memory"] / GIB
        what = "same-layout (student + teacher)" if teacher is not None else "student"
        print(f"smallest {what} layouts that fit {mem_gib:.0f} GiB (90% headroom) on {args.num_gpus or n} GPUs:")
        for lay, p in fits:
            print(f"  TP={lay.tp} PP={lay.pp} DP={lay.dp} SP={lay.sequence_parallel} dist-opt: "
                  f"{p.total / GIB:.1f} GiB")
        if not fits:
            print("  none: add GPUs, enable --recompute, or shorten --seq-len")
        if t_fits is not None:
            print(f"suggested teacher layouts beside the student's TP={args.tp} PP={args.pp} DP={args.dp} "
                  f"(own layout, time-shared; fits {mem_gib:.0f} GiB):")
            for lay, p in t_fits:
                print(f"  teacher TP={lay.tp} PP={lay.pp} DP={lay.dp}: peak {p.peak / GIB:.1f} GiB "
                      f"(scoring {p.scoring / GIB:.1f}, training {p.training / GIB:.1f})")
            if not t_fits:
                print("  none: try --offload-teacher, --recompute, a shorter --seq-len, or teacher servers")
    elif teacher is not None and not own:
        print("add --gpu-memory (e.g. 80) for the layouts that fit and a suggested teacher layout")
    return 0
