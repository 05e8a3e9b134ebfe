"""Typed configuration of the distillation objective (one dataclass, validated on construction)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

OBJECTIVE_NAMES = ("opd", "reopold", "eopd", "entropy_opd", "jsd", "tropd", "full_vocab", "topk_fkl")
OUTLIER_STRATEGIES = ("fkl", "clip", "mask")
TRUST_LOGPROBS = ("old", "rollout")
ENTROPY_SOURCES = ("student", "teacher")
FULL_VOCAB_KINDS = ("forward", "reverse", "jsd")
AGGREGATIONS = ("token_mean", "sequence_mean")
# REOPOLD has no released code and transcriptions of its reward floor disagree (docs/objectives.md, REOPOLD):
#   "log_lambda_div": log(lambda) / (1 - lambda)   (METHOD.md's reading, the project default; -2.558 at 0.1)
#   "log_odds":       log(lambda / (1 - lambda))   (the other transcription; -2.197 at 0.1)
FLOOR_FORMS = ("log_lambda_div", "log_odds")


def reopold_floor(lam: float, form: str = "log_lambda_div") -> float:
    """REOPOLD's reward floor: log(lambda) / (1 - lambda) (default; lambda = 0.1 gives about -2.558) or, with
    form="log_odds", log(lambda / (1 - lambda)) (about -2.197 at lambda = 0.1)."""
    if form == "log_lambda_div":
        return math.log(lam) / (1.0 - lam)
    if form == "log_odds":
        return math.log(lam / (1.0 - lam))
    raise ValueError(f"unknown REOPOLD floor form {form!r}; valid: {', '.join(FLOOR_FORMS)}")


@dataclass(frozen=True)
class ObjectiveConfig:
    # --- which objective -------------------------------------------------------------------------------------
    name: str = "tropd"  # one of OBJECTIVE_NAMES
    # --- TrOPD -----------------------------------------------------------------------------------------------
    outlier: str = "fkl"  # TrOPD outlier strategy (tokens with M_t = 0): "fkl" | "clip" | "mask"
    topk: int = 64  # k of the teacher top-k used by TrOPD's FKL outlier term, JSD and topk_fkl
    renormalize: bool = False  # renormalise the teacher top-k probabilities (TrOPD fkl, JSD, topk_fkl); paper: False
    trust_logprob: str = "old"  # P_trust = min(1, exp(lp_t - lp_x)) with lp_x = lp_old ("old") or lp_roll
    prefix_beta: float = 1e-3  # weight of the K1 forward-KL term beta * (-lp_s) on teacher-prefix tokens
    seed: int = 0  # seed of the counter-based trust-region RNG (with step, sample id, position)
    # --- PPO clip (OPD-type terms) -----------------------------------------------------------------------------
    ppo_clip: bool | None = None  # None = objective default (on for eopd, off otherwise)
    clip_eps_low: float = 0.2  # rho clipped to [1 - eps_low, 1 + eps_high]
    clip_eps_high: float = 0.2  # upper clip: rho <= 1 + eps_high
    # --- REOPOLD / TrOPD "clip" outliers ------------------------------------------------------------------------
    reopold_lambda: float = 0.1  # floor from lambda, in the form reopold_floor_form
    reopold_floor_form: str = "log_lambda_div"  # log_lambda_div: log(l)/(1-l) (-2.558) | log_odds: log(l/(1-l))
    floor: float | None = None  # overrides the floor computed from reopold_lambda
    mask_clipped: bool = False  # REOPOLD "Mask Outlier" variant: drop tokens with r_t < floor
    switch_step: int | None = None  # REOPOLD two-stage: from this step on keep only the top entropy_frac H_S
    # --- entropy selection (REOPOLD stage 2, entropy_opd) ---------------------------------------------------------
    entropy_frac: float = 0.2  # keep this fraction of highest-entropy on-policy tokens (global per step)
    entropy_source: str = "student"  # entropy_opd: rank by "student" (H_S) or "teacher" (H_T) entropy
    # --- EOPD --------------------------------------------------------------------------------------------------
    eopd_tau: float = 0.8  # gate 1[H_T >= tau] (nats; inclusive, as the official EOPD code)
    eopd_alpha: float = 1.0  # weight of the gated top-k forward KL
    eopd_topk: int = 16  # k of EOPD's renormalised teacher top-k
    # --- JSD / full vocabulary ----------------------------------------------------------------------------------
    jsd_beta: float = 0.5  # m = beta * pi_T + (1 - beta) * pi_S (top-k JSD and full-vocab "jsd")
    full_vocab_kind: str = "forward"  # full_vocab objective: "forward" | "reverse" | "jsd"
    # --- aggregation -------------------------------------------------------------------------------------------
    aggregation: str = "token_mean"  # "token_mean" (global) | "sequence_mean"

    def __post_init__(self) -> None:
        def choice(field: str, valid: tuple[str, ...]) -> None:
            v = getattr(self, field)
            if v not in valid:
                raise ValueError(f"unknown objective {field} {v!r}; valid: {', '.join(valid)}")

        choice("name", OBJECTIVE_NAMES)
        choice("outlier", OUTLIER_STRATEGIES)
        choice("trust_logprob", TRUST_LOGPROBS)
        choice("entropy_source", ENTROPY_SOURCES)
        choice("full_vocab_kind", FULL_VOCAB_KINDS)
        choice("aggregation", AGGREGATIONS)
        choice("reopold_floor_form", FLOOR_FORMS)
        for field in ("topk", "eopd_topk"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if not 0.0 < self.reopold_lambda < 1.0:
            raise ValueError(f"reopold_lambda must be in (0, 1), got {self.reopold_lambda}")
        if self.floor is not None and not (math.isfinite(self.floor) and self.floor <= 0.0):
            raise ValueError(f"floor must be a finite value <= 0 (a log-ratio), got {self.floor}")
        if not 0.0 < self.entropy_frac <= 1.0:
            raise ValueError(f"entropy_frac must be in (0, 1], got {self.entropy_frac}")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"jsd_beta must be in (0, 1) (use full_vocab_kind forward/reverse for the limits), "
                             f"got {self.jsd_beta}")
        if not 0.0 <= self.clip_eps_low < 1.0 or self.clip_eps_high < 0.0:
            raise ValueError(f"clip_eps_low must be in [0, 1) and clip_eps_high >= 0, got "
                             f"{self.clip_eps_low}, {self.clip_eps_high}")
        for field in ("prefix_beta", "eopd_alpha", "eopd_tau"):
            if getattr(self, field) < 0.0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if self.switch_step is not None and self.switch_step < 0:
            raise ValueError(f"switch_step must be >= 0 or None, got {self.switch_step}")

    @property
    def reward_floor(self) -> float:
        """The REOPOLD / TrOPD-clip floor: `floor` if set, else from reopold_lambda in reopold_floor_form."""
        return self.floor if self.floor is not None else reopold_floor(self.reopold_lambda, self.reopold_floor_form)

    @property
    def use_ppo_clip(self) -> bool:
        return self.ppo_clip if self.ppo_clip is not None else self.name == "eopd"

    @property
    def ppo_clip_range(self) -> tuple[float, float] | None:
        """(eps_low, eps_high) of the PPO ratio clip when it is on, else None."""
        return (self.clip_eps_low, self.clip_eps_high) if self.use_ppo_clip else None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ObjectiveConfig":
        """Build from a mapping (e.g. an omegaconf node); unknown keys raise ValueError listing valid ones."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"unknown objective config keys {unknown}; valid: {', '.join(sorted(valid))}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
