"""Move whole ("full", TP=1 PP=1 layout) megatron-core tensors in and out of a TP/PP-sharded GPTModel.

Names are megatron-core's GPTModel parameter names with *global* layer numbers
(`decoder.layers.{i}.…`); each pipeline stage holds layers [pp_rank * L/pp, (pp_rank + 1) * L/pp).
A TP-sharded parameter carries megatron's attributes `tensor_model_parallel`, `partition_dim` and
`partition_stride`: the full tensor is `partition_stride` blocks along `partition_dim` (2 for the fused
SwiGLU [gate; up] of `linear_fc1`), and rank r holds the r-th of TP slices of every block, concatenated.

- `load_full_state_dict(model, full, groups)`: copy full tensors into this rank's shards.
- `iter_full_tensors(model, groups)`: yield (global name, full tensor) one parameter at a time, gathering TP
  shards and pipeline stages, so a large model is never held twice (streaming export, weight sync, tests).
"""
from __future__ import annotations

import re
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megatron_tropd.distributed.parallel import ParallelGroups

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
TIED_OUTPUT = "output_layer.weight"
EMBEDDING = "embedding.word_embeddings.weight"


def layers_per_stage(model) -> int:
    return len(model.decoder.layers)


def to_global_name(name: str, layer_offset: int) -> str:
    return _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", name, count=1)


def layer_offset(model, groups: ParallelGroups) -> int:
    return groups.pp_rank * layers_per_stage(model)


def local_parameters(model, groups: ParallelGroups) -> list[tuple[str, torch.nn.Parameter]]:
    """(global name, parameter) for this rank, in module order."""
    offset = layer_offset(model, groups)
    out = []
    for name, param in model.named_parameters():
        out.append((to_global_name(name, offset), param))
    return out


def shard(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's slice of a full tensor, by the parameter's megatron partition attributes."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([b.chunk(tp_size, dim=dim)[tp_rank] for b in blocks], dim=dim)


def unshard(pieces: list[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    """Inverse of `shard`: the full tensor from the TP ranks' slices (in rank order)."""
    if not getattr(param, "tensor_model_parallel", False) or len(pieces) == 1:
        return pieces[0]
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    per_rank_blocks = [p.chunk(stride, dim=dim) for p in pieces]
    return torch.cat([torch.cat([blocks[s] for blocks in per_rank_blocks], dim=dim) for s in range(stride)], dim=dim)


@torch.no_grad()
def load_full_state_dict(model, full: dict[str, torch.Tensor], groups: ParallelGroups, strict: bool = True) -> None:
    """Copy full tensors into this rank's parameter shards (names as in `local_parameters`)."""
    missing = []
    for name, param in local_parameters(model, groups):
        src = full.get(name)
        if src is None and name == TIED_OUTPUT:
            src = full.get(EMBEDDING)
        if src is None:
            missing.append(name)
            continue
        if name in (EMBEDDING, TIED_OUTPUT):
            src = fit_vocab_rows(src, param.shape[0] * groups.tp_size)
        local = shard(src, param, groups.tp_rank, groups.tp_size)
        if tuple(local.shape) != tuple(param.shape):
            raise ValueError(
                f"{name}: expected this rank's shard of shape {tuple(param.shape)}, got {tuple(local.shape)} "
                f"from a full tensor of shape {tuple(src.shape)} (tp={groups.tp_size})"
            )
        param.copy_(local.to(param.dtype))
    if strict and missing:
        raise KeyError(f"full state dict lacks {len(missing)} tensors this rank needs, e.g. {missing[:4]}")


def fit_vocab_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad (with zeros) or cut the padding rows of a [vocab, hidden] tensor: the padded vocabulary depends on
    TP (make_vocab_size_divisible_by x TP), so a checkpoint saved at one TP is re-padded for another."""
    if weight.shape[0] == rows:
        return weight
    if weight.shape[0] > rows:
        return weight[:rows]
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])


def _gather_tp(tensor: torch.Tensor, param, groups: ParallelGroups) -> torch.Tensor:
    if groups.tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return tensor
    pieces = [torch.empty_like(tensor) for _ in range(groups.tp_size)]
    dist.all_gather(pieces, tensor.contiguous(), group=groups.tp)
    return unshard(pieces, param)


def iter_full_tensors(
    model,
    groups: ParallelGroups,
    value: Callable[[torch.nn.Parameter], torch.Tensor] = lambda p: p.detach(),
    skip_tied_output: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (global name, full tensor) for every parameter of the whole model, on every rank of the TP x PP
    group, one at a time. `value` picks what to gather (e.g. `lambda p: p.grad`). Collective: all ranks of a
    model-parallel group must iterate together. With tied embeddings the last stage's copy of the output layer
    is skipped (it equals the embedding)."""
    local = {n: p for n, p in local_parameters(model, groups)}
    if skip_tied_output and model.share_embeddings_and_output_weights:
        local.pop(TIED_OUTPUT, None)
    # Every stage learns every other stage's names, shapes and dtypes (small metadata, once).
    meta = [(n, tuple(_full_shape(p, groups)), str(p.dtype).removeprefix("torch.")) for n, p in local.items()]
    if groups.pp_size > 1:
        all_meta = [None] * groups.pp_size
        dist.all_gather_object(all_meta, meta, group=groups.pp)
    else:
        all_meta = [meta]
    for stage, stage_meta in enumerate(all_meta):
        for name, shape, dtype in stage_meta:
            if stage == groups.pp_rank:
                param = local[name]
                full = _gather_tp(value(param), param, groups)
            else:
                full = torch.empty(shape, dtype=getattr(torch, dtype), device=groups.device)
            if groups.pp_size > 1:
                src = dist.get_global_rank(groups.pp, stage)
                full = full.contiguous()
                dist.broadcast(full, src=src, group=groups.pp)
            yield name, full


def _full_shape(param, groups: ParallelGroups) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= groups.tp_size
    return shape


def gather_full_state_dict(model, groups: ParallelGroups, value=lambda p: p.detach()) -> dict[str, torch.Tensor]:
    """The whole model's full tensors on every rank (for small models and tests; prefer `iter_full_tensors`)."""
    return {n: t.clone() for n, t in iter_full_tensors(model, groups, value)}
