"""Rollout samples -> padded token tensors for the teacher and student passes.

A sequence is prompt + response (teacher prefix, then student tokens), right-padded to a common length S.
The models read `tokens[:, :-1]` and predict `tokens[:, 1:]`, so every per-token tensor is `[b, S - 1]` and
position t holds quantities for target token `tokens[:, t + 1]` (the objectives' alignment).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from megatron_tropd.rollout.base import Sample


@dataclass
class RolloutBatch:
    tokens: torch.Tensor  # [b, S] int64, prompt + response, right-padded with pad_id
    response_mask: torch.Tensor  # [b, S-1] bool: target is a response token (prefix included)
    prefix_mask: torch.Tensor  # [b, S-1] bool: target is a teacher-prefix token
    lp_roll: torch.Tensor  # [b, S-1] float32: rollout engine's log-prob of student tokens (0 elsewhere)
    sample_ids: torch.Tensor  # [b] int64 global sample ids
    positions: torch.Tensor  # [b, S-1] int64 position of the target token in its sequence
    weight_versions: torch.Tensor  # [b] int64 engine weight version that generated each sample
    offline_mask: torch.Tensor  # [b, S-1] bool: target is a token of a teacher-written rollout (offline sample)
    routes: torch.Tensor  # [b] int64 index of the teacher that scores each sequence (training/teachers.py)

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    @property
    def inputs(self) -> torch.Tensor:
        """[b, S-1] model input ids."""
        return self.tokens[:, :-1]

    @property
    def targets(self) -> torch.Tensor:
        """[b, S-1] ids the model predicts."""
        return self.tokens[:, 1:]

    def select(self, index: slice | torch.Tensor) -> "RolloutBatch":
        return RolloutBatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def split(self, parts: int) -> list["RolloutBatch"]:
        """`parts` contiguous, equally sized pieces (the batch size must divide)."""
        if self.size % parts:
            raise ValueError(f"batch of {self.size} sequences cannot be split into {parts} equal parts; make "
                             f"prompts_per_step * samples_per_prompt divisible by DP size x micro-batch size")
        n = self.size // parts
        return [self.select(slice(i * n, (i + 1) * n)) for i in range(parts)]

    def dp_shard(self, dp_size: int, dp_rank: int, minibatches: int = 1) -> "RolloutBatch":
        """This data-parallel rank's sequences: the global batch is cut into `minibatches` (one optimizer step
        each) and every minibatch is split over the DP ranks, so a minibatch holds the same sequences whatever
        the DP size (the step is layout invariant)."""
        return RolloutBatch.concat([mini.split(dp_size)[dp_rank] for mini in self.split(minibatches)])

    @staticmethod
    def concat(parts: list["RolloutBatch"]) -> "RolloutBatch":
        """The rows of `parts` in order (all of one sequence length)."""
        return RolloutBatch(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(RolloutBatch)})

    def micro_batches(self, micro_batch_size: int) -> list["RolloutBatch"]:
        if self.size % micro_batch_size:
            raise ValueError(f"{self.size} sequences per data-parallel rank is not a multiple of "
                             f"optim.micro_batch_size={micro_batch_size}")
        return self.split(self.size // micro_batch_size)

    def trimmed(self, multiple: int = 8) -> "RolloutBatch":
        """The same rows without the trailing positions that no row's response reaches (right padding of the whole
        rollout batch that this micro-batch does not need), the length S-1 rounded up to `multiple`. Every
        response token keeps its place and its full left context, so per-token results are unchanged; a micro-batch
        of short sequences then costs what its own sequences cost (padding-aware micro-batches)."""
        cols = self.response_mask.any(0).nonzero()
        used = int(cols[-1]) + 1 if len(cols) else 1
        seq = min(-(-used // multiple) * multiple, self.tokens.shape[1] - 1)
        if seq == self.tokens.shape[1] - 1:
            return self
        per_token = {f.name: getattr(self, f.name)[:, :seq] for f in fields(self)
                     if f.name != "tokens" and getattr(self, f.name).dim() == 2}
        return replace(self, tokens=self.tokens[:, :seq + 1], **per_token)

    def to(self, device: torch.device) -> "RolloutBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def build_batch(samples: list[Sample], pad_id: int, sample_ids: list[int] | None = None,
                pad_to_multiple: int = 8, min_length: int = 0, routes: list[int] | None = None) -> RolloutBatch:
    """Right-pad `samples` into a RolloutBatch. The model input length S-1 is rounded up to `pad_to_multiple`
    (stable shapes for pipeline p2p buffers; sequence parallelism needs S-1 divisible by TP). `routes`: each
    sample's teacher index (default: all 0, the first teacher)."""
    if not samples:
        raise ValueError("cannot build a batch from zero samples")
    if routes is not None and len(routes) != len(samples):
        raise ValueError(f"{len(routes)} routes for {len(samples)} samples")
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    seq = max(max(lengths), min_length) - 1
    seq = -(-seq // pad_to_multiple) * pad_to_multiple + 1
    b = len(samples)
    tokens = torch.full((b, seq), pad_id, dtype=torch.int64)
    response = torch.zeros(b, seq - 1, dtype=torch.bool)
    prefix = torch.zeros(b, seq - 1, dtype=torch.bool)
    lp_roll = torch.zeros(b, seq - 1, dtype=torch.float32)
    offline = torch.zeros(b, seq - 1, dtype=torch.bool)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        if p == 0:
            raise ValueError(f"sample {i} has an empty prompt; every sequence needs at least one prompt token")
        if len(s.logprobs) != r - s.prefix_len:
            raise ValueError(f"sample {i}: {len(s.logprobs)} engine log-probs for {r - s.prefix_len} generated tokens")
        tokens[i, :p + r] = torch.tensor(list(s.prompt_ids) + list(s.response_ids), dtype=torch.int64)
        # target index t predicts tokens[t + 1]; response token j sits at tokens[p + j] -> target index p + j - 1
        response[i, p - 1:p - 1 + r] = True
        prefix[i, p - 1:p - 1 + s.prefix_len] = True
        lp_roll[i, p - 1 + s.prefix_len:p - 1 + r] = torch.tensor(s.logprobs, dtype=torch.float32)
        if s.meta.get("offline"):  # written by the teacher engine (rollout/offline.py): no prefix, all teacher
            if s.prefix_len:
                raise ValueError(f"sample {i} is a teacher-written (offline) rollout with a prefix of {s.prefix_len}")
            offline[i, p - 1:p - 1 + r] = True
    positions = torch.arange(1, seq, dtype=torch.int64).unsqueeze(0).expand(b, -1).contiguous()
    ids = sample_ids if sample_ids is not None else [s.request_id for s in samples]
    return RolloutBatch(
        tokens=tokens, response_mask=response, prefix_mask=prefix, lp_roll=lp_roll,
        sample_ids=torch.tensor(ids, dtype=torch.int64), positions=positions,
        weight_versions=torch.tensor([s.weight_version for s in samples], dtype=torch.int64), offline_mask=offline,
        routes=torch.tensor(routes if routes is not None else [0] * b, dtype=torch.int64),
    )
