"""Rollout throughput on CPU: EmbeddedEngine (own batched loop) vs per-request loop vs HF `generate`.

    python tools/bench_rollout.py tiny                 # random tiny Llama (seconds)
    python tools/bench_rollout.py smollm2 [WORK_DIR]   # SmolLM2-135M 6-layer student (materialises it; ~1 min)

Prints wall and process CPU time (CPU time is the fair figure on a shared machine) and generated tokens per
CPU-second (all rows generate the full max_new_tokens: no stop ids).
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, ".")
from megatron_tropd.rollout.base import GenerationRequest, SamplingParams  # noqa: E402
from megatron_tropd.rollout.embedded import EmbeddedEngine  # noqa: E402


def _requests(batch: int, vocab: int, prompt_len: int) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(0)
    return [GenerationRequest(prompt_ids=tuple(torch.randint(3, vocab, (prompt_len + (i % 5) * 4,), generator=g).tolist()),
                              request_id=i) for i in range(batch)]


def bench(model, batch: int, new: int, prompt_len: int, label: str, hf_generate: bool = True, single: int = 4) -> None:
    vocab = model.config.vocab_size
    reqs = _requests(batch, vocab, prompt_len)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=new)
    eng = EmbeddedEngine(model, max_batch_size=batch)
    eng.generate(reqs[:2], SamplingParams(max_new_tokens=2))  # warm-up
    t, c = time.perf_counter(), time.process_time()
    out = eng.generate(reqs, params)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    n_tok = sum(len(s.response_ids) for x in out for s in x)
    print(f"{label}: embedded batched  b={batch} new={new}: {dt:6.2f} s wall, {dc:6.2f} s CPU, "
          f"{n_tok / dc:8.0f} tok/CPU-s")
    one = EmbeddedEngine(model, max_batch_size=1)
    k = min(batch, single)
    t, c = time.perf_counter(), time.process_time()
    one.generate(reqs[:k], params)
    dt1, dc1 = (time.perf_counter() - t) * batch / k, (time.process_time() - c) * batch / k
    print(f"{label}: embedded per-request b=1 (x{batch} extrapolated from {k}): {dt1:6.2f} s wall, {dc1:6.2f} s CPU, "
          f"{n_tok / dc1:8.0f} tok/CPU-s")
    if hf_generate:
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.zeros((batch, width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(reqs):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        t, c = time.perf_counter(), time.process_time()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=0.95,
                           max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        dt2, dc2 = time.perf_counter() - t, time.process_time() - c
        print(f"{label}: HF generate       b={batch} new={new}: {dt2:6.2f} s wall, {dc2:6.2f} s CPU, "
              f"{batch * new / dc2:8.0f} tok/CPU-s")


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))  # 2 cores shared: 1 avoids spin-waits
    which = sys.argv[1] if len(sys.argv) > 1 else "tiny"
    if which == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        bench(LlamaForCausalLM(cfg).eval(), batch=16, new=64, prompt_len=32, label="tiny-llama")
    else:
        from megatron_tropd.models.builtin import make_layer_subset_student, materialize_smollm2
        from transformers import AutoModelForCausalLM

        work = sys.argv[2] if len(sys.argv) > 2 else "/tmp/tropd_bench"
        t = time.perf_counter()
        teacher_dir = materialize_smollm2(f"{work}/smollm2")
        student_dir = make_layer_subset_student(teacher_dir, f"{work}/student6", keep_every=5)
        print(f"materialise: {time.perf_counter() - t:.1f} s")
        student = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32).eval()
        new = int(os.environ.get("BENCH_NEW", "128"))
        bench(student, batch=16, new=new, prompt_len=64, label="smollm2-student6", hf_generate=True, single=int(os.environ.get("BENCH_SINGLE", "2")))


if __name__ == "__main__":
    main()
