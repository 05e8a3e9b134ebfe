"""`tropd prune`: a student HF checkpoint made from a teacher by ModelOpt Minitron pruning (depth and / or width) of
the megatron-core model, or by keeping every k-th layer.

    tropd prune --teacher builtin:smollm2-135m-instruct --out students/minitron15 --target-layers 15
    tropd prune --teacher HF_DIR --out DIR --target-layers 30 --ffn-hidden 768          # width only
    tropd prune --teacher HF_DIR --out DIR --target-layers 6 --method every_k           # layers 0, 5, 10, ...

Runs on one process (ModelOpt's Minitron is TP=1, PP=1). Writes DIR (complete or absent) with the weights, the
teacher's tokenizer and `prune_info.json` (method, kept teacher layers, layer scores, calibration, versions).
`--method minitron` never falls back silently: if ModelOpt cannot run it fails with the reason; `--method auto`
uses Minitron when it can and the every-k cut otherwise, and says so (the choice is recorded in prune_info.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CalibConfig:
    """Calibration text for Minitron: prompts of a reasoning-gym task (the distillation data's distribution),
    each followed by the teacher's own greedy response, so the statistics see the text the student must imitate."""

    prompts: int = 16  # number of calibration prompts (one forward pass each)
    task: str = "basic_arithmetic"  # reasoning-gym generator
    seed: int = 1000  # generator seed used nowhere else (the main job's prompts: 0; tools/bench_prune.py: 2000)
    system_prompt: str | None = "Answer briefly."
    response_tokens: int = 64  # teacher tokens appended to each prompt (0: prompts only)


def calibration_sequences(teacher_dir: str | Path, cfg: CalibConfig) -> list[list[int]]:
    """Token ids of the calibration sequences (prompt + the teacher's greedy response)."""
    from transformers import AutoTokenizer

    from megatron_tropd.data import DataConfig, PromptDataset
    from megatron_tropd.models.prune import PruneError

    if cfg.prompts < 1:
        raise PruneError(f"--calib-prompts must be >= 1 for Minitron, got {cfg.prompts}")
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    data = PromptDataset(DataConfig(source="reasoning_gym", task=cfg.task, size=cfg.prompts, eval_size=0,
                                    seed=cfg.seed, system_prompt=cfg.system_prompt), tok)
    prompts = [list(p.token_ids) for p in data.train[: cfg.prompts]]
    if cfg.response_tokens <= 0:
        return prompts
    from megatron_tropd.rollout.base import GenerationRequest, SamplingParams
    from megatron_tropd.rollout.embedded import EmbeddedEngine

    engine = EmbeddedEngine(str(teacher_dir), pad_token_id=tok.pad_token_id or 0)
    try:
        params = SamplingParams(temperature=0.0, max_new_tokens=cfg.response_tokens,
                                stop_token_ids=tuple(i for i in [tok.eos_token_id] if i is not None))
        out = engine.generate([GenerationRequest(tuple(p), request_id=i) for i, p in enumerate(prompts)], params)
    finally:
        engine.close()
    return [s[0].prompt_ids + s[0].response_ids for s in out]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher HF checkpoint directory, or builtin:smollm2-135m-instruct")
    p.add_argument("--out", required=True, help="output directory for the student HF checkpoint")
    p.add_argument("--method", choices=("minitron", "every_k", "auto"), default="minitron",
                   help="minitron (ModelOpt, default), every_k (keep layers 0, k, 2k, ...; k = L / target), or auto "
                        "(minitron when ModelOpt runs here, else every_k, reported)")
    p.add_argument("--target-layers", type=int, default=None, help="student layers (default: the teacher's)")
    p.add_argument("--ffn-hidden", type=int, default=None, help="student ffn (intermediate) size (minitron only)")
    p.add_argument("--hidden", type=int, default=None, help="student hidden size (minitron only)")
    p.add_argument("--heads", type=int, default=None,
                   help="student attention heads, a multiple of the teacher's KV groups (minitron only)")
    p.add_argument("--calib-prompts", type=int, default=16, help="calibration prompts (one forward pass each)")
    p.add_argument("--calib-task", default="basic_arithmetic", help="reasoning-gym task of the calibration prompts")
    p.add_argument("--calib-seed", type=int, default=1000, help="generator seed of the calibration prompts")
    p.add_argument("--calib-response-tokens", type=int, default=64,
                   help="teacher greedy tokens appended to each calibration prompt (0: prompts only)")
    p.add_argument("--scores-cache", default=None,
                   help="directory for the calibration statistics, reused by later targets (default: none)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")


def target_from_args(args: argparse.Namespace):
    from megatron_tropd.models.prune import PruneTarget

    return PruneTarget(num_layers=args.target_layers, ffn_hidden_size=args.ffn_hidden, hidden_size=args.hidden,
                       num_attention_heads=args.heads)


def run(args: argparse.Namespace) -> int:
    from megatron_tropd.models.prune import PruneError, modelopt_unavailable_reason

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _fail("tropd prune runs on one process (ModelOpt's Minitron prunes TP=1, PP=1); run it without "
                     "torchrun")
    try:
        teacher = _resolve(args.teacher)
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise PruneError(f"{out} exists; remove it or pass --overwrite")
        method, fallback = args.method, None
        if method == "auto":
            reason = modelopt_unavailable_reason()
            method = "every_k" if reason else "minitron"
            if reason:
                fallback = {"method": "minitron", "reason": reason}
                print(f"[prune] ModelOpt Minitron cannot run here ({reason}); falling back to the every-k layer cut",
                      file=sys.stderr)
        target = target_from_args(args)
        calib_cfg = CalibConfig(prompts=args.calib_prompts, task=args.calib_task, seed=args.calib_seed,
                                response_tokens=args.calib_response_tokens)
        report = _prune(teacher, out, target, method, calib_cfg, args, fallback)
    except PruneError as e:
        return _fail(str(e))
    s = report.student_arch
    print(f"[prune] {report.method}: {report.teacher_arch['num_layers']} -> {s['num_layers']} layers, hidden "
          f"{s['hidden_size']}, ffn {s['ffn_hidden_size']}, heads {s['num_attention_heads']}; "
          f"{report.params_teacher / 1e6:.1f}M -> {report.params_student / 1e6:.1f}M parameters; kept teacher layers "
          f"{report.kept_layers}; {report.seconds.get('total')} s -> {out}")
    return 0


def _prune(teacher: Path, out: Path, target, method: str, calib_cfg, args, fallback):
    from megatron_tropd.distributed import parallel
    from megatron_tropd.models.prune import prune_teacher

    calib, info = [], {}
    if method == "minitron":
        from megatron_tropd.models.prune import PruneError, modelopt_unavailable_reason

        reason = modelopt_unavailable_reason()
        if reason:
            raise PruneError(f"{reason}. Use --method every_k (or --method auto) for the layer cut")
        from megatron_tropd.models.hf_mapping import arch_from_hf_config

        target.check(arch_from_hf_config(teacher))  # fail before the calibration passes
        print(f"[prune] calibration: {calib_cfg.prompts} {calib_cfg.task} prompts + {calib_cfg.response_tokens} "
              f"teacher tokens each", file=sys.stderr)
        calib = calibration_sequences(teacher, calib_cfg)
        info = dict(dataclasses.asdict(calib_cfg), tokens=sum(len(c) for c in calib))
    kwargs = dict(overwrite=args.overwrite, scores_root=args.scores_cache, fallback_from=fallback,
                  log=lambda m: print(f"[prune] {m}", file=sys.stderr))
    if method != "minitron":  # a file-level cut: no model, no process group
        return prune_teacher(teacher, out, target, method, None, **kwargs)
    groups = parallel.initialize(tensor_parallel=1, pipeline_parallel=1)
    try:
        return prune_teacher(teacher, out, target, method, groups, calib, info, **kwargs)
    finally:
        parallel.destroy()


def _resolve(path: str) -> Path:
    from megatron_tropd.models.builtin import default_cache_dir, resolve_model_path
    from megatron_tropd.models.prune import PruneError

    try:
        return resolve_model_path(path, default_cache_dir())
    except (ValueError, FileNotFoundError) as e:
        raise PruneError(f"--teacher: {e}") from e


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2
