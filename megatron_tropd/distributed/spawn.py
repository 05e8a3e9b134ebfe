"""Run a function on N ranks (spawned processes, gloo) for tests and CPU benchmarks.

    results = run_distributed(fn, world_size=4, tp=2, pp=2, args=(batch,))

`fn(groups, *args, **kwargs)` runs on every rank after `parallel.initialize(tp, pp)` (DP = world / (TP*PP));
its return values come back in rank order. A rank that raises makes the call raise `DistributedTestError`
with that rank's traceback; the other ranks are killed at once (they would hang in a collective). A run that
exceeds `timeout` is killed and reported with the ranks that had not finished. No process outlives the call.
`fn` must be importable by name (module level). Ranks are forked from a "forkserver" that has only imported
torch and megatron-core (never run a parallel region), so starting N ranks costs a fork, not N imports, and
avoids forking a process whose OpenMP thread pool is live (which can deadlock).
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue as queue_mod
import time
import traceback
import warnings
from typing import Any, Callable

import torch


class DistributedTestError(AssertionError):
    pass


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _worker(rank, world_size, port, tp, pp, threads, fn, args, kwargs, results):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from megatron_tropd.distributed import parallel

    try:
        groups = parallel.initialize(tensor_parallel=tp, pipeline_parallel=pp, timeout_minutes=5)
        out = fn(groups, *args, **kwargs)
        results.put((rank, "ok", _dumps(out)))
    except BaseException:  # noqa: BLE001 - everything is reported to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            parallel.destroy()
        except Exception:  # noqa: BLE001
            pass


_PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.core.models.gpt",
            "megatron.core.pipeline_parallel", "megatron_tropd.distributed.parallel", "megatron_tropd.models.gpt"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *,
    tp: int = 1,
    pp: int = 1,
    args: tuple = (),
    kwargs: dict | None = None,
    timeout: float = 300.0,
) -> list[Any]:
    """Run `fn(groups, *args, **kwargs)` on `world_size` gloo ranks; return the per-rank results."""
    if world_size % (tp * pp):
        raise ValueError(f"world_size {world_size} must be a multiple of tp*pp = {tp * pp}")
    from megatron_tropd.distributed.parallel import find_free_port

    ctx = _context()
    results = ctx.Queue()
    port = find_free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, port, tp, pp, threads, fn, args, kwargs or {}, results),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - outputs.keys())
                raise DistributedTestError(
                    f"{getattr(fn, '__name__', fn)} timed out after {timeout:.0f}s; ranks {missing} did not finish"
                )
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outputs]
                if dead and all(procs[r].exitcode not in (None, 0) for r in dead):
                    # A rank died without reporting (segfault, OOM kill): give its queue a moment, then fail.
                    try:
                        rank, status, payload = results.get(timeout=2.0)
                    except queue_mod.Empty:
                        codes = {r: procs[r].exitcode for r in dead}
                        raise DistributedTestError(f"ranks died without a report, exit codes {codes}")
                else:
                    continue
            if status == "error":
                raise DistributedTestError(f"rank {rank} of {world_size} (tp={tp}, pp={pp}) failed:\n{payload}")
            outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5 if len(outputs) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return [outputs[r] for r in range(world_size)]
