"""`tropd`: the command-line entry point. Each subcommand lives in its own module and is imported lazily,
so `tropd --help` works without importing torch or megatron-core."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with `add_arguments(parser)` and `run(args)`, one-line help)
SUBCOMMANDS = {
    "train": ("megatron_tropd.training.cli", "run on-policy distillation from a YAML config (+ key=value overrides)"),
    "eval": ("megatron_tropd.evaluation.cli", "benchmark accuracy (avg@k / pass@k) through a rollout engine"),
    "plot": ("megatron_tropd.training.plot", "write PNG curves of a run's metrics, or several runs overlaid"),
    "plan": ("megatron_tropd.cluster.plan", "per-GPU memory estimate and smallest layouts that fit"),
    "launch": ("megatron_tropd.cluster.launch", "resolve a config against SLURM/local and print (or run) the commands"),
    "prune": ("megatron_tropd.models.prune_cli",
              "make a student from a teacher: ModelOpt Minitron pruning (depth / width) or an every-k layer cut"),
    "smoke": ("megatron_tropd.distributed.smoke", "a tiny TP/PP forward-backward on CPU to check an installation"),
}


def build_parser(load_subcommands: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tropd", description="megatron-tropd: Trust Region On-Policy Distillation on megatron-core"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if load_subcommands:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as e:
                if e.name and e.name.startswith("megatron_tropd"):
                    p.set_defaults(_missing=str(e))
                    continue
                raise
            module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Top-level help needs no subcommand modules (and so no torch import).
    only_help = not argv or argv[0] in ("-h", "--help")
    parser = build_parser(load_subcommands=not only_help)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "_missing", None):
        parser.error(f"'{args.command}' is not available in this build: {args._missing}")
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
