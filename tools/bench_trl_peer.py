#!/usr/bin/env python
"""The TRL side of tools/bench_step.py: one TRL on-policy distillation trainer, timed per optimizer step.

Runs inside the benchmark's own virtualenv (.venv-trl, made by `python tools/bench_step.py --setup-trl`) and imports
only torch / transformers / datasets / trl: it is a benchmark peer, never a dependency of megatron-tropd.

    .venv-trl/bin/python tools/bench_trl_peer.py --spec SPEC.json --out OUT.json

SPEC (written by bench_step.py): trainer ("gkd" | "distillation"), student_dir, teacher_dir, steps (per optimizer
step: the sequences of that step, each {"prompt_ids", "text", "answer"}; a prompt appears once per sample),
micro_batch, max_new_tokens, temperature, beta, lr, clip_grad, seed, threads, eos_token_ids.

OUT: per step the wall time between consecutive optimizer steps (`on_step_end` callbacks; step 1 from
`on_train_begin`) and the process CPU time over it, its phases in both clocks (rollout = the student's
`generate`, teacher_forward = the teacher's no-grad forwards, update = the rest: student forward + loss + backward
+ optimizer + loop overhead), and per `generate` call the shapes needed to count FLOPs (rows, prompt width,
new-token width, per-row prompt / completion lengths).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path


class Timeline:
    """Per-step phase seconds and generate-call shapes, filled by wrappers around the models' methods."""

    def __init__(self, eos_ids: list[int]):
        self.eos_ids = set(eos_ids)
        self.steps: list[dict] = []
        self._phases: dict[str, float] = {}
        self._phases_cpu: dict[str, float] = {}
        self._calls: list[dict] = []
        self._depth: dict[str, int] = {}
        self._t_last = self._c_last = None

    def timed(self, phase: str, fn, record_generate: bool = False):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            outer = self._depth.get(phase, 0) == 0  # count nested calls (forward -> forward) once
            self._depth[phase] = self._depth.get(phase, 0) + 1
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                out = fn(*args, **kwargs)
            finally:
                self._depth[phase] -= 1
            if outer:
                self._phases[phase] = self._phases.get(phase, 0.0) + time.perf_counter() - t0
                self._phases_cpu[phase] = self._phases_cpu.get(phase, 0.0) + time.process_time() - c0
                if record_generate:
                    self._record_generate(kwargs, out)
            return out

        return wrapper

    def _record_generate(self, kwargs: dict, out) -> None:
        import torch

        ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        seqs = out.sequences if hasattr(out, "sequences") else out
        width = ids.shape[1]
        new = seqs[:, width:]
        lens = []
        for row in new.tolist():
            n = len(row)
            for j, t in enumerate(row):
                if t in self.eos_ids:
                    n = j + 1  # the EOS is a response token (both trainers train on it)
                    break
            lens.append(n)
        prompt_lens = (mask.sum(-1) if mask is not None else torch.full((ids.shape[0],), width)).tolist()
        self._calls.append({"rows": int(ids.shape[0]), "prompt_width": int(width), "new_width": int(new.shape[1]),
                            "prompt_lens": [int(x) for x in prompt_lens], "completion_lens": lens})

    def begin(self) -> None:
        self._t_last, self._c_last = time.perf_counter(), time.process_time()

    def end_step(self) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        step_s, cpu_s = now - self._t_last, cpu - self._c_last
        self._t_last, self._c_last = now, cpu
        split = []
        for sec, total in ((self._phases, step_s), (self._phases_cpu, cpu_s)):
            ph = {"rollout": sec.get("rollout", 0.0), "teacher_forward": sec.get("teacher", 0.0)}
            ph["update"] = max(total - ph["rollout"] - ph["teacher_forward"], 0.0)
            split.append(ph)
        phases, phases_cpu = split
        self.steps.append({"step_s": step_s, "cpu_s": cpu_s, "phases": phases, "phases_cpu": phases_cpu,
                           "generate_calls": self._calls,
                           "response_tokens": sum(sum(c["completion_lens"]) for c in self._calls)})
        self._phases, self._phases_cpu, self._calls = {}, {}, []


