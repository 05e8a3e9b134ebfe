"""Measure what a piece of code allocates, on CPU or GPU, from the allocator's own events (torch.profiler).

    result, stats = profile_allocations(lambda: distill_step(...))
    stats.peak_bytes          # highest running total of bytes allocated inside the window
    stats.largest_bytes       # the single largest allocation inside the window

Tensors allocated before the window (inputs, weights) are not counted; frees of them inside the window can make the
running total negative, which is why `peak_bytes` is a maximum over the window and never below 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class AllocationStats:
    peak_bytes: int
    largest_bytes: int
    allocations: int


def profile_allocations(fn: Callable[[], Any]) -> tuple[Any, AllocationStats]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    running = peak = largest = count = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
        if nbytes > 0:
            largest = max(largest, nbytes)
            count += 1
    return result, AllocationStats(peak, largest, count)
