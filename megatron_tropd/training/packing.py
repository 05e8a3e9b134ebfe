"""Sequence packing: a micro-batch's right-padded rows placed into fewer rows of the same width for the
transformer body, with attention kept inside each sequence and each sequence at its own positions.

    plan = plan_for(mb.response_mask)   # None when no row would be saved
    with packed_forward(model, plan):
        logits = model(pack_rows(inputs, plan), plan.position_ids, plan.attention_mask)

Rows are filled first-fit by decreasing length (a row holds sequences whose lengths sum to at most the width), so a
micro-batch of 4 sequences of lengths 40, 12, 10, 9 at width 40 runs as 2 rows instead of 4: the body's cost
(every linear layer, and attention, which stays [s, s] per row) falls with the rows. Inside the block:
- attention is causal within each sequence and blocked across them (`attention_mask` [r, 1, s, s], True = masked,
  megatron's convention; masked scores are filled with -10000, so their softmax weight is exactly 0 in float32);
- RoPE is taken at each token's position in its own sequence (a forward hook on the model's `rotary_pos_emb` turns
  its [s, 1, 1, d] table into [s, r, 1, d] per-token rows), so every q.k product is the unpacked one;
- the output layer's input (hidden states [s, r, h]) is put back into the micro-batch's padded layout [s, b, h]
  (zeros on padding), so logits, the objectives' per-token tensors and every gradient keep the unpacked layout.
Per-token results then equal the padded path's up to float reassociation (tests/test_packing.py).

Needs megatron-core's local attention (the TE spec's packed path is THD `PackedSeqParams`, not built), pipeline size
1 (micro-batches of different row counts would change the p2p buffer shapes) and no sequence parallelism (the
output layer's input is sharded along s there).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class PackPlan:
    """Where each real token of a padded micro-batch [b, s] sits in the packed rows [r, s]."""

    batch_size: int  # b: rows of the padded micro-batch
    rows: int  # r < b: packed rows
    width: int  # s: both layouts' row width (model input positions)
    src: torch.Tensor  # [n] int64: flat index row * s + col of each real token in the padded layout
    dst: torch.Tensor  # [n] int64: its flat index in the packed layout
    position_ids: torch.Tensor  # [r, s] int64: each token's position in its own sequence (0 on free positions)
    attention_mask: torch.Tensor  # [r, 1, s, s] bool: True where query i must not see key j

    def to(self, device: torch.device) -> "PackPlan":
        return PackPlan(self.batch_size, self.rows, self.width, self.src.to(device), self.dst.to(device),
                        self.position_ids.to(device), self.attention_mask.to(device))


def sequence_lengths(response_mask: torch.Tensor) -> list[int]:
    """[b, s] response mask -> each row's used input length: up to and including its last response target (the
    positions after it are right padding; a row without a response keeps 1 position)."""
    s = response_mask.shape[1]
    last = torch.where(response_mask, torch.arange(s, device=response_mask.device), -1).amax(1)
    return [max(int(v) + 1, 1) for v in last.cpu()]


def plan_packing(lengths: list[int], width: int) -> PackPlan | None:
    """First-fit-decreasing placement of sequences of `lengths` into rows of `width` positions; None when it saves
    no row (then the padded micro-batch runs as it is)."""
    if any(n > width or n < 1 for n in lengths):
        raise ValueError(f"sequence lengths {lengths} do not fit rows of width {width}")
    bins: list[list[int]] = []  # sequence indices per packed row
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
        if row is None:
            bins.append([])
            free.append(width)
            row = len(bins) - 1
        bins[row].append(i)
        free[row] -= lengths[i]
    if len(bins) >= len(lengths):
        return None
    rows = len(bins)
    segment = torch.full((rows, width), -1, dtype=torch.int64)  # -1: free positions
    position_ids = torch.zeros(rows, width, dtype=torch.int64)
    src, dst = [], []
    for r, members in enumerate(bins):
        col = 0
        for i in sorted(members):  # a row's sequences in batch order (deterministic, readable plans)
            n = lengths[i]
            segment[r, col:col + n] = i
            position_ids[r, col:col + n] = torch.arange(n)
            src.append(torch.arange(n) + i * width)
            dst.append(torch.arange(n) + r * width + col)
            col += n
        # free tail: its own causal segment, so no query row is fully masked (outputs are discarded)
        segment[r, col:] = len(lengths) + r
        position_ids[r, col:] = torch.arange(width - col)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    visible = (segment[:, :, None] == segment[:, None, :]) & causal
    return PackPlan(len(lengths), rows, width, torch.cat(src), torch.cat(dst), position_ids,
                    (~visible).unsqueeze(1))


def plan_for(response_mask: torch.Tensor) -> PackPlan | None:
    """The plan of a micro-batch from its [b, s] response mask (the width s is the model input's)."""
    return plan_packing(sequence_lengths(response_mask), response_mask.shape[1])


def pack_rows(x: torch.Tensor, plan: PackPlan, fill: int = 0) -> torch.Tensor:
    """A padded per-token tensor [b, s] -> the packed rows [r, s] (`fill` on free positions)."""
    out = x.new_full((plan.rows * plan.width,), fill)
    out[plan.dst] = x.reshape(-1)[plan.src]
    return out.view(plan.rows, plan.width)


def unpack_hidden(hidden: torch.Tensor, plan: PackPlan) -> torch.Tensor:
    """Packed hidden states [s, r, h] -> the padded layout [s, b, h] (zeros on padding); differentiable."""
    s, r, h = hidden.shape
    flat = hidden.transpose(0, 1).reshape(r * s, h)
    padded = flat.new_zeros(plan.batch_size * s, h).index_copy(0, plan.src, flat.index_select(0, plan.dst))
    return padded.view(plan.batch_size, s, h).transpose(0, 1).contiguous()


def _unwrap(model):
    """The megatron GPTModel under DDP / Float16Module wrappers."""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


def check_packable(model) -> None:
    """Raise when `model` cannot run packed rows here (see the module doc)."""
    gpt = _unwrap(model)
    if gpt.config.sequence_parallel:
        raise ValueError("sequence packing does not run with sequence parallelism (the output layer's input is "
                         "sharded along s); turn one of them off")
    if gpt.position_embedding_type not in ("rope", "learned_absolute"):
        raise ValueError(f"sequence packing supports rope / learned_absolute positions, not "
                         f"{gpt.position_embedding_type!r}")
    # the attention kernel decides whether the block-diagonal mask is honoured: megatron-core's local one does
    te = [type(a).__name__ for a in (layer.self_attention.core_attention for layer in gpt.decoder.layers)
          if type(a).__module__.startswith("megatron.core.extensions")]
    if te:
        raise ValueError(f"sequence packing runs on megatron-core's local attention spec; this model's attention is "
                         f"Transformer Engine's ({te[0]}), whose packed path (THD PackedSeqParams) is not built: "
                         f"turn packing off")


@contextmanager
def packed_forward(model, plan: PackPlan) -> Iterator[None]:
    """Within the block `model`'s forward takes packed rows: RoPE at per-sequence positions and the output layer's
    input back in the padded layout (module doc). The caller passes `pack_rows(inputs)`, `plan.position_ids` and
    `plan.attention_mask` to the forward."""
    gpt = _unwrap(model)
    handles = []
    rope = getattr(gpt, "rotary_pos_emb", None)
    if gpt.position_embedding_type == "rope" and rope is not None:
        index = plan.position_ids.t()  # [s, r]

        def per_token(module, args, emb):  # emb [s, 1, 1, d] at positions 0..s-1 -> [s, r, 1, d]
            return emb[index].squeeze(2)

        handles.append(rope.register_forward_hook(per_token))
    layer = getattr(gpt, "output_layer", None)
    if gpt.post_process and layer is not None:
        handles.append(layer.register_forward_pre_hook(lambda module, args: (unpack_hidden(args[0], plan),
                                                                             *args[1:])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
