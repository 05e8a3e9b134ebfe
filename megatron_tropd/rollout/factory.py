"""Build the rollout engines a run asks for, and hand them the student's weights after every optimizer step."""
from __future__ import annotations

from pathlib import Path

from megatron_tropd.parallel import ParallelGroups


def build_engines(cfg, student_dir: Path, teacher_dir: Path, vocab: int, pad_id: int, on_this_rank: bool) -> dict:
    """{"student": engine, "teacher": engine (only when teacher prefixes are on)} on the rank that generates
    (global rank 0), {} elsewhere. The student engine starts from the same HF weights as the megatron student."""
    if cfg.rollout.engine != "embedded":
        raise NotImplementedError(f"rollout.engine={cfg.rollout.engine!r} is not available in this build; "
                                  f"use rollout.engine=embedded")
    if not on_this_rank:
        return {}
    from megatron_tropd.roles import DTYPES
    from megatron_tropd.rollout.embedded import EmbeddedEngine

    dtype = DTYPES[cfg.rollout.engine_dtype]
    engines = {"student": EmbeddedEngine(str(student_dir), dtype=dtype, vocab_size=vocab, pad_token_id=pad_id)}
    if cfg.guidance.enabled and cfg.guidance.prefix_fraction > 0:
        engines["teacher"] = EmbeddedEngine(str(teacher_dir), dtype=dtype, vocab_size=vocab, pad_token_id=pad_id)
    return engines


def sync_weights(engines: dict, student, groups: ParallelGroups, arch, version: int) -> None:
    """Stream the student's HF-named tensors into the student engine (collective over the TP x PP ranks: every rank
    takes part in the gathers, the generating rank consumes the stream)."""
    from megatron_tropd.hf import iter_hf_tensors

    stream = iter_hf_tensors(student.gpt, groups, arch)
    if "student" in engines:
        engines["student"].update_weights(stream, version)
    else:
        for _ in stream:
            pass
