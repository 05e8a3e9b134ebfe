"""Distillation objectives as small composable per-token losses (formulas: docs/objectives.md, METHOD.md).

    from megatron_tropd.objectives import ObjectiveConfig, build_objective, global_counts, token_weights
    objective = build_objective(ObjectiveConfig(name="tropd"))
    counts = global_counts([(mb.response_mask, mb.prefix_mask) for mb in micro_batches], groups.dp)
    for mb in micro_batches:
        w = token_weights(mb.response_mask, mb.prefix_mask, counts, objective.cfg.aggregation)
        loss, metrics = objective(mb, w)      # loss.backward(); collect metrics
    reduce_metrics(all_metrics, groups.dp)
"""
from .aggregation import GlobalCounts, entropy_threshold, global_counts, local_counts, reduce_metrics, token_weights
from .config import OBJECTIVE_NAMES, ObjectiveConfig, reopold_floor
from .full_vocab import compute_full_kl
from .inputs import Requirements, TokenInputs
from .offline import OfflineTerm
from .prefix_schedule import PrefixOptions, max_prefix_len, sample_prefix_lengths
from .registry import OBJECTIVES, Objective, build_objective, per_token_loss
from .trust_region import trust_mask, trust_probability, trust_uniforms

__all__ = [
    "GlobalCounts", "entropy_threshold", "global_counts", "local_counts", "reduce_metrics", "token_weights",
    "OBJECTIVE_NAMES", "ObjectiveConfig", "reopold_floor", "compute_full_kl", "Requirements", "TokenInputs",
    "PrefixOptions", "max_prefix_len", "sample_prefix_lengths", "OBJECTIVES", "Objective", "build_objective",
    "per_token_loss", "trust_mask", "trust_probability", "trust_uniforms", "OfflineTerm",
]
