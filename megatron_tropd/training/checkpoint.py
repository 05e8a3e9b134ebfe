"""Training checkpoints on megatron-core `dist_checkpointing`: atomic, keep-last-N, resumable at another TP/PP/DP.

    run_dir/checkpoints/step_000012/        one checkpoint, published by a rename: complete or absent
        metadata.json, common.pt, *.distcp  megatron-core dist checkpoint (torch_dist): model, optimizer, LR
                                            scheduler, per-rank RNG
        trainer.json                        step, data-sampler state (JSON)
        config.yaml                         the run config that wrote it (checked on resume)
        tropd_checkpoint.json               format and the (TP, PP, DP) layout it was saved at
        COMPLETE                            written last, just before the rename

Everything goes through `sharded_state_dict`, so dist_checkpointing reshards it on load:
- model: `GPTModel.sharded_state_dict()` (TP-sharded tensors, global layer numbers: PP-independent keys);
- optimizer: megatron's `optimizer.sharded_state_dict(model_sharded_state_dict)`: Adam moments keyed by the model's
  tensors; with the distributed optimizer its parameter state (fp32 main weights and moments) in megatron's
  `fully_reshardable` format (model space: gathered to DP rank 0 over the gloo DP group on save, each rank slices
  its DP shard on load), so it too reshards across TP, PP and DP;
- LR scheduler (common state) and RNG (one ShardedObject per (PP, TP, DP) coordinate).
The padded vocabulary depends on TP (`ModelArch.padded_vocab_size`): megatron marks the embedding and output-layer
tensors `allow_shape_mismatch` (their optimizer moments inherit it), so a checkpoint with more padding rows loads
truncated to this run's rows and one with fewer loads zero-filled. Padding rows are excluded by every op.
RNG is restored at the same layout only: per-rank generator states mean nothing at another one, and nothing in a
step draws from them (every random choice is a function of (seed, step, ids); docs/architecture.md).

A crash (or SIGKILL) mid-save leaves `.step_000012.tmp/`, which is never read and is removed by the next save.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_tropd.atomic import fresh_tmp, publish, tmp_sibling
from megatron_tropd.config import ConfigError, save_config, to_dict
from megatron_tropd.distributed import cpu_compat
from megatron_tropd.distributed.parallel import ParallelGroups

log = logging.getLogger("tropd")

COMPLETE = "COMPLETE"
FORMAT = "tropd-dist-v1"
META_FILE = "tropd_checkpoint.json"
TRAINER_FILE = "trainer.json"
CONFIG_FILE = "config.yaml"
# megatron's sharded_state_dict metadata: the distributed optimizer's state in the format that reshards across TP,
# PP and DP, gathered over gloo to DP rank 0 (not all-gathered on every rank's device) on save.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                      "distrib_optim_fully_reshardable_mem_efficient": True, "chained_optim_avoid_prefix": True}
# What a resumed run must share with its checkpoint: what is optimised, on which models and data, sampled how, and
# the optimizer-state format (the distributed optimizer stores fp32 main weights that the plain fp32 one has not).
# Everything else may change on resume: TP/PP/DP layout, sequence parallelism, optimizer hyper-parameters and LR
# schedule, train.steps / save_interval / keep_last, eval, rollout engine, sglang, cluster.
RESUME_MUST_MATCH = (
    "objective", "guidance", "offline", "data", "student.path", "student.megatron_checkpoint", "student.dtype",
    "teacher.path", "teacher.megatron_checkpoint", "teacher.dtype", "rollout.prompts_per_step",
    "rollout.samples_per_prompt", "rollout.temperature", "rollout.top_p", "rollout.max_new_tokens",
    "rollout.stop_token_ids", "train.seed", "parallel.use_distributed_optimizer",
)


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _name(step: int) -> str:
    return f"step_{step:06d}"


def layout(groups: ParallelGroups) -> dict:
    return {"tensor_model_parallel_size": groups.tp_size, "pipeline_model_parallel_size": groups.pp_size,
            "data_parallel_size": groups.dp_size}


# --- RNG -----------------------------------------------------------------------------------------------------------
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


# --- the sharded state dict ----------------------------------------------------------------------------------------
def sharded_state_dict(student, groups: ParallelGroups, is_loading: bool, with_rng: bool = True) -> dict:
    """Model, optimizer, LR scheduler and (`with_rng`) this rank's RNG states as one megatron sharded state dict.
    `student` is a roles.Student."""
    from megatron.core.dist_checkpointing import ShardedObject

    model_sd = student.gpt.sharded_state_dict()
    _prime_adam_state(student.optimizer)  # so that a checkpoint always holds (and a load always fills) the moments
    state = {
        "model": model_sd,
        "optimizer": student.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                          metadata=OPTIMIZER_METADATA),
        "scheduler": student.scheduler.state_dict(),
    }
    if with_rng:
        state["rng"] = ShardedObject("rng_state", rng_state(), (groups.pp_size, groups.tp_size, groups.dp_size),
                                     (groups.pp_rank, groups.tp_rank, groups.dp_rank), replica_id=0)
    return state


# --- save ----------------------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: str | Path, step: int, student, groups: ParallelGroups, trainer_state: dict,
                    keep_last: int = 2, config=None) -> Path:
    """Collective. Write checkpoint `step` into a temporary sibling, publish it by a rename (rank 0), then delete all
    but the newest `keep_last` complete checkpoints. `trainer_state` (JSON-able: the sampler's state) and the run
    config (`config`, else `run_dir/config.yaml`, which `build_run` writes) are stored beside it by rank 0."""
    from megatron.core import dist_checkpointing

    root = checkpoint_root(run_dir)
    final = root / _name(step)
    tmp = tmp_sibling(final)
    if groups.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        fresh_tmp(final)
    dist.barrier()
    try:
        state = sharded_state_dict(student, groups, is_loading=False)
        with cpu_compat.dist_checkpoint_save():
            dist_checkpointing.save(state, str(tmp))  # ends with a barrier: every rank has written its shards
        if groups.rank == 0:
            (tmp / TRAINER_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=1))
            (tmp / META_FILE).write_text(json.dumps({"format": FORMAT, "step": step, "layout": layout(groups)},
                                                    indent=1))
            if config is not None:
                save_config(config, tmp / CONFIG_FILE)
            elif (Path(run_dir) / CONFIG_FILE).is_file():
                shutil.copy2(Path(run_dir) / CONFIG_FILE, tmp / CONFIG_FILE)
            (tmp / COMPLETE).write_text("ok\n")
            publish(tmp, final, overwrite=True)
            for old in complete_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            for stale in root.glob(".step_*"):  # temp dirs of saves that were interrupted
                shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        if groups.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return final


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / COMPLETE).exists())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


# --- resume checks -------------------------------------------------------------------------------------------------
def read_checkpoint_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        what = ("it is in the per-rank format (rank_*.pt) of tropd before dist_checkpointing"
                if list(path.glob("rank_*.pt")) else "it is not a tropd training checkpoint")
        raise ConfigError(f"cannot resume from {path}: no {META_FILE}, {what}; start a new train.run_dir")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(f"cannot resume from {path}: {META_FILE} has format {meta.get('format')!r}, this "
                          f"tropd reads {FORMAT!r}; start a new train.run_dir")
    return meta


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _same(a, b) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()  # the same file or directory, spelled differently
    return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)


def config_differences(saved: dict, cfg) -> list[str]:
    """`key: saved -> current` for every RESUME_MUST_MATCH key that differs between a checkpoint's config (as a
    dict) and `cfg` (a config.Config)."""
    old, new = _flatten(saved), _flatten(to_dict(cfg))
    keys = sorted(k for k in set(old) | set(new) if any(k == m or k.startswith(m + ".") for m in RESUME_MUST_MATCH))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if not _same(old.get(k), new.get(k))]


def check_resume_config(path: str | Path, cfg) -> None:
    """Raise ConfigError (one line naming the keys) if `cfg` changes the objective, models, data or sampling of
    the run that wrote checkpoint `path`. Layout, optimizer and schedule changes are allowed."""
    import yaml

    path = Path(path)
    read_checkpoint_meta(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise ConfigError(f"cannot resume from {path}: it has no {CONFIG_FILE} to check this run's config against; "
                          f"start a new train.run_dir")
    diffs = config_differences(yaml.safe_load(cfg_file.read_text()) or {}, cfg)
    if diffs:
        raise ConfigError(f"cannot resume from {path}: this run changes {'; '.join(diffs)} (checkpoint -> this "
                          f"run); resume with the checkpoint's values (its {CONFIG_FILE}) or start a new "
                          f"train.run_dir (the TP/PP/DP layout, optim, train steps/intervals, eval, engine and "
                          f"cluster settings may change on resume)")


# --- load ----------------------------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path, student, groups: ParallelGroups) -> dict:
    """Collective. Restore the model, the optimizer (moments; with the distributed optimizer its fp32 main weights),
    the scheduler's step and, at the same layout, RNG from checkpoint `path`, resharded to this run's TP/PP/DP.
    The optimizer hyper-parameters and LR schedule stay this run's (a resumed run may change them).
    Returns trainer.json's contents."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    meta = read_checkpoint_meta(path)
    same_layout = meta["layout"] == layout(groups)
    hyper = _hyperparameters(student.optimizer)
    request = sharded_state_dict(student, groups, is_loading=True, with_rng=same_layout)
    loaded = dist_checkpointing.load(request, str(path))
    student.gpt.load_state_dict(loaded["model"])
    _add_zero_common_step(loaded["optimizer"])
    with _fill_missing_adam_state(student.optimizer):
        student.optimizer.load_state_dict(loaded["optimizer"])
    _unshare_adam_steps(student.optimizer)
    _set_hyperparameters(student.optimizer, hyper)
    _restore_scheduler(student.scheduler, loaded["scheduler"], groups)
    if same_layout:
        set_rng_state(loaded["rng"])
    elif groups.rank == 0:
        log.info(f"{path}: saved at (TP, PP, DP) = {tuple(meta['layout'].values())}, resumed at "
                 f"{tuple(layout(groups).values())}: model and optimizer resharded, RNG states not restored")
    return json.loads((path / TRAINER_FILE).read_text())


