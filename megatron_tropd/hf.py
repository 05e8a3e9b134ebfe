"""Hugging Face <-> megatron-core checkpoint conversion (Llama / SmolLM2, Qwen2, Qwen3), used by the trainer and
by `tools/convert_*.py`.

Three layers, each usable on its own:
1. Config: `arch_from_hf_config(path_or_dict) -> ModelArch`, `hf_config_from_arch(arch) -> dict`.
2. Names and tensors, no process groups: `hf_to_megatron(hf_tensors, arch)` yields megatron "full" tensors
   (TP=1 PP=1 layout, global layer numbers, names as in `sharding.py`); `megatron_to_hf(full_iter, arch)` yields
   (hf_name, tensor) pairs, one megatron tensor at a time (megatron's fused tensors already hold everything a
   layer's split needs, so nothing is buffered).
3. Files and ranks: `load_hf_checkpoint_into_model` (lazy safetensors reads, only this stage's tensors),
   `iter_hf_tensors` (the streamed export the rollout weight sync also uses), `export_hf_checkpoint`
   (safetensors shards + config + tokenizer, atomic), and megatron-core distributed checkpoints
   `save_megatron_checkpoint` / `load_megatron_checkpoint` (atomic, loadable at another TP/PP).

megatron's fused QKV (`linear_qkv`, output rows) is grouped per query (KV) group g = 0..ng-1:
    [q heads g*np/ng .. (g+1)*np/ng - 1 (hn rows each); k_g (hn rows); v_g (hn rows)]
(see `SelfAttention.get_query_key_value_tensors`: "q1 q2 k1 v1 | q3 q4 k2 v2 | ..."), so a TP rank's contiguous
row slice holds whole groups. `linear_fc1` is [gate; up] (SwiGLU, `partition_stride=2`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from megatron_tropd import cpu_compat
from megatron_tropd.models import ModelArch

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


def check_parallel_sizes(arch: ModelArch, tp: int, pp: int) -> None:
    """Clear errors for TP/PP sizes that cannot hold `arch` (raised before any rank is started)."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor/pipeline parallel sizes must be >= 1, got tp={tp} pp={pp}")
    if arch.num_attention_heads % tp:
        raise ValueError(f"tensor parallel size {tp} does not divide num_attention_heads={arch.num_attention_heads}; "
                         f"choose a TP that divides it")
    if arch.num_query_groups % tp:
        raise ValueError(f"tensor parallel size {tp} does not divide num_key_value_heads={arch.num_query_groups}; "
                         f"choose a TP that divides it")
    if arch.num_layers % pp:
        raise ValueError(f"pipeline parallel size {pp} does not divide num_hidden_layers={arch.num_layers}")


# ---------------------------------------------------------------------------------------------- 2. names


def head_dim(arch: ModelArch) -> int:
    return arch.kv_channels or arch.hidden_size // arch.num_attention_heads


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


# ---------------------------------------------------------------------------------------------- 3. files, ranks


class SafetensorsReader(Mapping):
    """A read-only name -> tensor mapping over an HF checkpoint directory's *.safetensors files; tensors are read
    from disk only when looked up (so a rank reads only what its pipeline stage needs)."""

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {self.dir} (only safetensors checkpoints are read)")
        self._handles = {f: safe_open(str(f), framework="pt") for f in files}
        self._where = {k: f for f, h in self._handles.items() for k in h.keys()}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def uses_te_names(model) -> bool:
    return any(n.endswith("layer_norm_weight") for n, _ in model.named_parameters())


@torch.no_grad()
def load_hf_checkpoint_into_model(model, hf_dir: str | Path, arch: ModelArch, groups) -> None:
    """Copy an HF safetensors checkpoint into this rank's shards of `model` (built by `build_gpt_model(arch)`).
    Reads lazily: each rank reads only the HF tensors its own parameters (stage, and within it its TP shard's
    full tensors) are made of, one megatron tensor at a time."""
    from megatron_tropd.sharding import fit_vocab_rows, local_parameters, shard

    reader = SafetensorsReader(hf_dir)
    for name, param in local_parameters(model, groups):
        sources = hf_sources(name, arch)
        missing = [s for s in sources if s not in reader]
        if missing:
            raise KeyError(f"{hf_dir}: lacks {missing} needed for megatron tensor {name}")
        full = combine(name, [reader[s] for s in sources], arch, padded_vocab=param.shape[0] * groups.tp_size
                       if name in (EMBEDDING, OUTPUT) else None)
        if name in (EMBEDDING, OUTPUT):
            full = fit_vocab_rows(full, param.shape[0] * groups.tp_size)
        local = shard(full, param, groups.tp_rank, groups.tp_size)
        if tuple(local.shape) != tuple(param.shape):
            raise ValueError(f"{name}: HF tensors give a shard of shape {tuple(local.shape)}, the model has "
                             f"{tuple(param.shape)}: the config does not match the weights")
        param.copy_(local.to(param.dtype))


