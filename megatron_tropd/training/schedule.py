"""One megatron-core forward(-backward) schedule over a list of micro-batches, with a per-micro-batch function
that turns the last stage's vocabulary-sharded logits into small per-token tensors.

    outputs = run_schedule(model, micro_batches, groups, on_logits, forward_only=True)

`on_logits(logits, mb_index) -> (loss, outputs)` runs on the last pipeline stage only, with `logits` the local
shard `[b, s, V_padded/tp]` of that micro-batch; `loss` is a scalar to backpropagate (ignored when forward_only)
and `outputs` a dict of small tensors. The full logits are dropped when `on_logits` returns, so they never
outlive a micro-batch. Returns the `outputs` of every micro-batch on the last stage, `[]` elsewhere.

With `crop=True` the output layer runs only from the micro-batch's first response position on (`logits_start`),
and within that window only at response positions (the logits are 0 at the window's other positions: right padding
of shorter rows, prompt tokens of rows with longer prompts): prompt positions carry no loss and no statistic, and
the output layer and every vocabulary-sized op after it are the largest per-token cost of a small model
(SmolLM2-135M: 28 M of its 135 M matmul parameters). `on_logits` then gets `[b, s - start, V_padded/tp]`;
`start = s - logits.shape[1]` recovers the offset and `crop_positions` cuts the micro-batch's per-token tensors to
match.
With `pack=True` (PP 1) each micro-batch's sequences run packed into fewer rows (`training/packing.py`) when that
saves a row; `on_logits` still gets the padded layout, so nothing after the output layer changes.
The loss is taken as given: the models are built with `calculate_per_token_loss=True` and each micro-batch
reports zero tokens, so megatron neither divides the loss by micro-batch counts nor the gradients by token counts
(our objectives already carry the global normalisation, in one place: `objectives.token_weights`).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch

from megatron_tropd.training.batch import RolloutBatch
from megatron_tropd.distributed.parallel import ParallelGroups
from megatron_tropd.training import packing

OnLogits = Callable[[torch.Tensor, int], tuple[torch.Tensor, dict]]


def position_ids(inputs: torch.Tensor) -> torch.Tensor:
    """[b, s] positions 0..s-1 (sequences are right-padded, so every sequence starts at position 0)."""
    return torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0).expand_as(inputs)


def logits_start(response_mask: torch.Tensor) -> int:
    """The first target position [b, s] `response_mask` has in any row: every earlier position is a prompt token of
    every row (prompts are left-aligned), so no loss or statistic reads its logits. 0 when nothing is a response."""
    cols = response_mask.any(0).nonzero()
    return int(cols[0]) if len(cols) else 0


def crop_positions(x: torch.Tensor, start: int) -> torch.Tensor:
    """[b, s, ...] -> [b, s - start, ...]: a per-token tensor aligned with logits of `logits_start` = start."""
    return x[:, start:] if start else x


def uncrop_positions(x: torch.Tensor, start: int, value: float = 0.0) -> torch.Tensor:
    """[b, s - start, ...] -> [b, s, ...], the `start` cropped positions filled with `value` (they are prompt
    positions, masked out of every loss and metric)."""
    if not start:
        return x
    return torch.cat([x.new_full((x.shape[0], start, *x.shape[2:]), value), x], dim=1)


def _output_layer(model):
    """The megatron GPTModel's output layer under DDP / Float16Module wrappers; None off the last pipeline stage."""
    while not hasattr(model, "output_layer") and hasattr(model, "module"):
        model = model.module
    return getattr(model, "output_layer", None)


