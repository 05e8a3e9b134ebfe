"""`evaluate(engine, benchmark, params, n, k_list, tokenizer)`: the one evaluation code path (CLI and trainer).

Generates n samples per problem through any `RolloutEngine`, scores each with the benchmark's scorer, and reports
avg@k / pass@k (mean over problems; see passk.py). Output files (when out_dir is given):
  <out>/<benchmark>.results.jsonl   one line per problem: its samples, extracted answers, correctness, pass@k
  <out>/<benchmark>.summary.json    metrics + settings (sampling, n, k, engine weight version, sandbox in force)
  <out>/<benchmark>.table.txt       the summary table printed by `tropd eval`
"""
from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from megatron_tropd.evaluation.benchmarks import Benchmark, default_instruction, format_prompt_ids
from megatron_tropd.evaluation.passk import aggregate, pass_at_k
from megatron_tropd.evaluation.sandbox import SandboxLimits, sandbox_description
from megatron_tropd.evaluation.scorers import SCORER_ALIASES, check_problem, get_scorer
from megatron_tropd.rollout.base import GenerationRequest, RolloutEngine, SamplingParams


_SCORER_KIND = {**SCORER_ALIASES, "code": "code"}


@dataclass
class EvalResult:
    benchmark: str
    scorer: str
    n: int
    k_list: list[int]
    metrics: dict[str, float]  # {"pass@1": ..., "avg@1": ..., ...}, means over problems, in [0, 1]
    per_problem: list[dict] = field(repr=False)
    summary: dict = field(default_factory=dict, repr=False)
    files: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        return format_table([self.summary])


def _stop_ids(tokenizer: Any) -> tuple[int, ...]:
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = eos if isinstance(eos, (list, tuple)) else [eos]
    return tuple(int(i) for i in ids if i is not None)


def evaluate(
    engine: RolloutEngine,
    benchmark: Benchmark,
    params: SamplingParams,
    n: int,
    k_list: Sequence[int],
    tokenizer: Any,
    *,
    instruction: str | None = None,
    sandbox_limits: SandboxLimits | None = None,
    batch_problems: int = 16,
    score_workers: int = 4,
    out_dir: str | Path | None = None,
    extra_summary: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """Sample n responses per problem from `engine`, score them, return avg@k / pass@k for k in k_list.

    `tokenizer` is an HF tokenizer (chat template for prompts, decode for responses). `instruction=None` uses
    the scorer's default ("put your final answer within \\boxed{}", ...); "" adds none. If `params` has no
    stop ids the tokenizer's EOS is used. Request ids are problem indices, so (params.seed, problem) fixes the
    samples. Scorer failures on odd outputs count as wrong; bad benchmark rows raise ValueError (before any
    generation). Code is scored on `score_workers` threads (each runs a sandboxed subprocess).
    """
    k_list = sorted(set(int(k) for k in k_list))
    if n < 1:
        raise ValueError(f"n (samples per problem) must be >= 1, got {n}")
    if not k_list or k_list[0] < 1 or k_list[-1] > n:
        raise ValueError(f"every k must be in [1, n={n}], got k={k_list}; raise --n or lower --k")
    if not benchmark.problems:
        raise ValueError(f"benchmark {benchmark.name!r} has no problems")
    if batch_problems < 1:
        raise ValueError(f"batch_problems must be >= 1, got {batch_problems}")
    if not params.stop_token_ids and _stop_ids(tokenizer):
        params = dataclasses.replace(params, stop_token_ids=_stop_ids(tokenizer))
    log = log or (lambda s: None)
    default_scorer = get_scorer(benchmark.scorer, sandbox_limits)
    scorers: dict[str, Callable] = {benchmark.scorer: default_scorer}
    for p in benchmark.problems:  # fail before spending any generation time
        check_problem(p, p.scorer or benchmark.scorer)
    t0 = time.monotonic()

    per_problem: list[dict] = []
    gen_s = score_s = 0.0
    problems = benchmark.problems
    for start in range(0, len(problems), batch_problems):
        chunk = problems[start : start + batch_problems]
        requests = []
        for i, p in enumerate(chunk, start):
            instr = instruction if instruction is not None else default_instruction(p.scorer or benchmark.scorer)
            requests.append(GenerationRequest(prompt_ids=tuple(format_prompt_ids(p, tokenizer, instr)), n=n,
                                              request_id=i))
        tg = time.monotonic()
        outputs = engine.generate(requests, params)
        gen_s += time.monotonic() - tg
        if len(outputs) != len(requests) or any(len(o) != n for o in outputs):
            raise RuntimeError(
                f"engine returned {[len(o) for o in outputs]} samples for {len(requests)} requests of n={n}"
            )
        ts = time.monotonic()
        texts = [[tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in ss] for ss in outputs]
        names = [p.scorer or benchmark.scorer for p in chunk]
        for name in names:
            if name not in scorers:
                scorers[name] = get_scorer(name, sandbox_limits)
        jobs = [(i, j) for i in range(len(chunk)) for j in range(n)]
        run = lambda ij: scorers[names[ij[0]]](texts[ij[0]][ij[1]], chunk[ij[0]])  # noqa: E731
        # Code runs in subprocesses: score it on threads. Math stays on this thread (its timeout is SIGALRM).
        threaded = [ij for ij in jobs if _SCORER_KIND.get(names[ij[0]]) == "code" and score_workers > 1]
        scores = {}
        if threaded:
            with ThreadPoolExecutor(score_workers) as pool:
                scores.update(zip(threaded, pool.map(run, threaded)))
        scores.update({ij: run(ij) for ij in jobs if ij not in scores})
        for i, (p, req, samples) in enumerate(zip(chunk, requests, outputs)):
            name = names[i]
            rows = []
            for j, s in enumerate(samples):
                sc = scores[(i, j)]
                rows.append({
                    "response": texts[i][j], "extracted": sc.extracted if name != "code" else None,
                    "correct": bool(sc.correct), "reward": sc.reward, "detail": sc.detail,
                    "finish_reason": s.finish_reason, "response_tokens": len(s.response_ids),
                    "weight_version": s.weight_version,
                })
            c = sum(r["correct"] for r in rows)
            per_problem.append({
                "id": p.id, "scorer": name, "answer": p.answer if name != "code" else None,
                "prompt_tokens": len(req.prompt_ids), "n": n, "n_correct": c,
                **{f"pass@{k}": pass_at_k(n, c, k) for k in k_list},
                "samples": rows,
            })
        score_s += time.monotonic() - ts
        log(f"[eval] {benchmark.name}: {min(start + batch_problems, len(problems))}/{len(problems)} problems")

    metrics = aggregate([[r["correct"] for r in pp["samples"]] for pp in per_problem], k_list)
    all_samples = [r for pp in per_problem for r in pp["samples"]]
    summary = {
        "benchmark": benchmark.name, "source": benchmark.source, "scorer": benchmark.scorer,
        "num_problems": len(per_problem), "n": n, "k": k_list,
        "metrics": metrics,
        "mean_response_tokens": sum(r["response_tokens"] for r in all_samples) / len(all_samples),
        "truncated_frac": sum(r["finish_reason"] == "length" for r in all_samples) / len(all_samples),
        "sampling": dataclasses.asdict(params),
        "weight_version": getattr(engine, "weight_version", None),
        "generation_s": round(gen_s, 3), "scoring_s": round(score_s, 3),
        "elapsed_s": round(time.monotonic() - t0, 3),
        **({"sandbox": sandbox_description(sandbox_limits)} if "code" in scorers else {}),
        **(extra_summary or {}),
    }
    result = EvalResult(benchmark.name, benchmark.scorer, n, k_list, metrics, per_problem, summary)
    if out_dir is not None:
        result.files = write_outputs(result, Path(out_dir))
    return result


def write_outputs(result: EvalResult, out_dir: Path) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "results": out_dir / f"{result.benchmark}.results.jsonl",
        "summary": out_dir / f"{result.benchmark}.summary.json",
        "table": out_dir / f"{result.benchmark}.table.txt",
    }
    with open(files["results"], "w", encoding="utf-8") as f:
        for row in result.per_problem:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    files["summary"].write_text(json.dumps(result.summary, indent=2, default=str) + "\n")
    files["table"].write_text(result.table() + "\n")
    return {k: str(v) for k, v in files.items()}


