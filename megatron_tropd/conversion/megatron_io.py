"""megatron-core distributed checkpoints of a GPTModel (`dist_checkpointing`), loadable at another TP/PP, with the
architecture (`tropd_arch.json`) and the source HF config/tokenizer (`hf/`) stored beside them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from megatron_tropd.atomic import fresh_tmp, publish, tmp_sibling
from megatron_tropd.conversion.hf_io import copy_tokenizer
from megatron_tropd.distributed import cpu_compat
from megatron_tropd.models.arch import ModelArch
from megatron_tropd.models.hf_mapping import ARCH_FILE, HF_SUBDIR, arch_from_json, arch_to_json


def save_megatron_checkpoint(model, ckpt_dir: str | Path, groups, arch: ModelArch | None = None,
                             hf_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Save `model` as a megatron-core distributed checkpoint (`dist_checkpointing.save` of
    `model.sharded_state_dict()`), plus `tropd_arch.json` and the HF config/tokenizer (`hf/`) when given.
    Written into a temp sibling directory and renamed by rank 0 when every rank has finished. Collective."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    tmp = tmp_sibling(ckpt_dir)
    if groups.rank == 0:
        if ckpt_dir.exists() and not overwrite:
            raise FileExistsError(f"{ckpt_dir} exists; remove it or pass overwrite=True")
        fresh_tmp(ckpt_dir)
    dist.barrier()
    try:
        with cpu_compat.dist_checkpoint_save():
            dist_checkpointing.save(model.sharded_state_dict(), str(tmp))
        if groups.rank == 0:
            meta = {"tensor_model_parallel_size": groups.tp_size, "pipeline_model_parallel_size": groups.pp_size,
                    "padded_vocab_size": arch.padded_vocab_size(groups.tp_size) if arch else None}
            (tmp / "tropd_meta.json").write_text(json.dumps(meta, indent=2))
            if arch is not None:
                (tmp / ARCH_FILE).write_text(arch_to_json(arch))
            if hf_dir is not None:
                (tmp / HF_SUBDIR).mkdir()
                shutil.copy2(Path(hf_dir) / "config.json", tmp / HF_SUBDIR / "config.json")
                copy_tokenizer(hf_dir, tmp / HF_SUBDIR)
        dist.barrier()
        if groups.rank == 0:
            publish(tmp, ckpt_dir, overwrite)
    except BaseException:
        if groups.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return ckpt_dir


def load_megatron_checkpoint(model, ckpt_dir: str | Path, groups) -> None:
    """Load a megatron-core dist checkpoint (written by `save_megatron_checkpoint` or a training checkpoint of
    `training.checkpoint`) saved at any TP/PP into `model` (built for this run's TP/PP). Collective.

    The padded vocabulary depends on TP (and on `ModelArch.pad_vocab_to`), so the saved embedding / output-layer
    row count may differ from this model's. megatron marks those two tensors `allow_shape_mismatch`: each rank reads
    the saved rows that overlap its own shard and zero-fills rows past the saved ones (only padding rows differ:
    ids >= the real vocabulary). Every shard keeps megatron's own replica id, so exactly one rank is the main
    replica of each piece (reading the whole tensor on every TP rank with one replica id is an invalid access
    pattern for dist_checkpointing)."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "metadata.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a megatron distributed checkpoint (no metadata.json)")
    # A model on a layout of its own (parallel.build_groups: an own-layout teacher) takes its replica ids from its
    # own DP group, not megatron's global one (else some shards have no main replica).
    explicit = getattr(groups, "collection", None) is not None
    request = model.sharded_state_dict(metadata={"dp_cp_group": groups.dp}) if explicit else model.sharded_state_dict()
    loaded = dist_checkpointing.load(request, str(ckpt_dir))
    # only the model's entries: a training checkpoint also has optimizer and scheduler (common) state
    missing, unexpected = model.load_state_dict({k: v for k, v in loaded.items() if k in request}, strict=False)
    missing = [m for m in missing if not m.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"checkpoint {ckpt_dir} does not match the model: missing {missing[:4]}, "
                       f"unexpected {unexpected[:4]}")


def read_checkpoint_info(ckpt_dir: str | Path) -> tuple[ModelArch, dict, dict | None]:
    """(ModelArch, tropd_meta, HF config or None) stored beside a megatron checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / ARCH_FILE).is_file():
        raise FileNotFoundError(f"{ckpt_dir} lacks {ARCH_FILE}: not written by tools/convert_hf_to_megatron.py "
                                f"(or save_megatron_checkpoint(arch=...))")
    arch = arch_from_json((ckpt_dir / ARCH_FILE).read_text())
    meta_file = ckpt_dir / "tropd_meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    cfg_file = ckpt_dir / HF_SUBDIR / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else None
    return arch, meta, cfg
