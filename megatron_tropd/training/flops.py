"""Analytic model FLOPs of a distillation step and the model FLOPs utilisation (MFU) it reaches.

    N      = matmul parameters of a model: every transformer layer + the output layer with the real vocabulary
             (tied or not; the embedding lookup is no matmul and is left out)
    FLOPs  = 2 N per token of a forward-only pass, 6 N per token of a training (forward + backward) pass,
             2 N per generated token
    MFU    = step FLOPs / (step time * peak FLOP/s per device * devices)

Tokens are real (not padding) positions of the rollout batch; attention-score FLOPs (~ s^2) are left out, as in
the usual 6 N D estimate, so MFU is a slight under-estimate for long sequences.
"""
from __future__ import annotations

import time

import torch

from megatron_tropd.models.arch import ModelArch, head_dim


def matmul_params(arch: ModelArch, vocab_size: int) -> int:
    """N of `arch` (Llama family: GQA attention, SwiGLU MLP) with a `vocab_size`-row output layer."""
    h, d = arch.hidden_size, head_dim(arch)
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    attention = h * (q + 2 * kv) + q * h + (q + 2 * kv if arch.add_qkv_bias else 0)
    mlp = 3 * h * arch.ffn_hidden_size  # gate, up, down
    return arch.num_layers * (attention + mlp) + vocab_size * h


def real_tokens(response_mask: torch.Tensor) -> int:
    """Input positions up to each sequence's last response target ([b, s] mask; right padding excluded)."""
    idx = torch.arange(1, response_mask.shape[-1] + 1, device=response_mask.device)
    return int((response_mask.long() * idx).amax(-1).sum())


def step_flops(n_student: int, n_teacher: int, tokens: int, student_new: int, teacher_new: int,
               teacher_passes: int, old_pass: bool, updates: int) -> float:
    """FLOPs of one step: generation (student- and teacher-written tokens), the teacher's forward passes over the
    batch, the student's old-logprob pass when it ran, and `updates` training passes."""
    gen = 2 * n_student * student_new + 2 * n_teacher * teacher_new
    forward_only = 2 * n_teacher * tokens * teacher_passes + (2 * n_student * tokens if old_pass else 0)
    return float(gen + forward_only + 6 * n_student * tokens * updates)


def measure_peak_flops(device: torch.device, size: int = 1024, seconds: float = 0.5) -> float:
    """Float32 matmul FLOP/s of `device`: a [size, size] @ [size, size] loop for about `seconds` (after a warm-up)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.matmul(a, b)
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        n += 1
        if n % 8 == 0:
            sync()
            if time.perf_counter() - t0 >= seconds:
                break
    return 2.0 * size ** 3 * n / (time.perf_counter() - t0)