def iter_hf_tensors(model, groups, arch: ModelArch) -> Iterator[tuple[str, torch.Tensor]]:
    """The whole model as (hf_name, full tensor) pairs, streamed one megatron tensor at a time across TP and PP.
    Collective over the TP x PP group (all its ranks must iterate). This is what the trainer hands to the rollout
    engines: an embedded HF model can `load_state_dict(dict(...))`, the SGLang disk path writes the stream with
    `write_safetensors_shards`."""
    from megatron_tropd.sharding import iter_full_tensors

    return megatron_to_hf(iter_full_tensors(model, groups), arch)


def _tmp_sibling(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.tmp"


def _fresh_tmp(out_dir: Path) -> Path:
    tmp = _tmp_sibling(out_dir)
    if tmp.exists():
        shutil.rmtree(tmp)  # left over by an interrupted run
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished `tmp` to `out_dir` (atomic on one filesystem); an old `out_dir` is replaced only with
    `overwrite`, and is moved aside first so a reader never sees a mixture."""
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists; remove it or pass overwrite=True")
        old = out_dir.parent / f".{out_dir.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)


def write_safetensors_shards(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path,
                             max_shard_bytes: int = 4 << 30, progress=None) -> list[str]:
    """Write a stream of (name, tensor) into HF-style shards `model-0000i-of-0000n.safetensors` (+ index json),
    or `model.safetensors` when one shard suffices; holds at most one shard in memory. Returns the file names."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf: dict[str, torch.Tensor] = {}
    size, parts, weight_map, total = 0, [], {}, 0

    def flush():
        nonlocal buf, size
        if not buf:
            return
        part = f"part-{len(parts) + 1:05d}.safetensors"
        save_file(buf, str(out_dir / part), metadata={"format": "pt"})
        parts.append((part, list(buf)))
        if progress:
            progress(f"wrote shard {len(parts)} ({size / 2**20:.1f} MiB, {len(buf)} tensors)")
        buf, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if buf and size + nbytes > max_shard_bytes:
            flush()
        buf[name] = tensor.detach().to("cpu").contiguous().clone()  # own the storage (no views of a gather)
        size += nbytes
        total += nbytes
    flush()
    if len(parts) == 1:
        os.replace(out_dir / parts[0][0], out_dir / "model.safetensors")
        return ["model.safetensors"]
    names = []
    for i, (part, keys) in enumerate(parts):
        final = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        os.replace(out_dir / part, out_dir / final)
        names.append(final)
        weight_map.update({k: final for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    src, dst = Path(src), Path(dst)
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and (f.name in TOKENIZER_FILES or f.name.startswith("tokenizer")):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def export_hf_checkpoint(model, groups, arch: ModelArch, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                         hf_config: dict | None = None, max_shard_bytes: int = 4 << 30, overwrite: bool = False,
                         dtype: torch.dtype | None = None, progress=None) -> Path | None:
    """Write the model as an HF checkpoint: streamed safetensors shards, config.json (`hf_config`, else one made
    from `arch`; with the tensors' dtype), tokenizer files from `tokenizer_dir`. Written into a temp sibling and
    renamed when complete, so `out_dir` is either absent or whole. Collective over the model-parallel group of
    data-parallel rank 0; only global rank 0 writes. Returns out_dir on the writer, None elsewhere."""
    import torch.distributed as dist

    out_dir = Path(out_dir)
    writer = groups.rank == 0
    result = None
    if groups.dp_rank == 0:
        stream = iter_hf_tensors(model, groups, arch)
        if dtype is not None:
            stream = ((n, t.to(dtype)) for n, t in stream)
        if writer:
            tmp = _fresh_tmp(out_dir)
            try:
                write_safetensors_shards(stream, tmp, max_shard_bytes, progress)
                config = dict(hf_config) if hf_config else hf_config_from_arch(arch)
                config.pop("quantization_config", None)
                # transformers 5.x reads "dtype", 4.x "torch_dtype"
                config["dtype"] = config["torch_dtype"] = str(dtype or next(model.parameters()).dtype
                                                              ).removeprefix("torch.")
                (tmp / "config.json").write_text(json.dumps(config, indent=2))
                if tokenizer_dir is not None:
                    copy_tokenizer(tokenizer_dir, tmp)
                _publish(tmp, out_dir, overwrite)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            result = out_dir
        else:
            for _ in stream:  # take part in the collectives
                pass
    if dist.is_initialized():
        dist.barrier()
    return result


# ------------------------------------------------------------------------- megatron distributed checkpoints


def _vocab_keys() -> tuple[str, str]:
    return EMBEDDING, OUTPUT


def save_megatron_checkpoint(model, ckpt_dir: str | Path, groups, arch: ModelArch | None = None,
                             hf_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Save `model` as a megatron-core distributed checkpoint (`dist_checkpointing.save` of
    `model.sharded_state_dict()`), plus `tropd_arch.json` and the HF config/tokenizer (`hf/`) when given.
    Written into a temp sibling directory and renamed by rank 0 when every rank has finished. Collective."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    tmp = _tmp_sibling(ckpt_dir)
    if groups.rank == 0:
        if ckpt_dir.exists() and not overwrite:
            raise FileExistsError(f"{ckpt_dir} exists; remove it or pass overwrite=True")
        _fresh_tmp(ckpt_dir)
    dist.barrier()
    try:
        with cpu_compat.dist_checkpoint_save():
            dist_checkpointing.save(model.sharded_state_dict(), str(tmp))
        if groups.rank == 0:
            meta = {"tensor_model_parallel_size": groups.tp_size, "pipeline_model_parallel_size": groups.pp_size,
                    "padded_vocab_size": arch.padded_vocab_size(groups.tp_size) if arch else None}
            (tmp / "tropd_meta.json").write_text(json.dumps(meta, indent=2))
            if arch is not None:
                (tmp / ARCH_FILE).write_text(arch_to_json(arch))
            if hf_dir is not None:
                (tmp / HF_SUBDIR).mkdir()
                shutil.copy2(Path(hf_dir) / "config.json", tmp / HF_SUBDIR / "config.json")
                copy_tokenizer(hf_dir, tmp / HF_SUBDIR)
        dist.barrier()
        if groups.rank == 0:
            _publish(tmp, ckpt_dir, overwrite)
    except BaseException:
        if groups.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return ckpt_dir


def load_megatron_checkpoint(model, ckpt_dir: str | Path, groups) -> None:
    """Load a checkpoint written by `save_megatron_checkpoint` at any TP/PP into `model` (built for this run's
    TP/PP). The padded vocabulary depends on TP, so when the saved embedding / output layer rows differ from this
    model's, those two tensors are read whole and re-padded (`fit_vocab_rows`) before sharding. Collective."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron_tropd.sharding import fit_vocab_rows, shard

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "metadata.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a megatron distributed checkpoint (no metadata.json)")
    saved = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    sharded = model.sharded_state_dict()
    refits = {}  # state-dict key -> (param, full placeholder)
    for key, sh in list(sharded.items()):
        if not isinstance(sh, ShardedTensor) or sh.key not in _vocab_keys() or sh.key not in saved:
            continue
        saved_shape = tuple(saved[sh.key].global_shape)
        if saved_shape == tuple(sh.global_shape):
            continue
        whole = torch.empty(saved_shape, dtype=sh.data.dtype)
        sharded[key] = ShardedTensor.from_rank_offsets(sh.key, whole, replica_id=sh.replica_id)
        refits[key] = sh.data
    loaded = dist_checkpointing.load(sharded, str(ckpt_dir))
    params = dict(model.named_parameters())
    for key, target in refits.items():
        full = fit_vocab_rows(loaded[key], target.shape[0] * groups.tp_size)
        ref = params.get(key)
        loaded[key] = shard(full, ref if ref is not None else target, groups.tp_rank, groups.tp_size).clone()
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    missing = [m for m in missing if not m.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"checkpoint {ckpt_dir} does not match the model: missing {missing[:4]}, "
                       f"unexpected {unexpected[:4]}")


def read_checkpoint_info(ckpt_dir: str | Path) -> tuple[ModelArch, dict, dict | None]:
    """(ModelArch, tropd_meta, HF config or None) stored beside a megatron checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / ARCH_FILE).is_file():
        raise FileNotFoundError(f"{ckpt_dir} lacks {ARCH_FILE}: not written by tools/convert_hf_to_megatron.py "
                                f"(or save_megatron_checkpoint(arch=...))")
    arch = arch_from_json((ckpt_dir / ARCH_FILE).read_text())
    meta_file = ckpt_dir / "tropd_meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    cfg_file = ckpt_dir / HF_SUBDIR / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else None
    return arch, meta, cfg
