"""The rollout engine interface: what the trainer and the evaluator ask of an inference engine.

Two implementations: `EmbeddedEngine` (in-process, HF transformers with a KV cache; the default on one machine) and
`SGLangEngine` (HTTP servers). Both return token ids and the engine's own log-probs of the sampled tokens at the
sampling temperature, and record which weight version produced every sample.
"""
from __future__ import annotations

import hashlib

from dataclasses import dataclass, field
from typing import Iterable, Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()  # generation ends after emitting one of these (it is kept in the response)
    seed: int = 0  # with (request_id, sample index) seeds each sample's generator: reproducible sampling

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 0:
            raise ValueError(f"bad SamplingParams: need temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 0; "
                             f"got {self}")


@dataclass(frozen=True)
class GenerationRequest:
    """Generate `n` continuations of `prompt_ids + prefix_ids`.

    `prefix_ids` are response tokens written by someone else (the teacher's off-policy prefix); they are part of
    the returned response (`Sample.response_ids` starts with them) and flagged by `Sample.prefix_len`.
    `max_new_tokens` in SamplingParams counts the whole response, prefix included.
    """

    prompt_ids: tuple[int, ...]
    n: int = 1
    prefix_ids: tuple[int, ...] = ()
    request_id: int = 0  # stable id (e.g. global sample id); seeds the sampler together with SamplingParams.seed
    # Samples are numbered first_sample_index .. first_sample_index + n - 1; sample k is seeded by
    # (SamplingParams.seed, request_id, k), so splitting a request into n=1 requests reproduces the same samples.
    first_sample_index: int = 0
    max_new_tokens: int | None = None  # per-request cap on the response (prefix included); None: the params' value


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]  # prefix (if any) + generated tokens
    logprobs: list[float]  # engine log-probs of the generated tokens (len = len(response_ids) - prefix_len)
    finish_reason: str  # "stop" (a stop id was emitted) | "length"
    weight_version: int
    prefix_len: int = 0
    request_id: int = 0
    meta: dict = field(default_factory=dict)


def start_samples(req: GenerationRequest, params: SamplingParams, weight_version: int
                  ) -> tuple[int, list[tuple[int, Sample, bool]]]:
    """Validate a request and open its samples: (cap, [(sample index, sample, still to generate), ...]).

    `cap` is the response budget (prefix included). Each sample starts as the prefix; a prefix that ends at a stop id
    already finished the response, and one that fills the budget leaves nothing to generate. Shared by the engines.
    """
    if not req.prompt_ids:
        raise ValueError(f"request {req.request_id}: empty prompt_ids")
    cap = params.max_new_tokens if req.max_new_tokens is None else min(req.max_new_tokens, params.max_new_tokens)
    prefix = list(req.prefix_ids)
    if len(prefix) > cap:
        raise ValueError(f"request {req.request_id}: prefix of {len(prefix)} tokens exceeds max_new_tokens={cap}"
                         " (the prefix counts towards max_new_tokens)")
    stop = set(params.stop_token_ids)
    opened = []
    for k in range(req.first_sample_index, req.first_sample_index + req.n):
        s = Sample(prompt_ids=list(req.prompt_ids), response_ids=list(prefix), logprobs=[], finish_reason="length",
                   weight_version=weight_version, prefix_len=len(prefix), request_id=req.request_id,
                   meta={"sample_index": k})
        if prefix and prefix[-1] in stop:  # the prefix already ended the response
            s.finish_reason = "stop"
        opened.append((k, s, s.finish_reason != "stop" and len(prefix) < cap))
    return cap, opened


class RolloutEngine(Protocol):
    @property
    def weight_version(self) -> int: ...

    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[list[Sample]]:
        """One list of `request.n` samples per request, in request order."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Replace the engine's weights with HF-named tensors (streamed) and set the weight version."""

    def close(self) -> None: ...


def sample_seed(seed: int, request_id: int, sample_index: int) -> int:
    """A 63-bit generator seed from (seed, request_id, sample_index), stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}:{request_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