def _inner_optimizers(optimizer) -> list:
    """megatron's optimizers inside a ChainedOptimizer (or the optimizer itself)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _prime_adam_state(optimizer) -> None:
    """Give a torch Adam(W) inside megatron's optimizers that has not stepped yet its state tensors (zeros, step 0),
    exactly what its first step would start from: the checkpoint then has the same keys before and after the first
    update, and the distributed optimizer's `state_dict()`, which its `sharded_state_dict` calls, finds a `step` in
    every state. On load every value is overwritten."""
    for opt in _inner_optimizers(optimizer):
        inner = opt.optimizer
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue  # TE / apex FusedAdam keep their step in the param groups
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                          exp_avg_sq=torch.zeros_like(p))


@contextlib.contextmanager
def _fill_missing_adam_state(optimizer):
    """megatron-core 0.16.1's DistributedOptimizer with torch's AdamW (no Transformer Engine / apex: on CPU and on a
    GPU without them) fails to load its `fully_reshardable` parameter state with KeyError 'step': it copies every key
    of the torch optimizer state, `step` included, from the checkpoint's per-parameter tensors, which never carry
    `step` (restored from the param groups just before). During the load a key the checkpoint lacks keeps its
    current value."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = [opt for opt in _inner_optimizers(optimizer) if isinstance(opt, DistributedOptimizer)]
    for opt in patched:
        original = opt._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, opt=opt, original=original):
            return original(model_param, {**opt._get_main_param_and_optimizer_states(model_param), **tensors})

        opt._set_main_param_and_optimizer_states = set_states  # an instance attribute over the class method
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states


