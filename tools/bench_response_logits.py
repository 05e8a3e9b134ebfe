#!/usr/bin/env python
"""The output layer's matmul at response positions only vs on the whole crop window, side by side in one run.

    python tools/bench_response_logits.py                 # SmolLM2-135M-sized teacher (30 layers), 15-layer student

`schedule.logits_from` runs the output layer only at the response positions of a micro-batch's crop window (the
window starts at its first response position; inside it, shorter rows end in right padding and rows with longer
prompts still have prompt tokens). This times `distill_step` (TrOPD, padded micro-batches, no packing) on the same
mixed-length synthetic rollouts as tools/bench_packing.py, alternating step by step between the default and the
same step with `logits_from`'s response mask ignored (the whole window through the output layer). The learning rate
is 0, so both modes see the same weights at every step; the first step of each is a warm-up. Prints a table, writes
JSON (--out).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODES = ("response_positions", "whole_window")


def measure(groups, args) -> dict:
    import torch

    import bench_packing
    from megatron_tropd.config import OptimConfig
    from megatron_tropd.objectives import ObjectiveConfig, build_objective
    from megatron_tropd.training import schedule
    from megatron_tropd.training.batch import build_batch
    from megatron_tropd.training.roles import build_student, build_teacher
    from megatron_tropd.training.scoring import MegatronTeacherScorer
    from megatron_tropd.training.step import StepOptions, distill_step

    default = schedule.logits_from

    # the crop window without the response-row selection; schedule.model_forward (the schedule's and the fused
    # teacher's forward) looks logits_from up in its module, so replacing it there swaps both
    @contextmanager
    def whole_window(model, start, where=None):
        with default(model, start) as applied:
            yield applied

    torch.manual_seed(args.seed)
    s_arch = bench_packing.smollm2_like(args.student_layers, args.vocab)
    t_arch = bench_packing.smollm2_like(args.teacher_layers, args.vocab)
    student = build_student(s_arch, groups, None, OptimConfig(lr=0.0), total_updates=2 * args.steps + 2)
    opts = StepOptions(temperature=1.0, vocab_size=args.vocab, micro_batch_size=args.micro_batch_size)
    teacher = MegatronTeacherScorer(build_teacher(t_arch, groups, None), groups, opts.score)
    objective = build_objective(ObjectiveConfig(name="tropd", seed=7))
    batch = build_batch(bench_packing._samples(args), pad_id=0)
    seconds, losses, positions = {m: [] for m in MODES}, {m: [] for m in MODES}, {}
    try:
        for step in range(args.steps + 1):
            for mode in MODES:
                schedule.logits_from = default if mode == MODES[0] else whole_window
                timings = {}
                t0 = time.perf_counter()
                metrics = distill_step(student, teacher, batch, objective, groups, step, opts, timings)
                dt = time.perf_counter() - t0
                if step:
                    seconds[mode].append(dt)
                losses[mode].append(metrics["loss"])
                positions[mode] = timings["throughput/logit_positions"]
                print(f"[bench_response_logits] step {step} {mode}: {dt:.2f} s, loss {metrics['loss']:.6f}", flush=True)
    finally:
        schedule.logits_from = default
    window = sum(mb.size * (mb.inputs.shape[1] - schedule.logits_start(mb.response_mask))
                 for mb in (m.trimmed(opts.trim_multiple) for m in batch.micro_batches(args.micro_batch_size)))
    return {"seconds": seconds, "losses": losses, "response_positions": positions[MODES[0]], "window_positions": window}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode (after one warm-up step)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--prompt", type=int, default=48)
    p.add_argument("--min-response", type=int, default=16)
    p.add_argument("--max-response", type=int, default=256)
    p.add_argument("--teacher-layers", type=int, default=30)
    p.add_argument("--student-layers", type=int, default=15)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/bench_response_logits.json")
    args = p.parse_args(argv)

    import bench_packing
    from megatron_tropd.distributed.spawn import run_distributed

    t0 = time.time()
    res = run_distributed(measure, 1, args=(args,), timeout=3600)[0]
    med = {m: statistics.median(res["seconds"][m]) for m in MODES}
    res.update({"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "wall_s": time.time() - t0, "step_s_median": med, "ratio": med[MODES[0]] / med[MODES[1]],
                "max_loss_rel_diff": max(abs(a - b) / max(abs(b), 1e-12)
                                         for a, b in zip(*(res["losses"][m] for m in MODES)))})
    print("| output layer on | s/step (median) | output-layer positions per pass |")
    print("|---|---|---|")
    print(f"| response positions (default) | {med[MODES[0]]:.2f} | {res['response_positions']:.0f} |")
    print(f"| the whole crop window | {med[MODES[1]]:.2f} | {res['window_positions']:.0f} |")
    print(f"response / window = {res['ratio']:.2f}x; largest relative loss difference {res['max_loss_rel_diff']:.1e}; "
          f"wall {res['wall_s']:.0f} s")
    bench_packing.write_report(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