@contextmanager
def logits_from(model, start: int, where: torch.Tensor | None = None) -> Iterator[int]:
    """Within the block `model`'s forward computes logits for positions >= `start` only: the output layer's input
    (hidden states [s, b, h]) is cut to [s - start, b, h], so the logits are [b, s - start, V_padded/tp] and the
    backward through the cut is exact (prompt positions get no gradient from the output layer, as they get none from
    a masked loss). With `where` ([b, s] bool, the micro-batch's response mask) the output layer's matmul runs only
    at those positions of the window and the logits are 0 at the others (right padding of shorter rows, prompt
    positions of rows with longer prompts): no loss or statistic reads them. Yields the offset in effect: 0
    (nothing cut) off the last stage, for start 0, and with sequence parallelism, where the output layer's input is
    sharded along s."""
    layer = _output_layer(model)
    if layer is None or getattr(layer, "sequence_parallel", False):
        yield 0
        return
    start = max(start, 0)
    sel = None
    if where is not None:  # flat indices, in the window's [s - start, b] order, of the positions that need logits
        sel = where[:, start:].t().reshape(-1).nonzero().squeeze(1)
        if sel.numel() in (0, where[:, start:].numel()):
            sel = None  # nothing to skip (or nothing to compute: keep the plain window)
    if start == 0 and sel is None:
        yield 0
        return
    def cut(module, args):  # hidden states [s, b, h] -> [s - start, b, h], or its response rows [n, 1, h]
        x = args[0][start:]
        if sel is not None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, sel).unsqueeze(1)
        return (x, *args[1:])

    def scatter(module, args, output):  # ColumnParallelLinear returns (logits [n, 1, V/tp], bias)
        logits, bias = output
        b, s = where.shape[0], where.shape[1] - start  # the window [s - start, b] of the input hidden states
        full = logits.new_zeros(s * b, logits.shape[-1]).index_copy(0, sel, logits.squeeze(1))
        return full.view(s, b, -1), bias

    handles = [layer.register_forward_pre_hook(cut)]
    if sel is not None:
        handles.append(layer.register_forward_hook(scatter))
    try:
        yield start
    finally:
        for h in handles:
            h.remove()


def model_forward(model, inputs: torch.Tensor, start: int = 0, where: torch.Tensor | None = None,
                  plan: "packing.PackPlan | None" = None) -> tuple[int, torch.Tensor]:
    """(offset in effect, output) of `model` on input ids [b, s]: on the last stage the logits shard
    [b, s - offset, V_padded/tp] of `logits_from(model, start, where)`; with a packing `plan` the body runs on its
    packed rows (packing.packed_forward, whose pre-hook is registered before the crop's, so it runs first)."""
    with packing.packed_forward(model, plan) if plan else nullcontext(), logits_from(model, start, where) as applied:
        if plan:
            return applied, model(packing.pack_rows(inputs, plan), plan.position_ids, plan.attention_mask)
        return applied, model(inputs, position_ids(inputs), None)


def run_schedule(model, micro_batches: list[RolloutBatch], groups: ParallelGroups, on_logits: OnLogits,
                 *, forward_only: bool, crop: bool = False, pack: bool = False) -> list[dict]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    device = groups.device
    order = iter(range(len(micro_batches)))
    plans = pack_plans(model, micro_batches, groups) if pack else [None] * len(micro_batches)

    def forward_step(data_iterator, model_chunk):
        index = next(data_iterator)
        mb, plan = micro_batches[index], plans[index]
        start, where = (logits_start(mb.response_mask), mb.response_mask.to(device)) if crop else (0, None)
        _, output = model_forward(model_chunk, mb.inputs.to(device), start, where, plan)

        def loss_func(logits):
            loss, outputs = on_logits(logits, index)
            # Our loss already carries the global normalisation (objectives.token_weights), so it is reported with
            # zero tokens: finalize_model_grads divides gradients by the DP-summed token count only when it is
            # > 0, and DDP sums over DP with calculate_per_token_loss. The gradient is then exactly the gradient
            # of the documented loss (tests/test_grad_scale.py), whatever the micro-batch count or DP size.
            return loss, torch.zeros((), dtype=torch.int, device=device), outputs

        return output, loss_func

    seq_length = max(mb.inputs.shape[1] for mb in micro_batches)
    if groups.pp_size > 1 and any(mb.inputs.shape != micro_batches[0].inputs.shape for mb in micro_batches):
        raise ValueError("with pipeline parallelism all micro-batches of a schedule must have the same [b, s] shape "
                         "(pipeline p2p buffers)")
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


def pack_plans(model, micro_batches: list[RolloutBatch], groups: ParallelGroups) -> list:
    """Each micro-batch's `packing.PackPlan` on `groups.device` (None where packing saves no row)."""
    if groups.pp_size > 1:
        raise ValueError("sequence packing needs pipeline_model_parallel_size = 1 (packed micro-batches have "
                         "different row counts, and the pipeline's p2p buffers one shape)")
    packing.check_packable(model)
    plans = [packing.plan_for(mb.response_mask) for mb in micro_batches]
    return [p.to(groups.device) if p else None for p in plans]


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
