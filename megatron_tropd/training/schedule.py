"""One megatron-core forward(-backward) schedule over a list of micro-batches, with a per-micro-batch function
that turns the last stage's vocabulary-sharded logits into small per-token tensors.

    outputs = run_schedule(model, micro_batches, groups, on_logits, forward_only=True)

`on_logits(logits, mb_index) -> (loss, outputs)` runs on the last pipeline stage only, with `logits` the local
shard `[b, s, V_padded/tp]` of that micro-batch; `loss` is a scalar to backpropagate (ignored when forward_only)
and `outputs` a dict of small tensors. The full logits are dropped when `on_logits` returns, so they never
outlive a micro-batch. Returns the `outputs` of every micro-batch on the last stage, `[]` elsewhere.
The loss is taken as given: the models are built with `calculate_per_token_loss=True` and each micro-batch
reports zero tokens, so megatron neither divides the loss by micro-batch counts nor the gradients by token counts
(our objectives already carry the global normalisation, in one place: `objectives.token_weights`).
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
            # Our loss already carries the global normalisation (objectives.token_weights), so it is reported with
            # zero tokens: finalize_model_grads divides gradients by the DP-summed token count only when it is
            # > 0, and DDP sums over DP with calculate_per_token_loss. The gradient is then exactly the gradient
            # of the documented loss (tests/test_grad_scale.py), whatever the micro-batch count or DP size.
            return loss, torch.zeros((), dtype=torch.int, device=device), outputs

        return output, loss_func

    seq_length = micro_batches[0].inputs.shape[1]
    if any(mb.inputs.shape != micro_batches[0].inputs.shape for mb in micro_batches):
        raise ValueError("all micro-batches of a schedule must have the same [b, s] shape (pipeline p2p buffers)")
    return get_forward_backward_func(groups.pp_size, None)(
        forward_step_func=forward_step,
        data_iterator=order,
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batches[0].size,
        forward_only=forward_only,
        **explicit_groups(model, groups),
    )


def explicit_groups(model, groups: ParallelGroups) -> dict:
    """The schedule's process-group arguments for a layout built by `parallel.build_groups` (a teacher with its own
    TP/PP); {} for the global layout, which megatron-core reads from parallel_state."""
    if groups.collection is None:
        return {}
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    kw = {"pg_collection": groups.collection}
    if groups.pp_size > 1:
        kw["p2p_communicator"] = P2PCommunicator(pp_group=groups.pp, config=model.config)
    return kw


def broadcast_from_last_stage(obj, groups: ParallelGroups):
    """A picklable object computed on the last pipeline stage, on every stage (for logging on rank 0)."""
    import torch.distributed as dist

    if groups.pp_size == 1:
        return obj
    box = [obj if groups.is_last_stage else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(groups.pp, groups.pp_size - 1), group=groups.pp)
    return box[0]