def _common_args(spec: dict, out_dir: str, n_steps: int) -> dict:
    mb = spec["micro_batch"]
    per_step = len(spec["steps"][0])
    if per_step % mb:
        raise SystemExit(f"bench_trl_peer: {per_step} sequences per step is not a multiple of micro_batch={mb}")
    return dict(
        output_dir=out_dir, max_steps=n_steps, per_device_train_batch_size=mb,
        gradient_accumulation_steps=per_step // mb, learning_rate=spec["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_grad_norm=spec["clip_grad"], bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no",
        dataloader_num_workers=0, seed=spec["seed"], disable_tqdm=True, temperature=spec["temperature"],
        beta=spec["beta"],
        optim="adamw_torch",  # = megatron-core's optimizer without apex / Transformer Engine: torch.optim.AdamW
        train_sampling_strategy="sequential",  # each optimizer step gets the sequences assigned to it, in order
    )


def build_distillation(spec: dict, out_dir: str, student, teacher, tokenizer):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    rows = [seq for step in spec["steps"] for seq in step]
    for seq in rows:  # the trainer tokenizes text prompts itself: it must see exactly our prompt tokens
        ids = tokenizer(text=seq["text"])["input_ids"]
        if ids != seq["prompt_ids"]:
            raise SystemExit(f"bench_trl_peer: DistillationTrainer would tokenize the prompt to {ids[:8]}... "
                             f"({len(ids)} tokens), not the benchmark's {seq['prompt_ids'][:8]}... "
                             f"({len(seq['prompt_ids'])}); the two sides would not do the same work")
    args = DistillationConfig(**_common_args(spec, out_dir, len(spec["steps"])), top_p=1.0, top_k=0,
                              max_completion_length=spec["max_new_tokens"], shuffle_dataset=False,
                              disable_dropout=True, use_vllm=False, log_completions=False)
    data = Dataset.from_list([{"prompt": seq["text"]} for seq in rows])
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                               processing_class=tokenizer)


def build_gkd(spec: dict, out_dir: str, student, teacher, tokenizer):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = [seq for step in spec["steps"] for seq in step]
    args = GKDConfig(**_common_args(spec, out_dir, len(spec["steps"])), lmbda=1.0, seq_kd=False,
                     max_new_tokens=spec["max_new_tokens"], disable_dropout=True, packing=False)
    # The collator takes the prompt as the tokens before the first completion_mask 1: exactly our prompt ids. The
    # reference completion (the task's answer) is replaced by the student's own sample (lmbda = 1); it only sets
    # the token count GKD normalises its loss by (the count of the replaced labels, a GKD quirk; no cost).
    data = []
    for seq in rows:
        ref = tokenizer(text=str(seq["answer"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        data.append({"prompt": seq["text"], "input_ids": seq["prompt_ids"] + ref,
                     "completion_mask": [0] * len(seq["prompt_ids"]) + [1] * len(ref)})
    return GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(data),
                      processing_class=tokenizer)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    spec = json.loads(Path(a.spec).read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["student_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    t_load = time.perf_counter()
    student = AutoModelForCausalLM.from_pretrained(spec["student_dir"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher_dir"], dtype=torch.float32)
    build = {"gkd": build_gkd, "distillation": build_distillation}[spec["trainer"]]
    timeline = Timeline(spec["eos_token_ids"])

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            timeline.begin()

        def on_step_end(self, args, state, control, **kw):
            timeline.end_step()

    with tempfile.TemporaryDirectory(prefix="bench_trl_") as out_dir:
        trainer = build(spec, out_dir, student, teacher, tokenizer)
        load_s = time.perf_counter() - t_load
        trainer.add_callback(StepClock())
        model = trainer.model  # the object `generate` is called on (single process, no DDP wrapper on CPU)
        model.generate = timeline.timed("rollout", model.generate, record_generate=True)
        t = trainer.teacher_model
        t.forward = timeline.timed("teacher", t.forward)  # GKD: full causal-LM forward
        t.model.forward = timeline.timed("teacher", t.model.forward)  # DistillationTrainer: backbone only
        gen_eos = trainer.generation_config.eos_token_id
        trainer.train()
    result = {
        "trainer": spec["trainer"], "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                                                 "torch": torch.__version__},
        "threads": torch.get_num_threads(), "load_s": load_s, "steps": timeline.steps,
        "generation_eos_token_ids": gen_eos if isinstance(gen_eos, list) else [gen_eos],
        "optimizer": trainer.args.optim if isinstance(trainer.args.optim, str) else str(trainer.args.optim),
        "micro_batch": spec["micro_batch"], "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
    }
    Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
