"""The architecture of a decoder-only transformer in Hugging Face terms, the one place where a TP/PP layout is
checked against it, and the dtype names the configs use.

    arch = ModelArch(num_layers=30, hidden_size=576, ...)      # or models.hf_mapping.arch_from_hf_config(dir)
    check_layout(arch, tp=2, pp=2, role="teacher")             # ValueError naming the field and the fix
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# The dtype names every config section accepts, and their size in bytes. (No torch import here: `tropd plan`
# and the config checks stay light.)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def torch_dtype(name: str):
    """The torch dtype of a config dtype name (ValueError naming the valid names otherwise)."""
    import torch

    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_BYTES)}")
    return getattr(torch, name)


@dataclass(frozen=True)
class ModelArch:
    """A decoder-only transformer (Llama family: RMSNorm, SwiGLU, RoPE, GQA)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # = num_key_value_heads
    ffn_hidden_size: int
    vocab_size: int  # embedding rows of the checkpoint (>= the tokenizer's vocabulary); padded at build time
    max_position_embeddings: int = 4096
    kv_channels: int | None = None  # head_dim; None = hidden / heads
    norm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    rope_scaling: dict | None = None  # HF rope_scaling dict (llama3 type supported)
    tie_word_embeddings: bool = False
    add_qkv_bias: bool = False  # Qwen2
    qk_layernorm: bool = False  # Qwen3
    architecture: str = "LlamaForCausalLM"
    make_vocab_size_divisible_by: int = 128
    pad_vocab_to: int = 0  # build at least this many embedding rows (aligns two models' vocabulary shards)

    def padded_vocab_size(self, tp_size: int) -> int:
        """Embedding rows at build time: max(vocab_size, pad_vocab_to) rounded up to a multiple of
        make_vocab_size_divisible_by * TP (megatron convention)."""
        multiple = self.make_vocab_size_divisible_by * tp_size
        return ((max(self.vocab_size, self.pad_vocab_to) + multiple - 1) // multiple) * multiple

    def replace(self, **changes) -> "ModelArch":
        return dataclasses.replace(self, **changes)


def head_dim(arch: ModelArch) -> int:
    return arch.kv_channels or arch.hidden_size // arch.num_attention_heads


def align_vocab_padding(*archs: ModelArch) -> tuple[ModelArch, ...]:
    """The same archs, all padded to the largest row count: models that share a tokenizer but pad their embeddings
    differently (Qwen2.5-1.5B: 151936 rows, Qwen2.5-7B: 152064) then get identical vocabulary shards at every TP,
    so shard-wise KL between them lines up. The padding rows are excluded from every op by the real vocabulary."""
    rows = max(max(a.vocab_size, a.pad_vocab_to) for a in archs)
    return tuple(a.replace(pad_vocab_to=rows) for a in archs)


def check_layout(arch: ModelArch, tp: int, pp: int, role: str = "model") -> None:
    """Clear errors for TP/PP sizes that cannot hold `arch` (raised before any model is built)."""
    if tp < 1 or pp < 1:
        raise ValueError(f"{role}: tensor/pipeline parallel sizes must be >= 1, got tp={tp} pp={pp}")
    if arch.num_attention_heads % tp:
        raise ValueError(f"{role}: tensor parallel size {tp} does not divide num_attention_heads="
                         f"{arch.num_attention_heads}; choose a TP that divides it")
    if arch.num_query_groups % tp:
        raise ValueError(f"{role}: tensor parallel size {tp} does not divide num_key_value_heads="
                         f"{arch.num_query_groups}; choose a TP that divides it")
    if arch.num_layers % pp:
        raise ValueError(f"{role}: pipeline parallel size {pp} does not divide num_hidden_layers={arch.num_layers}; "
                         f"choose a PP that divides it")
