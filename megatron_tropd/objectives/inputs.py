"""Per-token inputs of the objectives and the declaration of what each objective needs.

Every tensor is `[b, s]` aligned to predicted positions: position t holds quantities for token x_t given x_<t.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class Requirements:
    """What the teacher / student passes must compute for an objective (nothing more)."""

    teacher_topk: int = 0  # k of the teacher top-k (tk_lp, tk_ids); 0 = none
    student_at_teacher_topk: bool = False  # sk_lp: student log-probs at the teacher top-k ids (differentiable)
    teacher_entropy: bool = False  # ent_t [b, s]
    student_entropy: bool = False  # ent_s [b, s]
    full_vocab_kl: str | None = None  # kind for ops.kl_divergence ("forward" | "reverse" | "jsd"); None = none
    full_vocab_beta: float = 0.5  # beta passed to ops.kl_divergence when full_vocab_kl == "jsd"
    rollout_logprobs: bool = False  # lp_roll from the rollout engine
    # kind for ops.kl_divergence on tokens of teacher-written rollouts (offline distillation); None = none
    offline_kl: str | None = None
    offline_beta: float = 0.5  # beta passed to ops.kl_divergence when offline_kl == "jsd"
    # "student" | "teacher" | None: the step must compute a global entropy threshold once per step with
    # `aggregation.entropy_threshold(...)` (keep-fraction `entropy_frac`) and set TokenInputs.entropy_threshold.
    entropy_threshold: str | None = None
    entropy_frac: float = 0.2


@dataclass
class TokenInputs:
    """Per-token tensors of one micro-batch. Float tensors are float32 (or float64 in tests)."""

    lp_s: torch.Tensor  # [b, s] student log pi_S(x_t | x_<t), differentiable
    lp_old: torch.Tensor  # [b, s] same at the start of the step, detached
    lp_t: torch.Tensor  # [b, s] teacher log-prob of x_t, detached; may be -inf
    response_mask: torch.Tensor  # [b, s] bool: tokens in the loss (response incl. teacher-prefix tokens)
    prefix_mask: torch.Tensor  # [b, s] bool: teacher-prefix tokens (subset of response_mask)
    sample_ids: torch.Tensor  # [b] int64 global sample id (trust-mask RNG key)
    positions: torch.Tensor  # [b, s] int64 position of the token in its sequence (trust-mask RNG key)
    step: int  # optimizer step (RNG key, REOPOLD stage switch)
    lp_roll: torch.Tensor | None = None  # [b, s] rollout-engine log-prob of x_t
    tk_lp: torch.Tensor | None = None  # [b, s, k] teacher top-k log-probs (detached)
    tk_ids: torch.Tensor | None = None  # [b, s, k] int64 global ids of the teacher top-k
    sk_lp: torch.Tensor | None = None  # [b, s, k] student log-probs at tk_ids, differentiable
    ent_t: torch.Tensor | None = None  # [b, s] teacher entropy (detached)
    ent_s: torch.Tensor | None = None  # [b, s] student entropy (detached)
    full_kl: torch.Tensor | None = None  # [b, s] full-vocab divergence from ops.kl_divergence, differentiable
    entropy_threshold: float | None = None  # this step's global entropy threshold (see Requirements)
    offline_mask: torch.Tensor | None = None  # [b, s] bool: tokens of teacher-written rollouts (offline samples)
    offline_kl: torch.Tensor | None = None  # [b, s] full-vocab divergence for the offline term, differentiable

    @property
    def on_policy_mask(self) -> torch.Tensor:
        """[b, s] bool: response tokens the student generated itself (response & ~prefix & ~offline)."""
        mask = self.response_mask & ~self.prefix_mask
        return mask if self.offline_mask is None else mask & ~self.offline_mask

    def validate(self, req: Requirements) -> None:
        """Raise ValueError if a tensor has the wrong shape/dtype or a required input is missing."""
        shape = tuple(self.lp_s.shape)
        if len(shape) != 2:
            raise ValueError(f"lp_s must be [b, s], got shape {shape}")
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, torch.Tensor) or f.name == "sample_ids":
                continue
            if f.name in ("tk_lp", "tk_ids", "sk_lp"):
                if v.dim() != 3 or tuple(v.shape[:2]) != shape:
                    raise ValueError(f"{f.name} must be [b, s, k] with [b, s] = {shape}, got {tuple(v.shape)}")
            elif tuple(v.shape) != shape:
                raise ValueError(f"{f.name} must be [b, s] = {shape} like lp_s, got shape {tuple(v.shape)}")
        if tuple(self.sample_ids.shape) != shape[:1]:
            raise ValueError(f"sample_ids must be [b] = [{shape[0]}], got {tuple(self.sample_ids.shape)}")
        for name in ("response_mask", "prefix_mask", "offline_mask"):
            v = getattr(self, name)
            if v is not None and v.dtype != torch.bool:
                raise ValueError(f"{name} must be a bool tensor, got {v.dtype}")
        if (self.prefix_mask & ~self.response_mask).any():
            raise ValueError("prefix_mask must be a subset of response_mask (prefix tokens are response tokens)")
        offline = self.offline_mask is not None and bool(self.offline_mask.any())
        if offline and (self.offline_mask & ~(self.response_mask & ~self.prefix_mask)).any():
            raise ValueError("offline_mask must mark response tokens outside teacher prefixes (a teacher-written "
                             "rollout has no prefix)")
        if offline and req.offline_kl is None:
            raise ValueError("the batch has teacher-written (offline) tokens but the objective has no offline term, "
                             "so they would get no loss; build it with build_objective(cfg, offline=OfflineTerm(...))")
        for name in ("sample_ids", "positions"):
            if getattr(self, name).dtype != torch.int64:
                raise ValueError(f"{name} must be int64, got {getattr(self, name).dtype}")
        need = {
            "tk_lp": req.teacher_topk > 0, "tk_ids": False, "sk_lp": req.student_at_teacher_topk,
            "ent_t": req.teacher_entropy, "ent_s": req.student_entropy,
            "full_kl": req.full_vocab_kl is not None, "lp_roll": req.rollout_logprobs,
            "entropy_threshold": req.entropy_threshold is not None,
            "offline_kl": req.offline_kl is not None and offline,
        }
        for name, needed in need.items():
            if needed and getattr(self, name) is None:
                hint = (" (compute it once per step with megatron_tropd.objectives.entropy_threshold)"
                        if name == "entropy_threshold" else " (see objective.requirements)")
                raise ValueError(f"this objective needs TokenInputs.{name}, which is None{hint}")
        if req.teacher_topk > 0 and self.tk_lp.shape[-1] < req.teacher_topk:
            raise ValueError(f"tk_lp has k = {self.tk_lp.shape[-1]} but the objective needs teacher_topk = "
                             f"{req.teacher_topk}; raise the teacher top-k")
        if self.tk_lp is not None and self.sk_lp is not None and self.tk_lp.shape != self.sk_lp.shape:
            raise ValueError(f"tk_lp {tuple(self.tk_lp.shape)} and sk_lp {tuple(self.sk_lp.shape)} must match")
