"""Foundation: package import without GPU extras, CLI, launcher-env initialisation and the harness itself."""
import os
import subprocess
import sys

import pytest
import torch

from megatron_tropd.distributed.spawn import DistributedTestError, run_distributed


def test_import_without_gpu_extras():
    code = ("import sys, megatron_tropd, megatron_tropd.distributed.parallel, megatron_tropd.models; "
            "bad = [m for m in ('transformer_engine', 'apex', 'sgl_kernel') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "megatron_tropd.cli", "--help"], check=True,
                         capture_output=True, text=True).stdout
    for cmd in ("train", "eval", "plan", "launch", "plot"):
        assert cmd in out


def _coords(groups):
    import torch.distributed as dist

    x = torch.tensor([float(groups.rank)])
    dist.all_reduce(x, group=groups.tp)
    return (groups.tp_size, groups.pp_size, groups.dp_size, groups.tp_rank, groups.pp_rank, groups.dp_rank,
            x.item(), dist.get_backend())


def test_initialize_layouts_tp_pp_dp():
    out = run_distributed(_coords, 8, tp=2, pp=2)
    assert {o[:3] for o in out} == {(2, 2, 2)}
    assert all(o[7] == "gloo" for o in out)
    # megatron's default order tp-cp-ep-dp-pp: TP pairs are adjacent ranks (0,1), (2,3), ...
    assert [o[6] for o in out] == [1, 1, 5, 5, 9, 9, 13, 13]
    assert sorted((o[3], o[4], o[5]) for o in out) == sorted(
        (t, p, d) for t in range(2) for p in range(2) for d in range(2))


def _rng_differs_per_tp_rank(groups):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        inside = torch.rand(4)
    outside = torch.rand(4)
    return inside, outside


def test_model_parallel_rng_differs_across_tp_but_not_dp():
    out = run_distributed(_rng_differs_per_tp_rank, 4, tp=2)
    # ranks 0,1 = TP pair in DP replica 0; ranks 2,3 = same TP ranks in DP replica 1
    assert not torch.equal(out[0][0], out[1][0])  # tensor-parallel region: different dropout per TP rank
    assert torch.equal(out[0][0], out[2][0])  # same TP rank in another DP replica: same
    assert torch.equal(out[0][1], out[1][1])  # default state: same across the TP group


def _raise_on_rank_one(groups):
    if groups.rank == 1:
        raise ValueError("boom from rank one")
    import torch.distributed as dist

    dist.barrier()  # rank 0 would hang here forever without the harness killing it


def test_harness_reports_failing_rank_and_kills_the_rest():
    with pytest.raises(DistributedTestError, match="(?s)rank 1 of 2.*boom from rank one"):
        run_distributed(_raise_on_rank_one, 2, timeout=60)


def _sleep(groups):
    import time

    time.sleep(60)


def test_harness_timeout():
    with pytest.raises(DistributedTestError, match="timed out"):
        run_distributed(_sleep, 2, timeout=3)


def test_initialize_rejects_bad_layout():
    with pytest.raises(DistributedTestError, match="not divisible by tensor_parallel"):
        run_distributed(_reinit, 2, kwargs={"tp": 4})


def _reinit(groups, tp=1):
    from megatron_tropd.distributed import parallel

    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()  # keep the process group, re-ask for an impossible layout
    parallel.initialize(tensor_parallel=tp)


def test_single_process_initialize_without_launcher_env():
    code = ("from megatron_tropd.distributed import parallel; g = parallel.initialize(); "
            "assert (g.tp_size, g.pp_size, g.dp_size, g.world_size) == (1, 1, 1, 1); parallel.destroy()")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
