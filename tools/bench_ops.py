"""Benchmark megatron_tropd.ops against gather-then-compute, forward + backward, TP ranks on CPU (gloo).

    python tools/bench_ops.py                              # T=4096, V=151936, TP=2, bf16 and fp32
    python tools/bench_ops.py --tokens 256 --vocab 8192    # quick run

For every op and dtype each rank measures, for our vocabulary-parallel op and for the baseline (all-gather the
vocabulary shards, torch.log_softmax in float32 on the full vocabulary, backward, keep this rank's slice of the
gradient), in the same run:
  - wall time of forward + backward (median of --repeat runs after the profiled warm-up run; with --repeat 0
    the profiled run itself is timed: profiling adds a few thousand events, negligible at full size);
  - peak memory allocated beyond the inputs, outputs and input gradients: the running sum of the CPU allocator's
    allocation/free events recorded by torch.profiler (profile_memory=True) over the forward + backward window,
    whose maximum is the peak of memory allocated inside the window; minus the bytes of the outputs and input
    gradients still alive at the end. Tensors allocated before the window (the inputs) are not counted.
Targets: extra memory <= 25% of the local logits shard's float32 size; time no worse than the baseline.
The baseline runs in blocks of --baseline-block tokens (gathering 4096 x 151936 float32 logits at once on two
ranks does not fit the 24 GB development machine); its time is that of the full gather either way.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_tropd import ops  # noqa: E402
from megatron_tropd.distributed.spawn import run_distributed  # noqa: E402

OPS = ("token_logprobs", "entropy", "topk_logprobs", "logprobs_at", "kl_forward", "kl_reverse", "kl_jsd")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TARGET_MEM_FRAC = 0.25


# ---------------------------------------------------------------------------------------------------------------
# The two implementations: each returns the tensors it leaves alive (outputs, input gradient)
# ---------------------------------------------------------------------------------------------------------------
def run_ours(op: str, d: dict, group) -> list[torch.Tensor]:
    kw = dict(temperature=d["temperature"], vocab_size=d["vocab_size"])
    if op == "topk_logprobs":
        return list(ops.topk_logprobs(d["s"], d["k"], group, **kw))
    x = d["s"].requires_grad_(True)
    if op == "token_logprobs":
        y = ops.token_logprobs(x, d["tokens"], group, **kw)
    elif op == "entropy":
        y = ops.entropy(x, group, **kw)
    elif op == "logprobs_at":
        y = ops.logprobs_at(x, d["ids"], group, **kw)
    else:
        y = ops.kl_divergence(x, d["t"], group, kind=op[3:], **kw)
    y.backward(d["grad_" + ("at" if op == "logprobs_at" else "tok")])
    grad, x.grad = x.grad, None
    x.requires_grad_(False)
    return [y.detach(), grad]


def _gather_vocab(x: torch.Tensor, group) -> torch.Tensor:
    """[n, v/tp] -> [n, v] (the communication our ops avoid)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _baseline_block(op: str, full_s, full_t, rows: slice, d: dict):
    vs, temp = d["vocab_size"], d["temperature"]
    ls = torch.log_softmax(full_s[:, :vs].float() / temp, dim=-1)
    if op == "token_logprobs":
        return ls.gather(-1, d["tokens"][rows].unsqueeze(-1)).squeeze(-1), d["grad_tok"][rows]
    if op == "entropy":
        return -(ls.exp() * ls).sum(-1), d["grad_tok"][rows]
    if op == "logprobs_at":
        return ls.gather(-1, d["ids"][rows]), d["grad_at"][rows]
    if op == "topk_logprobs":
        return torch.topk(ls, d["k"], dim=-1), None
    lt = torch.log_softmax(full_t[:, :vs].float() / temp, dim=-1)
    if op == "kl_forward":
        y = (lt.exp() * (lt - ls)).sum(-1)
    elif op == "kl_reverse":
        y = (ls.exp() * (ls - lt)).sum(-1)
    else:
        lm = torch.logaddexp(lt + torch.log(torch.tensor(0.5)), ls + torch.log(torch.tensor(0.5)))
        y = 0.5 * (lt.exp() * (lt - lm)).sum(-1) + 0.5 * (ls.exp() * (ls - lm)).sum(-1)
    return y, d["grad_tok"][rows]


