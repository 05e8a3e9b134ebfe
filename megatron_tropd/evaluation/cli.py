"""`tropd eval`: benchmark accuracy (avg@k / pass@k) of an HF model through a rollout engine.

    tropd eval --benchmark humaneval --model DIR --limit 3 --n 1 --max-new-tokens 128
    tropd eval --benchmark data/aime24.jsonl --model DIR --n 32 --k 1 32 --temperature 0.6 --top-p 0.95
    tropd eval --compare runs/a/aime24.summary.json runs/b/aime24.summary.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--benchmark", help="'humaneval', 'rg:<reasoning-gym dataset>', or a .jsonl/.parquet path")
    p.add_argument("--scorer", default=None, help="math | choice | code | reasoning_gym (default: inferred)")
    p.add_argument("--model", help="HF model directory (weights + tokenizer with chat template)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--engine", choices=("embedded", "sglang"), default="embedded")
    p.add_argument("--sglang-url", action="append", default=None,
                   help="with --engine sglang: URL of a running server serving --model (repeatable); without it "
                        "one server is launched ($TROPD_SGLANG_PYTHON names the interpreter with SGLang)")
    p.add_argument("--n", type=int, default=1, help="samples per problem")
    p.add_argument("--k", type=int, nargs="+", default=None, help="k values for pass@k / avg@k (default: 1 and n)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first LIMIT problems")
    p.add_argument("--temperature", type=float, default=None, help="default 0.6 when n > 1, else 0 (greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--instruction", default=None, help="text appended to each prompt ('' for none; default per scorer)")
    p.add_argument("--batch-problems", type=int, default=16, help="problems per engine.generate call")
    p.add_argument("--score-workers", type=int, default=4, help="parallel sandboxed programs when scoring code")
    p.add_argument("--code-timeout", type=float, default=10.0, help="sandbox wall limit per program (s)")
    p.add_argument("--code-memory-mb", type=int, default=1024, help="sandbox address-space limit per program")
    p.add_argument("--out", default=None, help="output directory (default: eval_out/<benchmark>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", nargs="+", default=None, metavar="SUMMARY_JSON",
                   help="print a table comparing summary JSON files of earlier runs and exit")


def _build_engine(args: argparse.Namespace, out: Path):
    """The embedded engine in this process, or SGLang: attach to --sglang-url servers, else launch one server of
    --model with the project's launcher (logs in <out>/sglang; stopped by engine.close())."""
    if args.engine == "embedded":
        from megatron_tropd.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine(args.model)
    from megatron_tropd.rollout import sglang_server as srv
    from megatron_tropd.rollout.sglang import SGLangEngine
    from megatron_tropd.rollout.sglang_config import SGLangConfig

    cfg = SGLangConfig()
    if args.sglang_url:
        return SGLangEngine(urls=args.sglang_url, cfg=cfg, base_model_dir=args.model)
    server = srv.launch(args.model, cfg, out / "sglang", "student", 0, weight_version=0)
    try:
        srv.wait_healthy([server], cfg.startup_timeout_s)
        return SGLangEngine(servers=[server], cfg=cfg, base_model_dir=args.model)
    except BaseException:
        srv.stop(server)
        raise


def _validate(args: argparse.Namespace) -> None:
    if not args.benchmark:
        raise ValueError("--benchmark is required (humaneval, rg:<dataset>, or a file path)")
    if not args.model:
        raise ValueError("--model HF_DIR is required")
    if not Path(args.model).is_dir():
        raise ValueError(f"--model {args.model} is not a directory; give an HF checkpoint directory")
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")


def run(args: argparse.Namespace) -> int:
    from megatron_tropd.evaluation.harness import compare_summaries, evaluate

    try:
        if args.compare:
            print(compare_summaries(args.compare))
            return 0
        _validate(args)
        from megatron_tropd.evaluation.benchmarks import load_benchmark
        from megatron_tropd.evaluation.sandbox import SandboxLimits
        from megatron_tropd.rollout.base import SamplingParams

        bench = load_benchmark(args.benchmark, scorer=args.scorer, limit=args.limit, seed=args.seed)
        k_list = args.k or sorted({1, args.n})
        if max(k_list) > args.n or min(k_list) < 1:
            raise ValueError(f"--k {k_list} must lie in [1, --n={args.n}]")
        temperature = args.temperature if args.temperature is not None else (0.6 if args.n > 1 else 0.0)
        if temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {temperature}")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        params = SamplingParams(temperature=temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                seed=args.seed)
        limits = SandboxLimits(wall_s=args.code_timeout, memory_mb=args.code_memory_mb)
        out = Path(args.out or Path("eval_out") / bench.name)
    except ValueError as e:
        print(f"tropd eval: error: {e}", file=sys.stderr)
        return 2
    engine = _build_engine(args, out)
    try:
        result = evaluate(
            engine, bench, params, n=args.n, k_list=k_list, tokenizer=tokenizer, instruction=args.instruction,
            sandbox_limits=limits, batch_problems=args.batch_problems, out_dir=out,
            score_workers=args.score_workers,
            extra_summary={"model": str(args.model), "engine": args.engine},
            log=lambda s: print(s, file=sys.stderr, flush=True),
        )
    finally:
        engine.close()
    print(result.table())
    for k in result.k_list:
        print(f"{result.benchmark} pass@{k} = {result.metrics[f'pass@{k}']:.4f}  avg@{k} = {result.metrics[f'avg@{k}']:.4f}")
    print(f"wrote {result.files['results']}, {result.files['summary']}, {result.files['table']}")
    return 0
