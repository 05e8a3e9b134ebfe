"""Process-group set-up: torch.distributed + megatron-core parallel state, on GPU (NCCL) or CPU (gloo).

`initialize()` is the only place that touches megatron-core's global `parallel_state`. It returns a
`ParallelGroups` value that library code receives explicitly (tp / pp / dp groups and ranks), so no other
module reads hidden globals. `build_groups()` makes a second, independent layout over the same ranks (a teacher
at its own TP/PP beside the student): its groups travel in `ParallelGroups.collection`, a megatron-core
`ProcessGroupCollection` that the model constructors and schedules take instead of the globals.

Rank order is megatron-core's default "tp-cp-ep-dp-pp": TP ranks are adjacent, then DP, then PP.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

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
    # Explicit megatron-core ProcessGroupCollection of a layout built by `build_groups` (None: the global
    # parallel_state of `initialize`, which megatron-core reads by default).
    collection: object | None = field(default=None, compare=False, repr=False)

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
        if self.collection is not None:
            return self.collection
        from megatron.core.process_groups_config import ProcessGroupCollection

        return ProcessGroupCollection.use_mpu_process_groups()

    def same_layout(self, other: "ParallelGroups") -> bool:
        return (self.tp_size, self.pp_size) == (other.tp_size, other.pp_size)


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


def layout_coords(rank: int, tp: int, pp: int, world: int) -> tuple[int, int, int]:
    """(tp_rank, dp_rank, pp_rank) of a global rank in megatron-core's default order tp-cp-ep-dp-pp (cp = ep = 1):
    rank = tp_rank + tp * (dp_rank + dp * pp_rank)."""
    dp = world // (tp * pp)
    return rank % tp, (rank // tp) % dp, rank // (tp * dp)


def build_groups(tensor_parallel: int, pipeline_parallel: int) -> ParallelGroups:
    """Process groups of a second layout (TP x PP, DP = world / (TP * PP)) over all ranks, in megatron-core's rank
    order, without touching the global parallel_state: for a model that shares the ranks with the student but not
    its layout (time-shared, e.g. a teacher at TP4 x DP2 beside a TP1 x DP8 student).

    Collective: every rank calls it with the same sizes (each `new_group` is created by all ranks in the same
    order). Context parallelism and experts are not used (cp = ep = 1)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    tp, pp = tensor_parallel, pipeline_parallel
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ValueError(f"a TP={tp} x PP={pp} layout does not divide the {world} ranks; choose sizes whose "
                         f"product divides the world size")
    dp = world // (tp * pp)

    def at(t: int, d: int, p: int) -> int:
        return t + tp * (d + dp * p)

    def new(rank_lists: list[list[int]]) -> dist.ProcessGroup:
        mine = None
        for ranks in rank_lists:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine = group
        return mine

    tp_g = new([[at(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)])
    dp_g = new([[at(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)])
    pp_lists = [[at(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)]
    pp_g = new(pp_lists)
    mp_g = new([[at(t, d, p) for p in range(pp) for t in range(tp)] for d in range(dp)])
    # megatron's default embedding ranks: first and last stage (tied embeddings are all-reduced between them)
    embd_g = new([sorted({r[0], r[-1]}) for r in pp_lists])
    pos_g = new([[r[0]] for r in pp_lists])
    cp_g = new([[r] for r in range(world)])
    collection = ProcessGroupCollection(tp=tp_g, pp=pp_g, mp=mp_g, embd=embd_g, pos_embd=pos_g, cp=cp_g,
                                        tp_cp=tp_g, dp=dp_g, dp_cp=dp_g)
    t, d, p = layout_coords(rank, tp, pp, world)
    return ParallelGroups(tp=tp_g, pp=pp_g, dp=dp_g, tp_size=tp, tp_rank=t, pp_size=pp, pp_rank=p, dp_size=dp,
                          dp_rank=d, world_size=world, rank=rank, collection=collection)


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