def run_baseline(op: str, d: dict, group) -> list[torch.Tensor]:
    s, n, v_local = d["s"], d["s"].shape[0], d["s"].shape[1]
    rank, block = dist.get_rank(group), d["baseline_block"]
    outs, grad = [], (torch.empty_like(s) if op != "topk_logprobs" else None)
    for i in range(0, n, block):
        rows = slice(i, min(i + block, n))
        full_s = _gather_vocab(s[rows], group).requires_grad_(op != "topk_logprobs")
        full_t = _gather_vocab(d["t"][rows], group) if op.startswith("kl_") else None
        if op == "topk_logprobs":
            with torch.no_grad():
                (vals, ids), _ = _baseline_block(op, full_s, full_t, rows, d)
            outs.append((vals, ids))
            continue
        y, g = _baseline_block(op, full_s, full_t, rows, d)
        y.backward(g)
        grad[rows] = full_s.grad[:, rank * v_local:(rank + 1) * v_local]
        outs.append(y.detach())
    if op == "topk_logprobs":
        return [torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])]
    return [torch.cat(outs), grad]


# ---------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------
def peak_extra_bytes(fn) -> tuple[int, int]:
    """(peak bytes allocated inside fn, bytes of what fn returns) from the profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kept = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    kept_bytes = sum(t.numel() * t.element_size() for t in kept if t is not None)
    return peak, kept_bytes


def _make_data(tokens: int, v_local: int, dtype, rank: int, args) -> dict:
    g = torch.Generator().manual_seed(1000 + rank)
    shared = torch.Generator().manual_seed(7)  # same on every rank: targets and upstream gradients
    return dict(
        s=(torch.randn(tokens, v_local, generator=g) * 2).to(dtype),
        t=(torch.randn(tokens, v_local, generator=g) * 2).to(dtype),
        tokens=torch.randint(0, args["vocab_size"], (tokens,), generator=shared),
        ids=torch.randint(0, args["vocab_size"], (tokens, args["k"]), generator=shared),
        grad_tok=torch.randn(tokens, generator=shared),
        grad_at=torch.randn(tokens, args["k"], generator=shared),
        **args,
    )


def _bench_rank(groups, cfg: dict) -> list[dict]:
    group, rank = groups.tp, groups.tp_rank
    v_local = cfg["vocab"] // groups.tp_size
    rows = []
    for dname in cfg["dtypes"]:
        d = _make_data(cfg["tokens"], v_local, DTYPES[dname], rank, dict(
            vocab_size=cfg["vocab_size"], k=cfg["k"], temperature=cfg["temperature"],
            baseline_block=cfg["baseline_block"]))
        shard_fp32 = cfg["tokens"] * v_local * 4
        for op in cfg["ops"]:
            for impl, fn in (("ops", run_ours), ("gather", run_baseline)):
                dist.barrier(group=group)
                t0 = time.perf_counter()
                peak, kept = peak_extra_bytes(lambda: fn(op, d, group))  # also the warm-up
                times = [time.perf_counter() - t0] if cfg["repeat"] == 0 else []  # --repeat 0: time this run
                for _ in range(cfg["repeat"]):
                    dist.barrier(group=group)
                    t0 = time.perf_counter()
                    fn(op, d, group)
                    times.append(time.perf_counter() - t0)
                extra = max(peak - kept, 0)
                rows.append(dict(op=op, dtype=dname, impl=impl, rank=rank, time_s=statistics.median(times),
                                 times_s=times, peak_alloc_bytes=peak, kept_bytes=kept, extra_bytes=extra,
                                 extra_frac_of_fp32_shard=extra / shard_fp32))
                if rank == 0:
                    print(f"  {op:15s} {dname} {impl:6s} {statistics.median(times):7.3f}s "
                          f"extra {extra / 2**20:9.1f} MiB", flush=True)
    return rows


def summarize(rows: list[dict], world: int) -> tuple[list[dict], str]:
    """One line per (op, dtype): per-rank times and extra memory of both, and whether the targets hold."""
    table, lines = [], []
    head = (f"| op | dtype | ops time (s) r0..r{world - 1} | gather time (s) | ops extra MiB (% fp32 shard) | "
            f"gather extra MiB (% fp32 shard) | mem target | time target |")
    lines += [head, "|" + "---|" * 8]
    keys = sorted({(r["op"], r["dtype"]) for r in rows}, key=lambda k: (OPS.index(k[0]), k[1]))
    for op, dt in keys:
        get = {impl: sorted((r for r in rows if r["op"] == op and r["dtype"] == dt and r["impl"] == impl),
                            key=lambda r: r["rank"]) for impl in ("ops", "gather")}
        t_ops = [r["time_s"] for r in get["ops"]]
        t_gat = [r["time_s"] for r in get["gather"]]
        m_ops = max(r["extra_frac_of_fp32_shard"] for r in get["ops"])
        m_gat = max(r["extra_frac_of_fp32_shard"] for r in get["gather"])
        mb_ops = max(r["extra_bytes"] for r in get["ops"]) / 2**20
        mb_gat = max(r["extra_bytes"] for r in get["gather"]) / 2**20
        mem_ok, time_ok = m_ops <= TARGET_MEM_FRAC, max(t_ops) <= max(t_gat)
        table.append(dict(op=op, dtype=dt, ops_time_s=t_ops, gather_time_s=t_gat, ops_extra_frac=m_ops,
                          gather_extra_frac=m_gat, mem_target_met=mem_ok, time_target_met=time_ok))
        lines.append(f"| {op} | {dt} | {' / '.join(f'{t:.3f}' for t in t_ops)} | "
                     f"{' / '.join(f'{t:.3f}' for t in t_gat)} | {mb_ops:.1f} ({100 * m_ops:.1f}%) | "
                     f"{mb_gat:.1f} ({100 * m_gat:.1f}%) | {'ok' if mem_ok else 'MISSED'} | "
                     f"{'ok' if time_ok else 'MISSED'} |")
    return table, "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936, help="padded vocabulary (divisible by --tp)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="real vocabulary (default: --vocab minus 293 padding ids, like Qwen2.5's 151643)")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=2,
                   help="timed runs after the profiled warm-up; 0: report the profiled run's time (halves the wall time)")
    p.add_argument("--baseline-block", type=int, default=256, help="tokens per baseline gather block")
    p.add_argument("--out", default="runs/bench_ops.json")
    a = p.parse_args(argv)
    if a.vocab % a.tp:
        raise SystemExit(f"--vocab {a.vocab} must be divisible by --tp {a.tp}")
    cfg = dict(tokens=a.tokens, vocab=a.vocab, vocab_size=a.vocab_size or max(1, a.vocab - min(293, a.vocab // 8)),
               tp=a.tp, dtypes=a.dtypes.split(","), ops=a.ops.split(","), k=a.k, temperature=a.temperature,
               repeat=a.repeat, baseline_block=a.baseline_block, chunk_elements=ops.CHUNK_ELEMENTS,
               torch=torch.__version__, threads_per_rank=max(1, (os.cpu_count() or 1) // a.tp))
    print(f"bench_ops: {cfg}", flush=True)
    t0 = time.time()
    per_rank = run_distributed(_bench_rank, a.tp, tp=a.tp, args=(cfg,), timeout=3 * 3600)
    rows = [r for rank_rows in per_rank for r in rank_rows]
    table, text = summarize(rows, a.tp)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(config=cfg, wall_s=time.time() - t0, summary=table, rows=rows), f, indent=1)
    print(f"wrote {a.out} ({time.time() - t0:.0f}s)")
    ok = all(r["mem_target_met"] and r["time_target_met"] for r in table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
