"""Hugging Face <-> megatron-core mapping (Llama / SmolLM2, Qwen2, Qwen3): configs, names and tensors, with no
files and no process groups (those are in `conversion.hf_io` and `conversion.megatron_io`).

1. Config: `arch_from_hf_config(path_or_dict) -> ModelArch`, `hf_config_from_arch(arch) -> dict`.
2. Names and tensors, no process groups: `hf_to_megatron(hf_tensors, arch)` yields megatron "full" tensors
   (TP=1 PP=1 layout, global layer numbers, names as in `sharding.py`); `megatron_to_hf(full_iter, arch)` yields
   (hf_name, tensor) pairs, one megatron tensor at a time (megatron's fused tensors already hold everything a
   layer's split needs, so nothing is buffered).

megatron's fused QKV (`linear_qkv`, output rows) is grouped per query (KV) group g = 0..ng-1:
    [q heads g*np/ng .. (g+1)*np/ng - 1 (hn rows each); k_g (hn rows); v_g (hn rows)]
(see `SelfAttention.get_query_key_value_tensors`: "q1 q2 k1 v1 | q3 q4 k2 v2 | ..."), so a TP rank's contiguous
row slice holds whole groups. `linear_fc1` is [gate; up] (SwiGLU, `partition_stride=2`).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from megatron_tropd.models.arch import ModelArch, head_dim

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
ARCH_FILE = "tropd_arch.json"  # ModelArch as JSON, beside a megatron checkpoint
HF_SUBDIR = "hf"  # the source HF config.json + tokenizer files, beside a megatron checkpoint
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"

# ---------------------------------------------------------------------------------------------- 1. config


def _load_config(path_or_dict) -> dict:
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no HF config at {path}: pass a checkpoint directory holding config.json")
    return json.loads(path.read_text())


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either transformers 5.x `rope_parameters` or 4.x `rope_theta` + `rope_scaling`."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {}) or None
    theta = params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    if params.get("rope_type", params.get("type", "default")) != "default":
        scaling = params
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, llama3)")
        else:
            scaling = {"rope_type": "llama3", "factor": float(scaling["factor"]),
                       "low_freq_factor": float(scaling.get("low_freq_factor", 1.0)),
                       "high_freq_factor": float(scaling.get("high_freq_factor", 4.0)),
                       "original_max_position_embeddings": int(scaling.get("original_max_position_embeddings", 8192))}
    return float(theta), scaling


def config_vocab_size(model_dir) -> int | None:
    """The logit rows of an HF checkpoint dir (config.json `vocab_size`, or its `text_config`'s); None when the dir
    or the key is not readable here (e.g. a server's model_path on another machine)."""
    cfg = Path(model_dir) / "config.json" if model_dir else None
    if cfg is None or not cfg.is_file():
        return None
    c = json.loads(cfg.read_text())
    v = c.get("vocab_size", (c.get("text_config") or {}).get("vocab_size"))
    return int(v) if v else None


def arch_from_hf_config(path_or_dict, make_vocab_size_divisible_by: int = 128) -> ModelArch:
    """The `ModelArch` of an HF Llama / Qwen2 / Qwen3 config.json (a dict, a file, or a checkpoint directory)."""
    cfg = _load_config(path_or_dict)
    archs = cfg.get("architectures") or []
    arch_name = archs[0] if archs else {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                         "qwen3": "Qwen3ForCausalLM"}.get(cfg.get("model_type", ""), "")
    if arch_name not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch_name or cfg.get('model_type') or 'unknown'!r} "
            f"(architectures={archs}); supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    required = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in required if cfg.get(k) is None]
    if missing:
        raise ValueError(f"HF config for {arch_name} lacks required fields {missing}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{arch_name}: hidden_act={cfg['hidden_act']!r} is not supported (only silu / SwiGLU)")
    if cfg.get("mlp_bias"):
        raise ValueError(f"{arch_name}: mlp_bias=true is not supported")
    if arch_name == "Qwen2ForCausalLM" or arch_name == "Qwen3ForCausalLM":
        if cfg.get("use_sliding_window"):
            raise ValueError(f"{arch_name}: use_sliding_window=true is not supported")
    qkv_bias = True if arch_name == "Qwen2ForCausalLM" else bool(cfg.get("attention_bias", False))
    if cfg.get("attention_bias") and arch_name != "Qwen2ForCausalLM":
        raise ValueError(f"{arch_name}: attention_bias=true is not supported (o_proj bias has no megatron slot here)")
    heads = int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or int(cfg["hidden_size"]) // heads
    theta, scaling = _rope(cfg)
    return ModelArch(
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=int(cfg["hidden_size"]),
        num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        ffn_hidden_size=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        kv_channels=int(head_dim),
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        rotary_base=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        add_qkv_bias=qkv_bias,
        qk_layernorm=arch_name == "Qwen3ForCausalLM",
        architecture=arch_name,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
    )


def hf_config_from_arch(arch: ModelArch) -> dict:
    """A minimal HF config.json for `arch` (used when no source config was kept)."""
    model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
    rope = {"rope_type": "default", "rope_theta": arch.rotary_base}
    if arch.rope_scaling:
        rope = {**arch.rope_scaling, "rope_theta": arch.rotary_base}
    return {
        "architectures": [arch.architecture], "model_type": model_type[arch.architecture],
        "num_hidden_layers": arch.num_layers, "hidden_size": arch.hidden_size,
        "num_attention_heads": arch.num_attention_heads, "num_key_value_heads": arch.num_query_groups,
        "intermediate_size": arch.ffn_hidden_size, "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.max_position_embeddings, "head_dim": arch.kv_channels,
        "rms_norm_eps": arch.norm_epsilon, "rope_theta": arch.rotary_base, "rope_parameters": rope,
        "tie_word_embeddings": arch.tie_word_embeddings, "hidden_act": "silu",
        "attention_bias": arch.add_qkv_bias and arch.architecture != "Qwen2ForCausalLM", "torch_dtype": "float32",
    }


def arch_to_json(arch: ModelArch) -> str:
    return json.dumps(dataclasses.asdict(arch), indent=2, sort_keys=True)


def arch_from_json(text: str) -> ModelArch:
    return ModelArch(**json.loads(text))


# ---------------------------------------------------------------------------------------------- 2. names


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    """HF q [np*hn, ...], k/v [ng*hn, ...] -> megatron linear_qkv [ng*(np/ng+2)*hn, ...] (per group: q.., k, v)."""
    ng, hn = arch.num_query_groups, head_dim(arch)
    per = arch.num_attention_heads // ng
    rest = q.shape[1:]
    q = q.reshape(ng, per * hn, *rest)
    k = k.reshape(ng, hn, *rest)
    v = v.reshape(ng, hn, *rest)
    return torch.cat([q, k, v], dim=1).reshape(ng * (per + 2) * hn, *rest)


def split_qkv(qkv: torch.Tensor, arch: ModelArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`."""
    ng, hn = arch.num_query_groups, head_dim(arch)
    per = arch.num_attention_heads // ng
    rest = qkv.shape[1:]
    grouped = qkv.reshape(ng, (per + 2) * hn, *rest)
    q, k, v = grouped.split([per * hn, hn, hn], dim=1)
    return (q.reshape(ng * per * hn, *rest).contiguous(), k.reshape(ng * hn, *rest).contiguous(),
            v.reshape(ng * hn, *rest).contiguous())


# Per-layer table: megatron suffix (local spec) -> (TE-spec suffix, HF suffixes fused into it).
_LAYER_MAP: dict[str, tuple[str, tuple[str, ...]]] = {
    "input_layernorm.weight": ("self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.weight": ("self_attention.linear_qkv.weight",
                                         ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                          "self_attn.v_proj.weight")),
    "self_attention.linear_qkv.bias": ("self_attention.linear_qkv.bias",
                                       ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")),
    "self_attention.q_layernorm.weight": ("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",)),
    "self_attention.k_layernorm.weight": ("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",)),
    "self_attention.linear_proj.weight": ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
    "pre_mlp_layernorm.weight": ("mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",)),
}
_TE_TO_LOCAL = {te: local for local, (te, _) in _LAYER_MAP.items()}
_GLOBAL_MAP = {EMBEDDING: ("model.embed_tokens.weight",), FINAL_NORM: ("model.norm.weight",),
               OUTPUT: ("lm_head.weight",)}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def megatron_names(arch: ModelArch, te: bool = False) -> list[str]:
    """Every megatron full-tensor name of `arch` (local or Transformer Engine spec), in model order."""
    names = [EMBEDDING]
    for i in range(arch.num_layers):
        for local, (te_name, _) in _LAYER_MAP.items():
            if local.endswith(".bias") and not arch.add_qkv_bias:
                continue
            if "q_layernorm" in local or "k_layernorm" in local:
                if not arch.qk_layernorm:
                    continue
            names.append(f"decoder.layers.{i}.{te_name if te else local}")
    names.append(FINAL_NORM)
    if not arch.tie_word_embeddings:
        names.append(OUTPUT)
    return names


def hf_sources(name: str, arch: ModelArch) -> tuple[str, ...]:
    """The HF tensor names that make the megatron tensor `name` (local or TE name, global layer number)."""
    if name in _GLOBAL_MAP:
        if name == OUTPUT and arch.tie_word_embeddings:
            return _GLOBAL_MAP[EMBEDDING]
        return _GLOBAL_MAP[name]
    m = _LAYER_RE.match(name)
    if not m:
        raise KeyError(f"no HF mapping for megatron tensor {name!r}")
    layer, suffix = m.groups()
    local = _TE_TO_LOCAL.get(suffix, suffix)
    if local not in _LAYER_MAP:
        raise KeyError(f"no HF mapping for megatron tensor {name!r}")
    return tuple(f"model.layers.{layer}.{s}" for s in _LAYER_MAP[local][1])


def combine(name: str, parts: list[torch.Tensor], arch: ModelArch, padded_vocab: int | None = None) -> torch.Tensor:
    """The megatron full tensor `name` from its HF `parts` (in `hf_sources` order): QKV and gate/up fusion, vocab
    padding with zero rows to `padded_vocab` (default: padding for TP=1)."""
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        return fuse_qkv(*parts, arch)
    if name.endswith("linear_fc1.weight"):
        return torch.cat(parts, dim=0)
    (t,) = parts
    if name in (EMBEDDING, OUTPUT):
        rows = padded_vocab or arch.padded_vocab_size(1)
        if t.shape[0] != arch.vocab_size:
            raise ValueError(f"{name}: HF tensor has {t.shape[0]} rows but config vocab_size={arch.vocab_size}")
        t = torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
    return t


def hf_to_megatron(hf_tensors: Mapping[str, torch.Tensor], arch: ModelArch, te: bool = False,
                   padded_vocab: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron name, full tensor) for every tensor of `arch`, read one at a time from the mapping `hf_tensors`
    (a dict, or a lazy `SafetensorsReader`). `dict(hf_to_megatron(...))` is the full megatron state dict."""
    for name in megatron_names(arch, te):
        sources = hf_sources(name, arch)
        missing = [s for s in sources if s not in hf_tensors]
        if missing:
            raise KeyError(f"HF checkpoint lacks {missing} needed for megatron tensor {name}")
        yield name, combine(name, [hf_tensors[s] for s in sources], arch, padded_vocab)


def split_megatron_tensor(name: str, tensor: torch.Tensor, arch: ModelArch) -> list[tuple[str, torch.Tensor]]:
    """The HF (name, tensor) pairs held in one megatron full tensor (vocab padding stripped; a tied output layer
    yields nothing, HF keeps only the embedding)."""
    if name == OUTPUT and arch.tie_word_embeddings:
        return []
    sources = hf_sources(name, arch)
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        return list(zip(sources, split_qkv(tensor, arch)))
    if name.endswith("linear_fc1.weight"):
        return list(zip(sources, tensor.chunk(2, dim=0)))
    if name in (EMBEDDING, OUTPUT):
        tensor = tensor[: arch.vocab_size]
    return [(sources[0], tensor)]


def megatron_to_hf(full_tensors: Iterable[tuple[str, torch.Tensor]], arch: ModelArch
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (hf_name, tensor) from a stream of megatron full tensors (e.g. `sharding.iter_full_tensors`).
    Each megatron tensor is converted as it arrives: a fused QKV / fc1 tensor already holds a whole split."""
    for name, tensor in full_tensors:
        yield from split_megatron_tensor(name, tensor, arch)
