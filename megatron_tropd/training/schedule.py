"""One megatron-core forward(-backward) schedule over a list of micro-batches, with a per-micro-batch function
that turns the last stage's vocabulary-sharded logits into small per-token tensors.

    outputs = run_schedule(model, micro_batches, groups, on_logits, forward_only=True)

`on_logits(logits, mb_index) -> (loss, outputs)` runs on the last pipeline stage only, with `logits` the local
shard `[b, s, V_padded/tp]` of that micro-batch; `loss` is a scalar to backpropagate (ignored when forward_only)
and `outputs` a dict of small tensors. The full logits are dropped when `on_logits` returns, so they never
outlive a micro-batch. Returns the `outputs` of every micro-batch on the last stage, `[]` elsewhere.
The loss is taken as given: the models are built with `calculate_per_token_loss=True`, so megatron does not
divide it by token or micro-batch counts (our objectives already carry the global normalisation).
"""
from __future__ import annotations

from typing import Callable

import torch

from megatron_tropd.training.batch import RolloutBatch
from megatron_tropd.distributed.parallel import ParallelGroups

OnLogits = Callable[[torch.Tensor, int], tuple[torch.Tensor, dict]]


def position_ids(inputs: torch.Tensor) -> torch.Tensor:
    """[b, s] positions 0..s-1 (sequences are right-padded, so every sequence starts at position 0)."""
    return torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0).expand_as(inputs)


def run_schedule(model, micro_batches: list[RolloutBatch], groups: ParallelGroups, on_logits: OnLogits,
                 *, forward_only: bool) -> list[dict]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    device = groups.device
    order = iter(range(len(micro_batches)))

    def forward_step(data_iterator, model_chunk):
        index = next(data_iterator)
        inputs = micro_batches[index].inputs.to(device)
        output = model_chunk(inputs, position_ids(inputs), None)

        def loss_func(logits):
            loss, outputs = on_logits(logits, index)
            return loss, torch.tensor(1, dtype=torch.int, device=device), outputs

        return output, loss_func

    seq_length = micro_batches[0].inputs.shape[1]
    if any(mb.inputs.shape != micro_batches[0].inputs.shape for mb in micro_batches):
        raise ValueError("all micro-batches of a schedule must have the same [b, s] shape (pipeline p2p buffers)")
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=order,
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batches[0].size,
        forward_only=forward_only,
    )


def broadcast_from_last_stage(obj, groups: ParallelGroups):
    """A picklable object computed on the last pipeline stage, on every stage (for logging on rank 0)."""
    import torch.distributed as dist

    if groups.pp_size == 1:
        return obj
    box = [obj if groups.is_last_stage else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(groups.pp, groups.pp_size - 1), group=groups.pp)
    return box[0]
