"""Rollout engines: the interface (`base`), the in-process HF engine (`embedded`), teacher prefixes (`prefixes`)."""
from megatron_tropd.rollout.base import GenerationRequest, RolloutEngine, Sample, SamplingParams

__all__ = ["GenerationRequest", "RolloutEngine", "Sample", "SamplingParams", "EmbeddedEngine",
           "generate_with_prefixes"]


def __getattr__(name: str):  # lazy: importing the package must not import transformers
    if name == "EmbeddedEngine":
        from megatron_tropd.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine
    if name == "generate_with_prefixes":
        from megatron_tropd.rollout.prefixes import generate_with_prefixes

        return generate_with_prefixes
    raise AttributeError(name)
