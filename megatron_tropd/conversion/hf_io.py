"""HF safetensors checkpoints in and out of a (TP/PP-sharded) megatron GPTModel.

- `SafetensorsReader`: lazy reads of a (sharded) safetensors checkpoint.
- `load_hf_checkpoint_into_model`: only this pipeline stage's tensors, sharded for this TP rank.
- `iter_hf_tensors`: the streamed export (the rollout weight sync uses it too).
- `export_hf_checkpoint`: safetensors shards + config + tokenizer, written atomically.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from megatron_tropd.atomic import fresh_tmp, publish
from megatron_tropd.models.arch import ModelArch
from megatron_tropd.models.hf_mapping import (
    EMBEDDING, OUTPUT, TOKENIZER_FILES, combine, hf_config_from_arch, hf_sources, megatron_to_hf,
)


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
    from megatron_tropd.models.sharding import fit_vocab_rows, local_parameters, shard

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
    from megatron_tropd.models.sharding import iter_full_tensors

    return megatron_to_hf(iter_full_tensors(model, groups), arch)


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
            tmp = fresh_tmp(out_dir)
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
                publish(tmp, out_dir, overwrite)
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


