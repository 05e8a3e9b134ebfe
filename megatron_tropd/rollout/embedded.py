"""`EmbeddedEngine`: in-process rollouts with an HF transformers causal LM and our own batched sampling loop.

Why our own loop rather than `model.generate` (numbers in docs/rollout.md):
- each sample draws from its own `torch.Generator` seeded by (params.seed, request_id, sample index), so a sample
  does not depend on which other requests share its batch (bit-exact resume, split/merged requests agree);
- the reported log-prob is log_softmax(logits / T) of the *unfiltered* tempered distribution at the sampled token:
  the trainer and the teacher score that same distribution (top-p only restricts which token is drawn);
  `generate` returns processed scores (after top-p masking), which are -inf / renormalised.

Batched decoding: left padding + attention mask + explicit position ids, a `DynamicCache`, finished rows dropped
from the cache (`batch_select_indices`) so long tails do not pay for finished rows.
Greedy (argmax) when temperature == 0; its log-probs are then those of the T = 1 distribution.
"""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from megatron_tropd.rollout.base import GenerationRequest, Sample, SamplingParams, sample_seed, start_samples

logger = logging.getLogger(__name__)


def tempered_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) in fp32, [b, v] -> [b, v]; T == 0 (greedy) reports the T = 1 distribution."""
    t = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits.float() / t, dim=-1)


def sample_tokens(logp: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Draw one token per row by inverse CDF: the first id whose cumulative probability exceeds u * (kept mass).

    logp: [b, v] tempered log-probs; u: [b] uniforms in [0, 1). Top-p keeps the smallest prefix of the
    probability-sorted vocabulary whose mass reaches top_p (the top token always). Greedy when temperature == 0.
    """
    if temperature == 0:
        return logp.argmax(dim=-1)
    if top_p < 1.0:
        # The nucleus lies within the top k once their mass reaches top_p: a top-512 is much cheaper than sorting
        # the whole vocabulary (~10x at V = 49152); flat distributions fall back to the full sort.
        probs = logp.exp()
        sp, order = probs.topk(min(512, probs.shape[-1]), dim=-1, sorted=True)
        if not bool((sp.double().sum(-1) >= top_p).all()):
            sp, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        sp = sp.double()
        before = sp.cumsum(-1) - sp  # mass strictly before each sorted token
        sp = sp.masked_fill(before >= top_p, 0.0)
    else:
        sp, order = logp.double().exp(), None
    cdf = sp.cumsum(-1)
    idx = torch.searchsorted(cdf, (u.double() * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    idx = idx.clamp_(max=sp.shape[-1] - 1)
    # A zero-probability id can only be hit through the clamp; step back to the last positive one.
    while True:
        bad = sp.gather(-1, idx[:, None]).squeeze(-1) <= 0
        if not bad.any():
            break
        idx = torch.where(bad, idx - 1, idx)
    return idx if order is None else order.gather(-1, idx[:, None]).squeeze(-1)


@dataclass
class _Row:
    out: int  # index into the flat result list
    context: list[int]  # prompt + prefix
    budget: int  # tokens still to generate
    seed: int


class EmbeddedEngine:
    """A `RolloutEngine` over an HF causal LM (a directory or a model object) in this process."""

    def __init__(self, model, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 max_batch_size: int = 64, vocab_size: int | None = None, pad_token_id: int = 0,
                 weight_version: int = 0):
        """vocab_size: the real vocabulary (logits beyond it are padding and excluded); default the config's."""
        if isinstance(model, (str, Path)):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.vocab_size = vocab_size or model.config.vocab_size
        self.pad_token_id = pad_token_id
        self._version = weight_version
        self._stale: str | None = None  # set when an update_weights failed half-way

    @property
    def weight_version(self) -> int:
        return self._version

    # -- generation ---------------------------------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[list[Sample]]:
        if self._stale:
            raise RuntimeError(f"EmbeddedEngine weights are partially updated ({self._stale}); call update_weights "
                               "again with a complete, valid set of tensors")
        stop = set(params.stop_token_ids)
        max_pos = getattr(self.model.config, "max_position_embeddings", None)
        samples: list[Sample | None] = []
        rows: list[_Row] = []
        for req in requests:
            cap, opened = start_samples(req, params, self._version)
            prefix = list(req.prefix_ids)
            context = list(req.prompt_ids) + prefix
            if max_pos is not None and len(context) + cap - len(prefix) > max_pos:
                raise ValueError(f"request {req.request_id}: prompt+response up to {len(context) + cap - len(prefix)} "
                                 f"tokens exceeds the model's max_position_embeddings={max_pos}")
            for k, s, to_generate in opened:
                samples.append(s)
                if to_generate:
                    rows.append(_Row(len(samples) - 1, context, cap - len(prefix),
                                     sample_seed(params.seed, req.request_id, k)))
        # Similar lengths together (less padding); per-row generators keep results independent of the grouping.
        rows.sort(key=lambda r: len(r.context))
        for i in range(0, len(rows), self.max_batch_size):
            self._decode(rows[i: i + self.max_batch_size], samples, params, stop)
        out, it = [], iter(samples)
        for req in requests:
            out.append([next(it) for _ in range(req.n)])
        return out

    @torch.no_grad()
    def _decode(self, rows: list[_Row], samples: list[Sample], params: SamplingParams, stop: set[int]) -> None:
        from transformers import DynamicCache

        b, width = len(rows), max(len(r.context) for r in rows)
        ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            ids[i, width - len(r.context):] = torch.tensor(r.context)
            mask[i, width - len(r.context):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        gens = [torch.Generator().manual_seed(r.seed) for r in rows]
        cache = DynamicCache()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1, : self.vocab_size]
        active = list(range(b))  # row indices still generating, aligned with the cache's batch
        next_pos = mask.sum(-1)  # [b] position of the next token
        step = 0
        while True:
            logp = tempered_logprobs(logits, params.temperature)  # [a, v]
            u = torch.stack([torch.rand((), generator=gens[i], dtype=torch.float64) for i in active])
            tok = sample_tokens(logp, u.to(logp.device), params.temperature, params.top_p)
            lp = logp.gather(-1, tok[:, None]).squeeze(-1)
            step += 1
            keep = []
            for j, i in enumerate(active):
                s, t = samples[rows[i].out], int(tok[j])
                s.response_ids.append(t)
                s.logprobs.append(float(lp[j]))
                if t in stop:
                    s.finish_reason = "stop"
                elif step < rows[i].budget:
                    keep.append(j)
            if not keep:
                return
            if len(keep) < len(active):
                idx = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(idx)
                mask, tok, next_pos = mask[idx], tok[idx], next_pos[idx]
                active = [active[j] for j in keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            logits = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                                past_key_values=cache, use_cache=True).logits[:, -1, : self.vocab_size]
            next_pos = next_pos + 1

    # -- weights ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy HF-named tensors into the model one at a time (streamed; no second copy of the model).

        Strict: every name must be a key of the model's state_dict with the same shape, and every parameter must be
        covered (tied weights count once). On an error the engine refuses to generate until a complete update.
        """
        state = self.model.state_dict()
        groups: dict[int, list[str]] = {}  # storage -> names (tied weights share one)
        for name, t in state.items():
            groups.setdefault(t.data_ptr(), []).append(name)
        covered: set[int] = set()
        copied = 0
        try:
            for name, tensor in named_tensors:
                if name not in state:
                    close = difflib.get_close_matches(name, list(state), n=3)
                    raise ValueError(f"update_weights: unknown tensor name {name!r} (expected HF names such as "
                                     f"{next(iter(state))!r}; closest: {close})")
                dst = state[name]
                if tuple(tensor.shape) != tuple(dst.shape):
                    raise ValueError(f"update_weights: {name}: shape {tuple(tensor.shape)} does not match the model's "
                                     f"{tuple(dst.shape)}")
                dst.copy_(tensor.to(device=dst.device, dtype=dst.dtype))
                covered.add(dst.data_ptr())
                copied += 1
            missing = [names[0] for ptr, names in groups.items() if ptr not in covered]
            if missing:
                raise ValueError(f"update_weights: {len(missing)} tensors missing, e.g. {missing[:3]}")
        except Exception as e:
            if copied:
                self._stale = f"update to version {version} failed after {copied} tensors: {e}"
            raise
        self._stale = None
        self._version = int(version)

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
