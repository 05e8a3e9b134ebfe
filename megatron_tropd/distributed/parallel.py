"""Process-group set-up: torch.distributed + megatron-core parallel state, on GPU (NCCL) or CPU (gloo).

`initialize()` is the only place that touches megatron-core's global `parallel_state`. It returns a
`ParallelGroups` value that library code receives explicitly (tp / pp / dp groups and ranks), so no other
module reads hidden globals.

Rank order is megatron-core's default "tp-cp-ep-dp-pp": TP ranks are adjacent, then DP, then PP.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups and this rank's coordinates in them."""

    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    dp: dist.ProcessGroup
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    dp_size: int
    dp_rank: int
    world_size: int
    rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def pg_collection(self):
        """megatron-core's ProcessGroupCollection for model constructors (GPTModel(pg_collection=...))."""
        from megatron.core.process_groups_config import ProcessGroupCollection

        return ProcessGroupCollection.use_mpu_process_groups()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def initialize(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    backend: str | None = None,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> ParallelGroups:
    """Initialise torch.distributed from the launcher environment and megatron-core's parallel state.

    Reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (torchrun, or set by `srun` wrappers); a single
    process without them runs as world size 1 on a free local port. Chooses NCCL when CUDA is available,
    gloo otherwise (and then patches megatron-core's CUDA-only spots, see `cpu_compat`).
    Data parallel size = world / (TP * PP).
    """
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if not dist.is_initialized():
        rank = _env_int("RANK", 0)
        world = _env_int("WORLD_SIZE", 1)
        if "MASTER_ADDR" not in os.environ:
            if world > 1:
                raise RuntimeError(
                    "WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun "
                    "(or export MASTER_ADDR and MASTER_PORT)"
                )
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ.setdefault("MASTER_PORT", str(find_free_port()))
        if cuda:
            torch.cuda.set_device(_env_int("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel) != 0:
        raise ValueError(
            f"world size {world} is not divisible by tensor_parallel ({tensor_parallel}) x "
            f"pipeline_parallel ({pipeline_parallel}); choose sizes whose product divides the number of ranks"
        )
    if not cuda:
        from megatron_tropd.distributed import cpu_compat

        cpu_compat.apply()

    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=True,  # the optimizer asks for the gloo DP groups even on CPU
    )
    from megatron_tropd.distributed.cpu_compat import model_parallel_manual_seed

    model_parallel_manual_seed(seed)
    return current_groups()


def current_groups() -> ParallelGroups:
    """The ParallelGroups of an initialised megatron-core parallel state."""
    from megatron.core import parallel_state as ps

    return ParallelGroups(
        tp=ps.get_tensor_model_parallel_group(),
        pp=ps.get_pipeline_model_parallel_group(),
        dp=ps.get_data_parallel_group(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
    )


def destroy() -> None:
    """Tear down megatron-core's parallel state and the default process group."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def find_free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
