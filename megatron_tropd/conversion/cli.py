"""The work behind `tools/convert_hf_to_megatron.py` and `tools/convert_megatron_to_hf.py`.

Validation (`validate_*`) runs in the launching process before any rank starts. The per-rank functions
(`hf_to_megatron_rank`, `megatron_to_hf_rank`) take `groups` first and are the same on CPU (spawned gloo ranks via
`run_distributed`) and under torchrun on a GPU cluster (`run` detects the launcher environment).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from megatron_tropd.conversion import hf_io, megatron_io
from megatron_tropd.models import hf_mapping as hf
from megatron_tropd.models.arch import check_layout
from megatron_tropd.models.arch import ModelArch


def log(msg: str) -> None:
    print(f"[convert] {msg}", flush=True)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ValueError(f"output {out} already exists; remove it or pass --overwrite")
    if not out.parent.exists():
        raise ValueError(f"parent directory of the output {out.parent} does not exist")


def validate_hf_to_megatron(hf_dir: Path, out: Path, tp: int, pp: int, overwrite: bool = False) -> ModelArch:
    if not hf_dir.is_dir():
        raise ValueError(f"--hf-dir {hf_dir} does not exist or is not a directory")
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"--hf-dir {hf_dir} has no config.json (expected an HF checkpoint directory)")
    if not list(hf_dir.glob("*.safetensors")):
        raise ValueError(f"--hf-dir {hf_dir} has no *.safetensors files (convert .bin checkpoints to safetensors)")
    arch = hf.arch_from_hf_config(hf_dir)
    check_layout(arch, tp, pp)
    _check_out(out, overwrite)
    return arch


def validate_megatron_to_hf(megatron_dir: Path, out: Path, tp: int | None, pp: int | None,
                            overwrite: bool = False) -> tuple[ModelArch, dict, dict | None, int, int]:
    if not megatron_dir.is_dir():
        raise ValueError(f"--megatron-dir {megatron_dir} does not exist or is not a directory")
    if not (megatron_dir / "metadata.json").is_file():
        raise ValueError(f"--megatron-dir {megatron_dir} is not a megatron distributed checkpoint (no metadata.json)")
    try:
        arch, meta, cfg = megatron_io.read_checkpoint_info(megatron_dir)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    tp = tp or 1
    pp = pp or 1
    check_layout(arch, tp, pp)
    _check_out(out, overwrite)
    return arch, meta, cfg, tp, pp


def hf_to_megatron_rank(groups, hf_dir: str, out: str, arch: ModelArch, overwrite: bool = False) -> bool:
    from megatron_tropd.models.gpt import build_gpt_model

    model = build_gpt_model(arch, groups)
    if groups.rank == 0:
        log(f"built model tp={groups.tp_size} pp={groups.pp_size}; loading {hf_dir}")
    hf_io.load_hf_checkpoint_into_model(model, hf_dir, arch, groups)
    if groups.rank == 0:
        log(f"saving megatron distributed checkpoint to {out}")
    megatron_io.save_megatron_checkpoint(model, out, groups, arch=arch, hf_dir=hf_dir, overwrite=overwrite)
    return True


def megatron_to_hf_rank(groups, megatron_dir: str, out: str, arch: ModelArch, hf_config: dict | None,
                        overwrite: bool = False, max_shard_bytes: int = 4 << 30) -> bool:
    from megatron_tropd.models.gpt import build_gpt_model

    model = build_gpt_model(arch, groups)
    if groups.rank == 0:
        log(f"built model tp={groups.tp_size} pp={groups.pp_size}; loading {megatron_dir}")
    megatron_io.load_megatron_checkpoint(model, megatron_dir, groups)
    tok_dir = Path(megatron_dir) / hf.HF_SUBDIR
    hf_io.export_hf_checkpoint(model, groups, arch, out, tokenizer_dir=tok_dir if tok_dir.is_dir() else None,
                            hf_config=hf_config, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                            progress=log if groups.rank == 0 else None)
    return True


def run(fn, tp: int, pp: int, args: tuple) -> None:
    """Run `fn(groups, *args)` on TP*PP ranks: in this torchrun-launched process when WORLD_SIZE is set,
    else on spawned local gloo ranks."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        from megatron_tropd.distributed import parallel

        groups = parallel.initialize(tensor_parallel=tp, pipeline_parallel=pp)
        try:
            fn(groups, *args)
        finally:
            parallel.destroy()
        return
    from megatron_tropd.distributed.spawn import run_distributed

    run_distributed(fn, tp * pp, tp=tp, pp=pp, args=args, timeout=float(os.environ.get("TROPD_CONVERT_TIMEOUT",
                                                                                        3600)))


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)