def _add_zero_common_step(loaded) -> None:
    """megatron-core 0.16.1's non-distributed optimizers store their common Adam step only when it is non-zero
    (`if step:` in `sharded_state_dict`): a checkpoint taken before the first update restores moments without a
    `step`, which torch's Adam refuses to load. Such a state gets step 0 back."""
    if not isinstance(loaded, dict):
        return
    state = loaded.get("state")
    if "param_groups" in loaded and isinstance(state, dict) and "common_step" not in state and any(
            isinstance(v, dict) and "exp_avg" in v and "step" not in v for v in state.values()):
        state["common_step"] = torch.tensor(0.0)
    for value in loaded.values():
        _add_zero_common_step(value)


def _unshare_adam_steps(optimizer) -> None:
    """megatron-core 0.16.1's DistributedOptimizer.load_state_dict gives every parameter's torch-Adam state the same
    `step` tensor; torch's AdamW increments each parameter's step in place, so a shared counter would advance once
    per parameter per step and corrupt the bias correction from the first resumed step on. Each gets its own."""
    for opt in _inner_optimizers(optimizer):
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


_RESTORED = ("params", "step")  # param-group entries that come from the checkpoint; the rest is this run's config


def _hyperparameters(optimizer) -> list[list[dict]]:
    return [[{k: v for k, v in g.items() if k not in _RESTORED} for g in opt.optimizer.param_groups]
            for opt in _inner_optimizers(optimizer)]


def _set_hyperparameters(optimizer, hyper: list[list[dict]]) -> None:
    for opt, groups in zip(_inner_optimizers(optimizer), hyper):
        for group, values in zip(opt.optimizer.param_groups, groups):
            group.update(values)


def _restore_scheduler(scheduler, saved: dict, groups: ParallelGroups) -> None:
    """Continue the LR schedule at the saved step count, with this run's schedule settings."""
    changed = {k: (saved.get(k), v) for k, v in scheduler.state_dict().items()
               if k != "num_steps" and saved.get(k) != v}
    if changed and groups.rank == 0:
        log.info("LR schedule changed on resume (checkpoint -> this run): "
                 + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    scheduler.step(increment=saved["num_steps"] - scheduler.num_steps)
