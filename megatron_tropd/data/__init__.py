"""Prompt data: typed config, JSONL / Parquet / reasoning-gym sources with file:line errors, the seeded
train/eval split and the resumable sampler (`prompts`)."""
from megatron_tropd.data.prompts import (
    DataConfig, DataError, Prompt, PromptDataset, PromptSampler, exact_match_score,
)

__all__ = ["DataConfig", "DataError", "Prompt", "PromptDataset", "PromptSampler", "exact_match_score"]
