"""Pruned vs cut students of SmolLM2-135M-Instruct, before any healing: held-out forward KL to the teacher.

    python tools/bench_prune.py --json docs/pruning_bench.json

Makes (or reuses, from --students-dir) each student with `megatron_tropd.models.prune` -- ModelOpt Minitron depth
and width pruning on the teacher's own text, and the every-k layer cut -- then samples held-out teacher responses
(prompts of a reasoning-gym generator seed used nowhere else; temperature 1, fixed seed) and scores every student
teacher-forced on them, at every response position:
    forward KL   KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))   (full vocabulary, nats per token)
    top-1 agree  argmax p_S == argmax p_T
    NLL          -log p_S(teacher's token)
averaged over all response tokens. Each student is also loaded by our megatron loader and its logits compared with
transformers' (max |diff|). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

# name -> (method, target kwargs); the 15-layer pair and the 6-layer pair cut the same number of layers, the width
# variants keep all 30 layers at about the 15-layer students' parameter count.
VARIANTS = {
    "every2": ("every_k", dict(num_layers=15)),
    "minitron15": ("minitron", dict(num_layers=15)),
    "every5": ("every_k", dict(num_layers=6)),
    "minitron6": ("minitron", dict(num_layers=6)),
    "minitron30-ffn576": ("minitron", dict(ffn_hidden_size=576)),
    "minitron30-hidden432": ("minitron", dict(hidden_size=432)),  # 384 would not load (9 heads must divide it)
}


def log(msg: str) -> None:
    print(f"[bench_prune {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def heldout_samples(teacher: Path, n: int, tokens: int, seed: int, task: str, data_seed: int):
    """(prompt ids, response ids) of `n` teacher samples at temperature 1."""
    from transformers import AutoTokenizer

    from megatron_tropd.data import DataConfig, PromptDataset
    from megatron_tropd.rollout.base import GenerationRequest, SamplingParams
    from megatron_tropd.rollout.embedded import EmbeddedEngine

    tok = AutoTokenizer.from_pretrained(str(teacher))
    data = PromptDataset(DataConfig(source="reasoning_gym", task=task, size=n, eval_size=0, seed=data_seed,
                                    system_prompt="Answer briefly."), tok)
    engine = EmbeddedEngine(str(teacher), pad_token_id=tok.pad_token_id or 0)
    params = SamplingParams(temperature=1.0, max_new_tokens=tokens, seed=seed,
                            stop_token_ids=(tok.eos_token_id,) if tok.eos_token_id is not None else ())
    out = engine.generate([GenerationRequest(tuple(p.token_ids), request_id=i) for i, p in enumerate(data.train[:n])],
                          params)
    engine.close()
    return [(s[0].prompt_ids, s[0].response_ids) for s in out]


@torch.no_grad()
def response_logprobs(model, samples) -> list[torch.Tensor]:
    """Per sample the log-softmax [r, V] at the positions that predict the r response tokens."""
    out = []
    for prompt, response in samples:
        ids = torch.tensor([prompt + response])
        logits = model(ids).logits[0].float()  # [s, V]
        out.append(torch.log_softmax(logits[len(prompt) - 1: len(prompt) + len(response) - 1], dim=-1))
    return out


def compare(teacher_lp: list[torch.Tensor], student_lp: list[torch.Tensor], samples) -> dict:
    fkl, agree, nll, n = 0.0, 0, 0.0, 0
    for t, s, (_, response) in zip(teacher_lp, student_lp, samples):
        fkl += float((t.exp() * (t - s)).sum())
        agree += int((t.argmax(-1) == s.argmax(-1)).sum())
        nll += float(-s.gather(-1, torch.tensor(response)[:, None]).sum())
        n += len(response)
    return {"forward_kl": fkl / n, "top1_agreement": agree / n, "nll_teacher_tokens": nll / n, "tokens": n}


def our_loader_diff(groups, path: Path, sample) -> float:
    """Max |logit diff| between our megatron loader and transformers on one held-out sequence."""
    from transformers import AutoModelForCausalLM

    from megatron_tropd.models.prune import full_logits, load_teacher

    model, arch = load_teacher(path, groups)
    ids = sample[0] + sample[1]
    ours = full_logits(model, ids, groups.device)[0, :, : arch.vocab_size]
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].float()
    return float((ours - theirs).abs().max())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="bench_prune.json")
    p.add_argument("--students-dir", default=None, help="where students are made / reused (default: cache)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--heldout", type=int, default=16, help="held-out teacher samples")
    p.add_argument("--tokens", type=int, default=64, help="tokens per held-out teacher response")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the held-out responses")
    p.add_argument("--task", default="basic_arithmetic")
    p.add_argument("--heldout-data-seed", type=int, default=2000, help="prompt generator seed (calibration: 1000)")
    p.add_argument("--calib-prompts", type=int, default=16)
    p.add_argument("--calib-response-tokens", type=int, default=64)
    p.add_argument("--rebuild", action="store_true", help="re-make students that already exist")
    args = p.parse_args()
    torch.manual_seed(0)

    from transformers import AutoModelForCausalLM

    from megatron_tropd.distributed import parallel
    from megatron_tropd.models.builtin import default_cache_dir, resolve_model_path
    from megatron_tropd.models.prune import PRUNE_INFO, PruneTarget, modelopt_unavailable_reason, prune_teacher
    from megatron_tropd.models.prune_cli import CalibConfig, calibration_sequences

    t_start = time.perf_counter()
    cache = default_cache_dir()
    teacher = resolve_model_path("builtin:smollm2-135m-instruct", cache)
    students_dir = Path(args.students_dir) if args.students_dir else cache / "bench_prune"
    reason = modelopt_unavailable_reason()
    if reason:
        log(f"ModelOpt Minitron cannot run: {reason}; only the every-k cuts are measured")
    calib_cfg = CalibConfig(prompts=args.calib_prompts, task=args.task, response_tokens=args.calib_response_tokens)
    calib = None
    groups = parallel.initialize(1, 1)
    made = {}
    for name in args.variants:
        method, target = VARIANTS[name]
        out = students_dir / name
        if method == "minitron" and reason:
            made[name] = {"skipped": reason}
            continue
        if (out / PRUNE_INFO).is_file() and not args.rebuild:
            made[name] = json.loads((out / PRUNE_INFO).read_text())
            log(f"{name}: reusing {out}")
            continue
        if method == "minitron" and calib is None:
            t = time.perf_counter()
            calib = calibration_sequences(teacher, calib_cfg)
            log(f"calibration: {len(calib)} sequences, {sum(map(len, calib))} tokens ({time.perf_counter() - t:.0f} s)")
        info = dict(dataclasses.asdict(calib_cfg), tokens=sum(map(len, calib))) if method == "minitron" else {}
        report = prune_teacher(teacher, out, PruneTarget(**target), method, groups, calib or [], info, overwrite=True,
                               scores_root=students_dir / "scores", log=log)
        made[name] = dataclasses.asdict(report)
        log(f"{name}: kept layers {report.kept_layers}, {report.params_student / 1e6:.1f}M params, "
            f"{report.seconds}")

    t = time.perf_counter()
    samples = heldout_samples(teacher, args.heldout, args.tokens, args.seed, args.task, args.heldout_data_seed)
    t_sample = time.perf_counter() - t
    log(f"held-out: {len(samples)} teacher samples, {sum(len(r) for _, r in samples)} tokens ({t_sample:.0f} s)")
    teacher_model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()
    teacher_lp = response_logprobs(teacher_model, samples)
    del teacher_model
    rows = {"teacher": dict(compare(teacher_lp, teacher_lp, samples), layers=30, params_m=134.5, method="-")}
    for name in args.variants:
        info = made[name]
        if "skipped" in info:
            rows[name] = {"skipped": info["skipped"]}
            continue
        path = students_dir / name
        student = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        row = compare(teacher_lp, response_logprobs(student, samples), samples)
        del student
        row.update(method=info["method"], layers=info["student_arch"]["num_layers"],
                   hidden=info["student_arch"]["hidden_size"], ffn=info["student_arch"]["ffn_hidden_size"],
                   heads=info["student_arch"]["num_attention_heads"], params_m=round(info["params_student"] / 1e6, 1),
                   kept_layers=info["kept_layers"], our_loader_max_abs_diff=our_loader_diff(groups, path, samples[0]))
        rows[name] = row
        log(f"{name}: FKL {row['forward_kl']:.3f}, agreement {row['top1_agreement']:.3f}")
    parallel.destroy()

    header = f"{'student':<22}{'method':<10}{'layers':>7}{'params':>8}{'FKL':>8}{'top1':>7}{'NLL':>8}"
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        if "skipped" in r:
            print(f"{name:<22}skipped: {r['skipped']}")
            continue
        print(f"{name:<22}{r['method']:<10}{r['layers']:>7}{r['params_m']:>7.1f}M{r['forward_kl']:>8.3f}"
              f"{r['top1_agreement']:>7.3f}{r['nll_teacher_tokens']:>8.3f}")
    result = {
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]),
        "heldout": {"prompts": args.heldout, "task": args.task, "data_seed": args.heldout_data_seed,
                    "tokens": args.tokens, "temperature": 1.0, "seed": args.seed,
                    "response_tokens": sum(len(r) for _, r in samples)},
        "calibration": dataclasses.asdict(calib_cfg),
        "rows": rows,
        "students": {k: {kk: v.get(kk) for kk in ("method", "kept_layers", "layer_scores", "seconds", "calibration",
                                                  "versions", "fallback_from")} for k, v in made.items()},
        "seconds": {"total": round(time.perf_counter() - t_start, 1), "sample_teacher": round(t_sample, 1)},
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
    }
    Path(args.json).write_text(json.dumps(result, indent=2))
    log(f"wrote {args.json} ({result['seconds']['total']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
