"""Global normalisation of the loss, metric reduction, and the per-step global entropy threshold.

Token mean (default): every on-policy term is divided by the GLOBAL number of on-policy response tokens
(response & ~prefix, over all micro-batches and data-parallel ranks), the prefix term by the global number of
prefix tokens. The counts are gathered with ONE all-reduce per step, so

    loss = sum over micro-batches and DP ranks of sum(weights * per_token)

is the global mean and does not depend on how the batch is split. Sequence mean (option): each sequence's
tokens of a term are averaged, then averaged over the global number of sequences that have such tokens.
A sequence must lie entirely in one micro-batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.distributed as dist

# Order of the count vector that is all-reduced.
_COUNT_FIELDS = ("on_policy_tokens", "prefix_tokens", "on_policy_seqs", "prefix_seqs")


@dataclass(frozen=True)
class GlobalCounts:
    on_policy_tokens: float  # response & ~prefix tokens
    prefix_tokens: float  # teacher-prefix tokens
    on_policy_seqs: float  # sequences with >= 1 on-policy token
    prefix_seqs: float  # sequences with >= 1 prefix token


def local_counts(masks: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """This rank's counts over its micro-batches: `masks` = [(response_mask [b, s], prefix_mask [b, s]), ...].

    Returns a float64 vector [4] in the order of GlobalCounts' fields.
    """
    out = torch.zeros(len(_COUNT_FIELDS), dtype=torch.float64)
    for response_mask, prefix_mask in masks:
        onp = response_mask & ~prefix_mask
        pre = prefix_mask & response_mask
        out += torch.stack([onp.sum(), pre.sum(), onp.any(-1).sum(), pre.any(-1).sum()]).to(torch.float64).cpu()
    return out


def global_counts(masks: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  dp_group: dist.ProcessGroup | None = None,
                  device: torch.device | None = None) -> GlobalCounts:
    """Counts over all micro-batches of this rank, summed over `dp_group` with one all-reduce (None = local)."""
    counts = local_counts(masks)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        counts = counts.to(device or torch.device("cpu"))
        dist.all_reduce(counts, group=dp_group)
    return GlobalCounts(*(float(c) for c in counts.cpu()))


def token_weights(response_mask: torch.Tensor, prefix_mask: torch.Tensor, counts: GlobalCounts,
                  aggregation: str = "token_mean", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-token weights [b, s] so that sum(weights * per_token_loss) over the step is the global mean.

    token_mean:    w = 1[on-policy] / N_on + 1[prefix] / N_prefix
    sequence_mean: w = 1[on-policy] / (n_on(seq) * S_on) + 1[prefix] / (n_prefix(seq) * S_prefix)
    Empty denominators are clamped to 1 (their numerators are all zero).
    """
    onp = (response_mask & ~prefix_mask).to(dtype)
    pre = (prefix_mask & response_mask).to(dtype)
    if aggregation == "token_mean":
        return onp / max(counts.on_policy_tokens, 1.0) + pre / max(counts.prefix_tokens, 1.0)
    if aggregation == "sequence_mean":
        n_on = onp.sum(-1, keepdim=True).clamp_min(1.0)
        n_pre = pre.sum(-1, keepdim=True).clamp_min(1.0)
        return (onp / (n_on * max(counts.on_policy_seqs, 1.0))
                + pre / (n_pre * max(counts.prefix_seqs, 1.0)))
    raise ValueError(f"unknown aggregation {aggregation!r}; valid: token_mean, sequence_mean")


Metrics = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (sum of values, count of tokens)


def reduce_metrics(per_microbatch: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
                   dp_group: dist.ProcessGroup | None = None,
                   device: torch.device | None = None) -> dict[str, float]:
    """Sum (value_sum, count) pairs over micro-batches and DP ranks (one all-reduce) and return the means.

    Every rank must report the same metric names (same objective config). A metric with count 0 gives nan.
    """
    names = sorted({k for m in per_microbatch for k in m})
    buf = torch.zeros(len(names), 2, dtype=torch.float64)
    for m in per_microbatch:
        for i, k in enumerate(names):
            if k in m:
                buf[i, 0] += float(m[k][0])
                buf[i, 1] += float(m[k][1])
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        buf = buf.to(device or torch.device("cpu"))  # NCCL groups need device=cuda
        dist.all_reduce(buf, group=dp_group)
        buf = buf.cpu()
    return {k: (buf[i, 0] / buf[i, 1]).item() if buf[i, 1] > 0 else float("nan") for i, k in enumerate(names)}


def entropy_threshold(entropies: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], frac: float,
                      dp_group: dist.ProcessGroup | None = None) -> float:
    """Threshold h so that tokens with H >= h are the top `frac` highest-entropy tokens of the STEP.

    Computed once per step over every micro-batch of every DP rank (all-gather over `dp_group`), so the
    selection does not depend on the micro-batch / DP split. With N selectable tokens, h is the
    ceil(frac * N)-th largest entropy (ties at h are all kept). No tokens -> +inf (nothing selected).
    `entropies[i]`, `masks[i]`: [b, s] per micro-batch; the mask is normally the on-policy mask.
    """
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"entropy frac must be in (0, 1], got {frac}")
    vals = [h.detach()[m].to(torch.float64).cpu() for h, m in zip(entropies, masks)]
    local = torch.cat(vals) if vals else torch.zeros(0, dtype=torch.float64)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        # gloo/NCCL all_gather needs equal sizes: pad with nan to the largest rank, then drop the padding.
        device = entropies[0].device if entropies else torch.device("cpu")
        n = torch.tensor([local.numel()], dtype=torch.int64, device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX, group=dp_group)
        padded = torch.full((int(n),), float("nan"), dtype=torch.float64, device=device)
        padded[: local.numel()] = local.to(device)
        out = [torch.empty_like(padded) for _ in range(dist.get_world_size(dp_group))]
        dist.all_gather(out, padded, group=dp_group)
        local = torch.cat(out).cpu()
        local = local[~torch.isnan(local)]
    if local.numel() == 0:
        return float("inf")
    k = max(1, math.ceil(round(frac * local.numel(), 9)))  # ceil(frac * N), robust to 0.2*15=3.0000000004
    return torch.sort(local, descending=True).values[k - 1].item()
