"""`tropd train`: parse the config, the Megatron-style flags and the overrides, then run `loop.train`."""
from __future__ import annotations

import argparse
import logging
import sys

# Megatron-style flags: shorthands for config keys (flag, key, type)
MEGATRON_FLAGS = (
    ("--tensor-model-parallel-size", "parallel.tensor_model_parallel_size", int),
    ("--pipeline-model-parallel-size", "parallel.pipeline_model_parallel_size", int),
    ("--sequence-parallel", "parallel.sequence_parallel", bool),
    ("--use-distributed-optimizer", "parallel.use_distributed_optimizer", bool),
    ("--micro-batch-size", "optim.micro_batch_size", int),
    ("--lr", "optim.lr", float),
    ("--clip-grad", "optim.clip_grad", float),
    ("--train-iters", "train.steps", int),
    ("--save-interval", "train.save_interval", int),
    ("--seed", "train.seed", int),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML run config (see docs/configuration.md)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in run_dir")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=20")
    megatron = p.add_argument_group("Megatron-style flags (shorthands for the config keys named in brackets)")
    for flag, key, kind in MEGATRON_FLAGS:
        dest, help_text = key.replace(".", "__"), f"[{key}]"
        if kind is bool:
            megatron.add_argument(flag, dest=dest, action="store_true", default=None, help=help_text)
        else:
            megatron.add_argument(flag, dest=dest, type=kind, default=None, metavar="N", help=help_text)


def flag_overrides(args) -> list[str]:
    out = []
    for _, key, _ in MEGATRON_FLAGS:
        value = getattr(args, key.replace(".", "__"), None)
        if value is not None:
            out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


def run(args) -> int:
    """Exit status 0 on success, 2 for bad input: one line `tropd train: <message>` naming the key, the value and
    the fix, no traceback (the start-up checks of training/preflight.py run before any model is built)."""
    from megatron_tropd.config import ConfigError, load_config
    from megatron_tropd.data import DataError
    from megatron_tropd.training.loop import train

    try:
        overrides = flag_overrides(args) + list(args.overrides) + (["train.resume=true"] if args.resume else [])
        cfg = load_config(args.config, overrides)
        finished = check_resume(cfg)
        if finished is not None:  # --resume of a run that already completed: its summary, nothing retrained
            print(finished, flush=True)
            return 0
        quiet_libraries()
        summary = train(cfg)
    except (ConfigError, DataError) as e:
        print(f"tropd train: {e}", file=sys.stderr, flush=True)
        return 2
    return 0 if summary is not None else 1


def check_resume(cfg) -> str | None:
    """With train.resume, refuse a config that changes the objective, models or data of the checkpoint's run
    before any model loads (`training.checkpoint.check_resume_config`; `build_run` checks again). A run whose last
    checkpoint is its final step and whose summary.json was written is complete: returns the summary's text (so a
    pipeline can rerun a finished stage for free), else None."""
    if not cfg.train.resume:
        return None
    import json
    from pathlib import Path

    from megatron_tropd.training.checkpoint import check_resume_config, latest_checkpoint, read_checkpoint_meta
    from megatron_tropd.training.loop import summary_text

    ckpt = latest_checkpoint(cfg.train.run_dir)
    if ckpt is None:
        return None
    check_resume_config(ckpt, cfg)
    summary_file = Path(cfg.train.run_dir) / "summary.json"
    if read_checkpoint_meta(ckpt).get("step") == cfg.train.steps - 1 and summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        return f"tropd train: {cfg.train.run_dir} is complete ({ckpt.name}); nothing to resume" + \
            summary_text(summary, Path(cfg.train.run_dir))
    return None


def quiet_libraries() -> None:
    """Our progress and metrics on stdout; megatron's config dumps, HF progress bars and fallback warnings off."""
    import warnings

    logging.basicConfig(level=logging.INFO, format="[tropd] %(message)s")
    for name in ("megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
