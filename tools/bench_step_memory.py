#!/usr/bin/env python
"""Peak memory of one distillation step per rank at a large vocabulary: no rank ever allocates a
[tokens x full vocabulary] tensor; the step's extra memory stays within a few logits shards.

    python tools/bench_step_memory.py                       # V = 151936, TP = 2, 4 x 256 tokens, TrOPD(fkl)
    python tools/bench_step_memory.py --tp 1 --tokens 128   # compare: TP=1 shards are the full vocabulary

Tiny transformer bodies (1 layer, hidden 64) with a Qwen-sized vocabulary isolate the vocabulary-dependent memory.
For every rank it reports the peak bytes allocated inside `distill_step` (allocator events, torch.profiler) and the
largest single allocation, next to the size of one logits shard ([T, V/tp] float32) and of one full-vocabulary
[T, V] float32 tensor. Writes JSON (--out). Exit code 1 if a rank's largest allocation reaches the full-vocabulary size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(groups, vocab: int, batch: int, seq: int, objective: str):
    import torch

    from megatron_tropd.training.batch import build_batch
    from megatron_tropd.config import OptimConfig
    from megatron_tropd.training.memory_profile import profile_allocations
    from megatron_tropd.models.arch import ModelArch
    from megatron_tropd.objectives import ObjectiveConfig, build_objective
    from megatron_tropd.training.roles import build_student, build_teacher
    from megatron_tropd.rollout.base import Sample
    from megatron_tropd.training.scoring import MegatronTeacherScorer
    from megatron_tropd.training.step import StepOptions, distill_step

    arch = ModelArch(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                     vocab_size=vocab, make_vocab_size_divisible_by=128)
    student = build_student(arch, groups, None, OptimConfig(lr=1e-4), total_updates=2)
    g = torch.Generator().manual_seed(0)
    prompt = 8
    samples = [Sample(prompt_ids=torch.randint(0, vocab, (prompt,), generator=g).tolist(),
                      response_ids=torch.randint(0, vocab, (seq - prompt,), generator=g).tolist(),
                      logprobs=[-1.0] * (seq - prompt - (4 if i % 2 else 0)), finish_reason="length",
                      weight_version=0, prefix_len=4 if i % 2 else 0, request_id=i) for i in range(batch)]
    data = build_batch(samples, pad_id=0).split(groups.dp_size)[groups.dp_rank]
    objective = build_objective(ObjectiveConfig(name=objective))
    opts = StepOptions(temperature=1.0, vocab_size=vocab, micro_batch_size=batch // groups.dp_size)
    teacher = MegatronTeacherScorer(build_teacher(arch, groups, None), groups, opts.score)
    distill_step(student, teacher, data, objective, groups, 0, opts)  # warm-up: optimizer state, buffers
    _, stats = profile_allocations(lambda: distill_step(student, teacher, data, objective, groups, 1, opts))
    tokens = data.inputs.numel()
    v_pad = arch.padded_vocab_size(groups.tp_size)
    return {
        "rank": groups.rank, "tp": groups.tp_size, "tokens": tokens, "vocab": vocab,
        "peak_bytes": stats.peak_bytes, "largest_alloc_bytes": stats.largest_bytes,
        "logits_shard_fp32_bytes": tokens * (v_pad // groups.tp_size) * 4,
        "full_vocab_fp32_bytes": tokens * v_pad * 4,
    }


def main() -> int:
    from megatron_tropd.distributed.spawn import run_distributed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--batch", type=int, default=4, help="sequences")
    p.add_argument("--tokens", type=int, default=256, help="tokens per sequence")
    p.add_argument("--objective", default="tropd")
    p.add_argument("--out", default="runs/bench_step_memory.json")
    args = p.parse_args()
    rows = run_distributed(measure, args.tp, tp=args.tp, args=(args.vocab, args.batch, args.tokens, args.objective),
                           timeout=1800)
    mib = 2 ** 20
    print(f"distill_step memory, V={args.vocab}, TP={args.tp}, objective={args.objective}")
    print(f"{'rank':>4} {'tokens':>7} {'peak MiB':>10} {'largest MiB':>12} {'shard MiB':>10} {'full-V MiB':>11} "
          f"{'peak/shard':>10}")
    ok = True
    for r in rows:
        print(f"{r['rank']:>4} {r['tokens']:>7} {r['peak_bytes'] / mib:>10.1f} {r['largest_alloc_bytes'] / mib:>12.1f} "
              f"{r['logits_shard_fp32_bytes'] / mib:>10.1f} {r['full_vocab_fp32_bytes'] / mib:>11.1f} "
              f"{r['peak_bytes'] / r['logits_shard_fp32_bytes']:>10.2f}")
        ok &= r["largest_alloc_bytes"] < r["full_vocab_fp32_bytes"] or args.tp == 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "ranks": rows}, indent=1))
    print(f"wrote {args.out}; no [tokens x full vocab] allocation: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
