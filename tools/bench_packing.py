#!/usr/bin/env python
"""Training-step time with and without sequence packing, side by side in one run, on rollouts of mixed lengths.

    python tools/bench_packing.py                         # SmolLM2-135M-sized teacher (30 layers), 15-layer student
    python tools/bench_packing.py --steps 5 --max-response 384 --objective full_vocab

Rollouts that stop at EOS have very different lengths (a reasoning batch: some answers in 20 tokens, some at the
cap). This measures `distill_step` alone (teacher scoring + update; no generation) on a fixed synthetic batch:
`--samples` sequences of a `--prompt`-token prompt and a response length drawn uniformly from
[--min-response, --max-response], micro-batches of `--micro-batch-size`, for each mode in turn:
  padded  every micro-batch trimmed to its own longest sequence (the default step)
  packed  the same, with optim.pack_sequences (training/packing.py): sequences share rows up to that width
Models are random-initialised at the given sizes (timing does not depend on the weights). Both modes run in one
process, interleaved step by step (padded, packed, padded, ...), so machine noise hits both alike; the first step of
each is a warm-up and is not counted. Prints a table and writes JSON (--out). The losses of the two modes are
printed too: packing must not change them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("padded", "packed")


def smollm2_like(layers: int, vocab: int):
    from megatron_tropd.models.arch import ModelArch

    return ModelArch(num_layers=layers, hidden_size=576, num_attention_heads=9, num_query_groups=3,
                     ffn_hidden_size=1536, vocab_size=vocab, tie_word_embeddings=True, make_vocab_size_divisible_by=128)


def _samples(args):
    import torch

    from megatron_tropd.rollout.base import Sample

    g = torch.Generator().manual_seed(args.seed)
    out = []
    for i in range(args.samples):
        r = int(torch.randint(args.min_response, args.max_response + 1, (1,), generator=g))
        out.append(Sample(prompt_ids=torch.randint(0, args.vocab, (args.prompt,), generator=g).tolist(),
                          response_ids=torch.randint(0, args.vocab, (r,), generator=g).tolist(),
                          logprobs=(-torch.rand(r, generator=g) * 3).tolist(), finish_reason="stop",
                          weight_version=0, request_id=i))
    return out


def measure(groups, args) -> dict:
    import torch

    from megatron_tropd.config import OptimConfig
    from megatron_tropd.objectives import ObjectiveConfig, build_objective
    from megatron_tropd.training.batch import build_batch
    from megatron_tropd.training.roles import build_student, build_teacher
    from megatron_tropd.training.scoring import MegatronTeacherScorer
    from megatron_tropd.training.step import StepOptions, distill_step

    torch.manual_seed(args.seed)
    s_arch, t_arch = smollm2_like(args.student_layers, args.vocab), smollm2_like(args.teacher_layers, args.vocab)
    teacher_model = build_teacher(t_arch, groups, None)
    objective = build_objective(ObjectiveConfig(name=args.objective, seed=7))
    batch = build_batch(_samples(args), pad_id=0)
    runs, weights = {}, None
    for mode in MODES:
        student = build_student(s_arch, groups, None, OptimConfig(lr=1e-6), total_updates=args.steps + 1)
        if weights is None:  # both modes train the same initial student
            weights = {k: v.clone() for k, v in student.gpt.state_dict().items() if torch.is_tensor(v)}
        else:
            student.gpt.load_state_dict(weights, strict=False)
        opts = StepOptions(temperature=1.0, vocab_size=args.vocab, micro_batch_size=args.micro_batch_size,
                           pack_sequences=mode == "packed")
        runs[mode] = {"student": student, "opts": opts, "teacher": MegatronTeacherScorer(teacher_model, groups,
                                                                                          opts.score),
                      "seconds": [], "losses": [], "phases": []}
    for step in range(args.steps + 1):  # interleaved; step 0 is the warm-up
        for mode in MODES:
            r = runs[mode]
            timings = {}
            t0 = time.perf_counter()
            metrics = distill_step(r["student"], r["teacher"], batch, objective, groups, step, r["opts"], timings)
            dt = time.perf_counter() - t0
            if step:
                r["seconds"].append(dt)
                r["phases"].append(timings)
            r["losses"].append(metrics["loss"])
            print(f"[bench_packing] step {step} {mode}: {dt:.2f} s, loss {metrics['loss']:.6f}", flush=True)
    lengths = [len(s.prompt_ids) + len(s.response_ids) - 1 for s in _samples(args)]
    out = {"lengths": lengths, "batch_width": int(batch.inputs.shape[1]), "modes": {}}
    for mode in MODES:
        r = runs[mode]
        last = r["phases"][-1]
        out["modes"][mode] = {"step_s_median": statistics.median(r["seconds"]), "step_s": r["seconds"],
                              "losses": r["losses"],
                              "body_positions": last["throughput/body_positions"],
                              "attention_pairs": last["throughput/attention_pairs"],
                              "logit_positions": last["throughput/logit_positions"],
                              **{k: statistics.median(p[k] for p in r["phases"])
                                 for k in ("time/teacher_s", "time/old_logprobs_s", "time/update_s")}}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode (after one warm-up step)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--prompt", type=int, default=48, help="prompt tokens per sequence")
    p.add_argument("--min-response", type=int, default=16)
    p.add_argument("--max-response", type=int, default=256)
    p.add_argument("--teacher-layers", type=int, default=30)
    p.add_argument("--student-layers", type=int, default=15)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--objective", default="tropd", help="objective.name (tropd, opd, full_vocab, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/bench_packing.json")
    args = p.parse_args(argv)
    if not 1 <= args.min_response <= args.max_response:
        p.error("need 1 <= --min-response <= --max-response")

    from megatron_tropd.distributed.spawn import run_distributed

    t0 = time.time()
    res = run_distributed(measure, 1, args=(args,), timeout=3600)[0]
    res.update({"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "wall_s": time.time() - t0, "cpus": os.cpu_count()})
    pad, pack = res["modes"]["padded"], res["modes"]["packed"]
    res["speedup"] = pad["step_s_median"] / pack["step_s_median"]
    res["max_loss_rel_diff"] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(pack["losses"], pad["losses"]))
    lengths = res["lengths"]
    print(f"\n{args.samples} sequences of {min(lengths)}-{max(lengths)} positions (mean {statistics.mean(lengths):.0f}), "
          f"micro-batches of {args.micro_batch_size}, objective {args.objective}, "
          f"{args.teacher_layers}-layer teacher, {args.student_layers}-layer student, V={args.vocab}")
    print("| mode | s/step (median) | teacher s (median) | update s (median) | body positions | attention pairs | "
          "logit positions |")
    print("|---|---|---|---|---|---|---|")
    for mode in MODES:
        m = res["modes"][mode]
        print(f"| {mode} | {m['step_s_median']:.2f} | {m['time/teacher_s']:.2f} | {m['time/update_s']:.2f} | "
              f"{m['body_positions']:.0f} | {m['attention_pairs']:.0f} | {m['logit_positions']:.0f} |")
    print(f"packed / padded step time: {1 / res['speedup']:.2f}x (speed-up {res['speedup']:.2f}x); "
          f"largest relative loss difference {res['max_loss_rel_diff']:.1e}; wall {res['wall_s']:.0f} s")
    write_report(res, args.out)
    return 0


def write_report(res: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
