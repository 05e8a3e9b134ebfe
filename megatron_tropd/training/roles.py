"""The two models of a distillation run, built from HF checkpoints in the same TP/PP layout.

- `Student`: trainable GPTModel wrapped in megatron-core DDP, with megatron-core's optimizer (Adam, grad clipping,
  optional distributed optimizer, GPU or CPU/gloo) and `OptimizerParamScheduler` (warmup, constant/cosine/linear
  decay).
- `Teacher`: frozen GPTModel (eval mode, requires_grad False, no DDP, no optimizer state, no grad buffers).
Both use `calculate_per_token_loss=True`: megatron does not rescale our (already globally normalised) loss and
DDP sums gradients over data-parallel ranks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from megatron_tropd.distributed import cpu_compat
from megatron_tropd.models.arch import ModelArch, torch_dtype
from megatron_tropd.models.gpt import BuildOptions, build_gpt_model
from megatron_tropd.distributed.parallel import ParallelGroups

def build_options(dtype: str, recompute: bool = False, sequence_parallel: bool = False) -> BuildOptions:
    return BuildOptions(params_dtype=torch_dtype(dtype), recompute_activations=recompute,
                        sequence_parallel=sequence_parallel, extra_config={"calculate_per_token_loss": True})


@dataclass
class Teacher:
    model: torch.nn.Module
    arch: ModelArch


@dataclass
class Student:
    model: torch.nn.Module  # megatron DDP wrapper; `.module` is the GPTModel
    arch: ModelArch
    optimizer: object
    scheduler: object

    @property
    def gpt(self):
        return self.model.module


WeightLoader = Callable[[torch.nn.Module], None]


def hf_loader(hf_dir: str | Path, arch: ModelArch, groups: ParallelGroups) -> WeightLoader:
    """Load this rank's shards of an HF safetensors checkpoint into a freshly built GPTModel."""
    from megatron_tropd.conversion.hf_io import load_hf_checkpoint_into_model

    return lambda model: load_hf_checkpoint_into_model(model, hf_dir, arch, groups)


def build_teacher(arch: ModelArch, groups: ParallelGroups, load: WeightLoader | None, dtype: str = "float32",
                  sequence_parallel: bool = False) -> Teacher:
    model = build_gpt_model(arch, groups, build_options(dtype, sequence_parallel=sequence_parallel))
    if load is not None:
        load(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model, arch)


def build_student(arch: ModelArch, groups: ParallelGroups, load: WeightLoader | None, optim, total_updates: int,
                  dtype: str = "float32", recompute: bool = False, sequence_parallel: bool = False,
                  use_distributed_optimizer: bool = False) -> Student:
    """`optim` is a config.OptimConfig; `total_updates` the number of optimizer steps of the run."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    model = build_gpt_model(arch, groups, build_options(dtype, recompute, sequence_parallel))
    if load is not None:
        load(model)  # before DDP wrapping: DDP and the optimizer take the loaded values as they are
    config = model.config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=True, bucket_size=None,
    )
    model = DistributedDataParallel(config, ddp_config, model)
    config.finalize_model_grads_func = finalize_model_grads
    bf16, fp16 = dtype == "bfloat16", dtype == "float16"
    with cpu_compat.cuda_tensor_type_names():  # megatron's optimizers check param.type() for CUDA type names
        optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad, bf16=bf16, fp16=fp16, params_dtype=torch_dtype(dtype),
            use_distributed_optimizer=use_distributed_optimizer,
        ), [model])
    decay_steps = max(total_updates - optim.warmup_steps, 1)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if optim.warmup_steps else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps, lr_decay_steps=optim.warmup_steps + decay_steps,
        lr_decay_style=optim.lr_schedule, start_wd=optim.weight_decay, end_wd=optim.weight_decay,
        wd_incr_steps=1, wd_incr_style="constant",
    )
    return Student(model, arch, optimizer, scheduler)


def check_vocab_compatible(student_dir: str | Path, teacher_dir: str | Path, student: ModelArch,
                           teacher: ModelArch, tokenizer_size: int) -> int:
    """The real vocabulary shared by student and teacher: the tokenizer's size. Both must have the same tokenizer
    files (or identical vocabularies) and at least that many embedding rows; their row counts may differ (padding
    is excluded everywhere and `models.arch.align_vocab_padding` aligns their shards). Raises ValueError."""
    _check_same_tokenizer(student_dir, teacher_dir)
    for role, arch, where in (("student", student, student_dir), ("teacher", teacher, teacher_dir)):
        if arch.vocab_size < tokenizer_size:
            raise ValueError(f"{role} {where}: config.json vocab_size={arch.vocab_size} is smaller than the shared "
                             f"tokenizer's {tokenizer_size} tokens; the {role} cannot score every token id")
    return tokenizer_size


def _check_same_tokenizer(student_dir: str | Path, teacher_dir: str | Path) -> None:
    files = ("tokenizer.json", "vocab.json", "tokenizer.model")
    for name in files:
        a, b = Path(student_dir) / name, Path(teacher_dir) / name
        if a.is_file() and b.is_file():
            if a.read_bytes() == b.read_bytes():
                return
            if name == "tokenizer.json":
                va = json.loads(a.read_text()).get("model", {}).get("vocab")
                vb = json.loads(b.read_text()).get("model", {}).get("vocab")
                if va is not None and va == vb:
                    return
            raise ValueError(f"student and teacher tokenizers differ ({a} vs {b}); distillation needs one "
                             f"shared vocabulary (same token ids for the same strings)")
    raise ValueError(f"cannot verify that student ({student_dir}) and teacher ({teacher_dir}) share a tokenizer: "
                     f"neither has any of {files}")
