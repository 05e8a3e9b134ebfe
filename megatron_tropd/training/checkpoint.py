"""Training checkpoints: atomic, keep-last-N, exact resume.

Layout: `run_dir/checkpoints/step_000012/` with one `rank_00003.pt` per rank (its model shards, optimizer and
scheduler state, RNG states) plus `trainer.json` (step, data sampler state, config digest) and `COMPLETE`.
A checkpoint is written into `step_000012.tmp/` and renamed only after every rank has written its file, so a crash
mid-save leaves the previous checkpoint as the latest complete one; a leftover `.tmp` is ignored and removed.
Resume needs the same TP/PP/DP layout (a per-rank format); to change layout, export with
`megatron_tropd.conversion.megatron_io.save_megatron_checkpoint` (dist_checkpointing) or to HF and start a new run from it.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_tropd.distributed.parallel import ParallelGroups

COMPLETE = "COMPLETE"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _name(step: int) -> str:
    return f"step_{step:06d}"


def rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, student, groups: ParallelGroups, trainer_state: dict,
                    keep_last: int = 2) -> Path:
    """Collective. `student` is a roles.Student; `trainer_state` (JSON-able) is written by rank 0."""
    root = checkpoint_root(run_dir)
    final, tmp = root / _name(step), root / (_name(step) + ".tmp")
    if groups.rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = {
        "model": student.gpt.state_dict(),
        "optimizer": student.optimizer.state_dict(),
        "scheduler": student.scheduler.state_dict(),
        "rng": rng_state(),
        "layout": (groups.tp_size, groups.pp_size, groups.dp_size),
    }
    rank_file = tmp / f"rank_{groups.rank:05d}.pt"
    torch.save(state, rank_file.with_suffix(".part"))
    rank_file.with_suffix(".part").rename(rank_file)
    dist.barrier()
    if groups.rank == 0:
        (tmp / "trainer.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        (tmp / COMPLETE).write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)  # atomic on POSIX: the checkpoint appears complete or not at all
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp") and (p / COMPLETE).exists())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, student, groups: ParallelGroups) -> dict:
    """Restore this rank's model, optimizer, scheduler and RNG; returns trainer.json's contents."""
    rank_file = path / f"rank_{groups.rank:05d}.pt"
    if not rank_file.exists():
        raise FileNotFoundError(f"{rank_file} is missing: the checkpoint {path} was written with another number of "
                                f"ranks; resume with the same TP/PP/DP layout")
    state = torch.load(rank_file, map_location="cpu", weights_only=False)
    layout = (groups.tp_size, groups.pp_size, groups.dp_size)
    if tuple(state["layout"]) != layout:
        raise ValueError(f"checkpoint {path} was saved with (TP, PP, DP) = {tuple(state['layout'])}, this run is "
                         f"{layout}; resume with the same layout")
    student.gpt.load_state_dict(state["model"])
    student.optimizer.load_state_dict(state["optimizer"])
    student.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return json.loads((path / "trainer.json").read_text())
