"""Overlapped rollouts (`rollout.overlap`): the next step's rollouts are generated while this step trains.

    main thread, step n                                  generation thread (global rank 0 only)
    take step n's rollouts (prefetched during step n-1)
    draw step n+1's prompts, submit them          --->   generate step n+1 with the engine at version n
    train on step n
    finish(): wait for the thread, broadcast      <---   step n+1's rollouts (or the exception that stopped it)
    sync the weights into the engine (version n+1)       (idle: the engine is never synced while it generates)

One step ahead, never more (a queue of depth 1): the rollouts of step n+1 come from the weights of version n, so
they are one version old when step n+1 trains on them. Everything stays in step order: prompts are drawn from the
run's sampler in the main thread, sample seeds come from the step's request ids, so runs with the same seed give the
same metrics whatever the thread timing. Collectives (the broadcast of the rollouts) run in the main thread only.

Checkpoints: a checkpoint after step n stores the sampler state from before step n+1's prompts were drawn plus the
prefetched rollouts of step n+1 (rank 0, JSON), so a resumed run re-draws the same prompts and trains step n+1 on
the same one-version-old samples as the uninterrupted run (the weights that generated them are not in the
checkpoint). Ownership: the `Run` owns the sampler and the engines; this object owns the thread and the one pending
step, and is closed by `Run.close()` (the thread is joined, never left running).
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Callable

import torch.distributed as dist

from megatron_tropd.rollout.base import Sample


@dataclass
class Rollouts:
    """One step's rollouts as the generating rank produced them."""

    step: int
    samples: list[Sample]
    sample_ids: list[int]  # global sample ids, aligned with samples
    start: float  # time.time() when generation began
    end: float  # time.time() when it ended

    def to_json(self) -> dict:
        return {"step": self.step, "samples": [asdict(s) for s in self.samples], "sample_ids": self.sample_ids}

    @staticmethod
    def from_json(state: dict) -> "Rollouts":
        now = time.time()  # restored, not generated: a zero-length generation interval
        return Rollouts(int(state["step"]), [Sample(**s) for s in state["samples"]], list(state["sample_ids"]),
                        now, now)


@dataclass
class _Pending:
    """The one step the pipeline is ahead: its prompts and, on rank 0, its generation."""

    step: int
    prompts: list | None  # None when restored from a checkpoint (re-drawn from the sampler by `take`)
    sampler_state: dict  # the sampler's state before these prompts were drawn (what a checkpoint stores)
    prompt_ids: list | None = None  # ids of the prompts (checked against the re-drawn ones after a resume)
    future: Future | None = None  # rank 0: the generation in the thread
    rollouts: Rollouts | None = None  # after finish(): every rank (rank 0's result, broadcast)


class RolloutPrefetcher:
    """The generation thread (on the generating rank) and the one step it is ahead.

    `sampler`: the run's PromptSampler, drawn from in the main thread only. `generating`: this rank holds the
    engines (global rank 0): only there does a thread exist; other ranks only track prompts and receive the
    broadcast rollouts."""

    def __init__(self, sampler, generating: bool):
        self.sampler = sampler
        self.generating = generating
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tropd-rollouts") if generating else None
        self._pending: _Pending | None = None

    def holds(self, step: int) -> bool:
        """True when `step`'s rollouts were submitted (or restored) and not taken yet."""
        return self._pending is not None and self._pending.step == step

    def submit(self, step: int, generate: Callable[[list], Rollouts]) -> None:
        """Draw `step`'s prompts from the sampler (main thread, step order) and, on the generating rank, start
        `generate(prompts)` in the thread. Refuses a second pending step (depth 1)."""
        if self._pending is not None:
            raise RuntimeError(f"step {self._pending.step}'s rollouts are still pending; cannot submit step {step}")
        state = self.sampler.state_dict()
        prompts = self.sampler.next_batch()
        pending = _Pending(step, prompts, state, [p.id for p in prompts])
        if self._pool is not None:
            pending.future = self._pool.submit(generate, prompts)
        self._pending = pending

    def finish(self) -> None:
        """Wait until the thread is idle and give every rank the pending step's rollouts (one broadcast from rank
        0, collective). An exception in the thread is raised here on rank 0 as itself and on the other ranks as a
        RuntimeError with its message. No-op when nothing is pending or it has finished already."""
        p = self._pending
        if p is None or p.rollouts is not None:
            return
        error, payload = None, None
        if p.future is not None:
            wait([p.future])
            error = p.future.exception()
            payload = p.future.result() if error is None else f"{type(error).__name__}: {error}"
        box = [payload]
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            self._pending = None
            raise error
        if isinstance(box[0], str):
            self._pending = None
            raise RuntimeError(f"rollout generation for step {p.step} failed on the generating rank: {box[0]}")
        p.rollouts = box[0]

    def take(self, step: int) -> tuple[list, Rollouts]:
        """(prompts, rollouts) of `step`, which must be pending; finishes it first. After a resume the prompts are
        re-drawn from the sampler (restored to the state before them) and checked against the saved ones."""
        if not self.holds(step):
            raise RuntimeError(f"step {step}'s rollouts were never submitted")
        self.finish()
        p, self._pending = self._pending, None
        prompts = p.prompts
        if prompts is None:
            prompts = self.sampler.next_batch()
            if p.prompt_ids is not None and [q.id for q in prompts] != p.prompt_ids:
                raise RuntimeError(f"resumed step {step}: the sampler drew other prompts than the checkpoint's "
                                   f"prefetched rollouts were generated for")
        return prompts, p.rollouts

    def checkpoint_state(self) -> dict:
        """Trainer state for a checkpoint taken between steps (nothing generating): the sampler as of the steps
        trained so far and, when a step is prefetched, its rollouts (meaningful on rank 0, which writes them)."""
        p = self._pending
        if p is None:
            return {"sampler": self.sampler.state_dict()}
        self.finish()
        out = {"sampler": p.sampler_state, "prefetched": {"prompt_ids": p.prompt_ids}}
        if p.rollouts is not None:
            out["prefetched"].update(p.rollouts.to_json())
        return out

    def restore(self, state: dict | None, step: int) -> None:
        """Re-pend the rollouts a checkpoint saved for `step` (the resumed run's first step); the sampler must
        already be loaded with the checkpoint's state. Ignores a missing entry or one for another step."""
        if not state or int(state.get("step", -1)) != step:
            return
        self._pending = _Pending(step, None, self.sampler.state_dict(), state.get("prompt_ids"),
                                 rollouts=Rollouts.from_json(state))

    def close(self) -> None:
        """Join the thread (a generation in progress runs to its end; nothing queued behind it is started)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending = None