def format_table(summaries: Sequence[dict], labels: Sequence[str] | None = None) -> str:
    """Fixed-width table: one row per (run, benchmark), columns avg@k / pass@k in percent."""
    keys: list[str] = []
    for s in summaries:
        for k in s["metrics"]:
            if k not in keys:
                keys.append(k)
    keys.sort(key=lambda m: (int(m.split("@")[1]), m.split("@")[0] != "avg"))
    head = (["run"] if labels else []) + ["benchmark", "problems", "n"] + keys
    rows = []
    for i, s in enumerate(summaries):
        vals = [f"{100 * s['metrics'][k]:.2f}" if k in s["metrics"] else "-" for k in keys]
        rows.append(([labels[i]] if labels else []) + [s["benchmark"], str(s["num_problems"]), str(s["n"])] + vals)
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) if j >= len(head) - len(keys) else c.ljust(w)
                                   for j, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def compare_summaries(paths: Sequence[str | Path]) -> str:
    """Table of several runs' summary JSON files (the first is the baseline; deltas in points follow)."""
    summaries = []
    for p in paths:
        try:
            summaries.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: not a readable eval summary JSON ({e})") from e
        if "metrics" not in summaries[-1]:
            raise ValueError(f"{p}: no 'metrics' key; pass the <benchmark>.summary.json written by tropd eval")
    text = format_table(summaries, labels=[Path(p).parent.name or str(p) for p in paths])
    base = summaries[0]
    deltas = []
    for p, s in zip(paths[1:], summaries[1:]):
        common = [k for k in s["metrics"] if k in base["metrics"]]
        if s["benchmark"] == base["benchmark"] and common:
            d = ", ".join(f"{k} {100 * (s['metrics'][k] - base['metrics'][k]):+.2f}" for k in common)
            deltas.append(f"{p} vs {paths[0]}: {d} (points)")
    return text + ("\n" + "\n".join(deltas) if deltas else "")
