"""SGLang teacher scoring vs the megatron teacher, the temperature behaviour, and scoring/generation overlap.

Real SGLang 0.5.23 servers on this machine (CPU torch-native path, float32) serving the SmolLM2-135M-Instruct
teacher: one from the plain checkpoint ("raw", also used as the rollout generator) and one from a checkpoint
folded for T_fold (`sglang_scoring.fold_temperature`). Prints a table and writes JSON.

    TROPD_SGLANG_PYTHON=$(bash scripts/setup_sglang_env.sh) python tools/bench_sglang_scoring.py [--out F.json]
        [--fold 0.7] [--topk 8] [--prompts 8] [--n 2] [--new 48] [--raw-env SGLANG_RETURN_ORIGINAL_LOGPROB=1]

Measured (see docs/rollout.md, "SGLang teacher scoring"):
1. request temperature vs input log-probs on the raw server (bitwise equal = temperature not applied);
2. lp / top-k errors vs the megatron teacher (ops.token_logprobs / topk_logprobs, TP1 float32) at T = 1 (raw
   server) and T = T_fold (folded server), and the error a raw server would make at T_fold;
3. rollouts (raw server as the generator) then `scorer.score` of the batch (folded server): sequential vs
   overlapped (`on_sample=scorer.prefetch`: each sample's scoring request leaves as soon as it is generated).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a prime number is.",
             "List three colors of the rainbow.", "How many legs does a spider have?", "Say hello in Spanish.",
             "What is 12 times 7?", "Name a planet in the solar system.", "Give a synonym for happy.",
             "Why is the sky blue?", "What do bees make?", "Translate 'cat' into French."]


def megatron_side(groups, model_dir: str, samples: list, temps: list[float], k: int, vocab: int) -> dict:
    """The megatron teacher's lp_t and top-(k+1) at each temperature for `samples` (one micro-batch)."""
    from megatron_tropd.models.hf_mapping import arch_from_hf_config
    from megatron_tropd.objectives import Requirements
    from megatron_tropd.training.batch import build_batch
    from megatron_tropd.training.roles import build_teacher, hf_loader
    from megatron_tropd.training.scoring import MegatronTeacherScorer, ScoreOptions

    arch = arch_from_hf_config(model_dir)
    teacher = build_teacher(arch, groups, hf_loader(model_dir, arch, groups))
    batch = build_batch(samples, 0, list(range(len(samples))), pad_to_multiple=8)
    out = {}
    for t in temps:
        (o,) = MegatronTeacherScorer(teacher, groups, ScoreOptions(t, vocab)).score(
            [batch], Requirements(teacher_topk=k + 1))
        out[t] = {"lp_t": o.lp_t.cpu(), "tk_lp": o.tk_lp.cpu(), "tk_ids": o.tk_ids.cpu()}
    return out


def compare(tt, ref: dict, batch, k: int, gap: float = 1e-4) -> dict:
    """Errors of TeacherTokens `tt` vs the megatron reference (lp_t, tk_lp/tk_ids of top-(k+1))."""
    m = batch.response_mask
    lp_err = float((tt.lp_t[m] - ref["lp_t"][m]).abs().max())
    r_lp, r_ids = ref["tk_lp"][m], ref["tk_ids"][m]  # [n, k+1]
    s_lp, s_ids = tt.tk_lp[m], tt.tk_ids[m]  # [n, k]
    separated = (r_lp[:, k - 1] - r_lp[:, k]) > gap
    same_set = torch.tensor([set(a.tolist()) == set(b.tolist()) for a, b in zip(s_ids, r_ids[:, :k])])
    same_order = (s_ids == r_ids[:, :k]).all(-1)
    # values aligned by id where the sets agree
    vals = []
    for i in same_set.nonzero().squeeze(-1).tolist():
        pos = {int(t): j for j, t in enumerate(r_ids[i, :k].tolist())}
        vals.append(max(abs(float(s_lp[i, j]) - float(r_lp[i, pos[int(t)]])) for j, t in enumerate(s_ids[i].tolist())))
    return {"tokens": int(m.sum()), "lp_max_abs_err": lp_err,
            "lp_mean_abs_err": float((tt.lp_t[m] - ref["lp_t"][m]).abs().mean()),
            "topk_separated_positions": int(separated.sum()),
            "topk_set_mismatch_where_separated": int((separated & ~same_set).sum()),
            "topk_set_mismatch_anywhere": int((~same_set).sum()),
            "topk_order_mismatch": int((~same_order).sum()),
            "topk_lp_max_abs_err": max(vals) if vals else float("nan")}


def _group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group `pgid` (a launched server: launcher,
    tokenizer, scheduler, detokenizer)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the command: state ppid pgrp ... utime(14) stime(15)
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def print_errors(rows: dict, k: int) -> None:
    print(f"\n| case | tokens | max abs lp err | mean abs lp err | top-{k} separated positions | "
          f"id-set mismatches there | anywhere | order mismatches | top-k lp max err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['tokens']} | {r['lp_max_abs_err']:.2e} | {r['lp_mean_abs_err']:.2e} | "
              f"{r['topk_separated_positions']} | {r['topk_set_mismatch_where_separated']} | "
              f"{r['topk_set_mismatch_anywhere']} | {r['topk_order_mismatch']} | {r['topk_lp_max_abs_err']:.2e} |",
              flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_sglang_scoring.json")
    ap.add_argument("--fold", type=float, default=0.7)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--raw-env", action="append", default=[], help="KEY=VAL for the raw server's environment")
    ap.add_argument("--work", default="")
    ap.add_argument("--phases", default="temperature,errors,overlap,idle", help="comma-separated subset to run")
    ap.add_argument("--first", default="sequential", choices=("sequential", "overlapped"),
                    help="overlap phase: which mode runs first in even repeats (odd repeats swap)")
    ap.add_argument("--raw-url", default="", help="attach to a running raw server instead of launching one")
    ap.add_argument("--folded-url", default="", help="attach to a running server of the folded dir")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from megatron_tropd.distributed.spawn import run_distributed
    from megatron_tropd.models.builtin import default_cache_dir, resolve_model_path
    from megatron_tropd.objectives import Requirements
    from megatron_tropd.rollout import sglang_server as srv
    from megatron_tropd.rollout.base import GenerationRequest, SamplingParams
    from megatron_tropd.rollout.sglang import SGLangEngine
    from megatron_tropd.rollout.sglang_config import SGLangConfig
    from megatron_tropd.rollout.sglang_scoring import SGLangTeacherScorer, fold_temperature
    from megatron_tropd.training.batch import build_batch

    sgl_py = os.environ.get("TROPD_SGLANG_PYTHON")
    if not sgl_py:
        sys.exit("set TROPD_SGLANG_PYTHON (export TROPD_SGLANG_PYTHON=$(bash scripts/setup_sglang_env.sh))")
    teacher_dir = resolve_model_path("builtin:smollm2-135m-instruct", default_cache_dir())
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_sgscore_"))
    folded_dir = fold_temperature(teacher_dir, work / f"teacher_T{args.fold:g}", args.fold)
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    vocab = json.loads((teacher_dir / "config.json").read_text())["vocab_size"]
    eos = tok.eos_token_id
    cfg = SGLangConfig(python=sgl_py, startup_timeout_s=900, request_timeout_s=900, concurrency=8)
    raw_env = dict(kv.split("=", 1) for kv in args.raw_env)
    old_env = {k: os.environ.get(k) for k in raw_env}
    os.environ.update(raw_env)
    t0 = time.time()
    raw = srv.Server(url=args.raw_url) if args.raw_url else srv.launch(teacher_dir, cfg, work / "logs", "teacher", 0)
    for key, v in old_env.items():
        os.environ.pop(key) if v is None else os.environ.__setitem__(key, v)
    folded = srv.Server(url=args.folded_url, index=1) if args.folded_url else \
        srv.launch(folded_dir, cfg, work / "logs", "teacher", 1)
    res: dict = {"fold": args.fold, "topk": args.topk, "raw_env": raw_env}
    try:
        res["startup_s"] = srv.wait_healthy([raw, folded], cfg.startup_timeout_s)
        print(f"servers healthy after {time.time() - t0:.0f}s")
        gen_raw = SGLangEngine(urls=[raw.url], cfg=cfg, role="student")
        eng_raw = SGLangEngine(urls=[raw.url], cfg=cfg, role="teacher")
        eng_fold = SGLangEngine(urls=[folded.url], cfg=cfg, role="teacher", logit_temperature=args.fold)
        prompts = [tuple(tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                     tokenize=False), add_special_tokens=False)["input_ids"])
                   for q in QUESTIONS[:args.prompts]]
        reqs = [GenerationRequest(prompt_ids=p, n=args.n, request_id=i) for i, p in enumerate(prompts)]

        phases = set(args.phases.split(","))

        def save():
            res["load_average"] = os.getloadavg()
            Path(args.out).write_text(json.dumps(res, indent=1, default=str))

        if "temperature" in phases:  # 1) request temperature vs input log-probs (raw server)
            sc1 = SGLangTeacherScorer(eng_raw, 1.0, vocab, topk=args.topk)
            out = gen_raw.generate(reqs[:2], SamplingParams(temperature=1.0, max_new_tokens=8,
                                                            stop_token_ids=(eos,), seed=1))
            diffs, same_top = [], True
            for s in [s for g in out for s in g]:
                pay = sc1.payload(s.prompt_ids, s.response_ids, args.topk)
                a = eng_raw.request(pay, "probe T=1")["meta_info"]
                pay["sampling_params"]["temperature"] = args.fold
                b = eng_raw.request(pay, f"probe T={args.fold}")["meta_info"]
                diffs.append(max(abs(x[0] - y[0]) for x, y in zip(a["input_token_logprobs"][1:],
                                                                  b["input_token_logprobs"][1:])))
                same_top &= a["input_top_logprobs_val_flat_b64"] == b["input_top_logprobs_val_flat_b64"]
            res["request_temperature_effect_on_input_lp"] = max(diffs)
            res["request_temperature_effect_on_top_lp_bitwise_equal"] = bool(same_top)
            print(f"request temperature 1.0 vs {args.fold}: max |input lp diff| = {max(diffs):.3g}, top-k bitwise "
                  f"equal: {same_top}", flush=True)
            save()

        if "errors" in phases:  # 2) errors vs the megatron teacher
            req = Requirements(teacher_topk=args.topk)
            rows = {}
            for t, eng in ((1.0, eng_raw), (args.fold, eng_fold)):
                out = gen_raw.generate(reqs, SamplingParams(temperature=t, max_new_tokens=args.new,
                                                            stop_token_ids=(eos,), seed=2))
                samples = [s for g in out for s in g]
                (ref,) = run_distributed(megatron_side, 1, args=(str(teacher_dir), samples, [t], args.topk, vocab),
                                         timeout=1800)
                batch = build_batch(samples, 0, list(range(len(samples))), pad_to_multiple=8)
                (tt,) = SGLangTeacherScorer(eng, t, vocab, topk=args.topk).score([batch], req)
                rows[f"scored T={t:g} ({'raw' if eng is eng_raw else 'folded'} server)"] = compare(
                    tt, ref[t], batch, args.topk)
                if t != 1.0:
                    # what ignoring the temperature would give: the raw server's input log-probs vs megatron at T
                    (tw,) = SGLangTeacherScorer(eng_raw, 1.0, vocab, topk=args.topk).score([batch], req)
                    rows[f"raw server vs megatron at T={t:g} (wrong temperature)"] = compare(tw, ref[t], batch,
                                                                                              args.topk)
                    try:
                        SGLangTeacherScorer(eng_raw, t, vocab, topk=args.topk)
                        res["raw_server_refused_at_T"] = False
                    except Exception as e:  # noqa: BLE001
                        res["raw_server_refused_at_T"] = f"{type(e).__name__}: {e}"
                res["errors"] = rows
                save()
            print_errors(rows, args.topk)
            print(f"raw server asked to score at T={args.fold}: {res['raw_server_refused_at_T']}", flush=True)

        # 3) overlap: generate on the raw server (student role), score on the folded server at T_fold
        params = SamplingParams(temperature=args.fold, max_new_tokens=args.new, stop_token_ids=(eos,), seed=3)
        timing = []
        for rep in (range(args.repeats) if "overlap" in phases else ()):
            order = ("sequential", "overlapped") if args.first == "sequential" else ("overlapped", "sequential")
            for mode in (order if rep % 2 == 0 else order[::-1]):
                sc = SGLangTeacherScorer(eng_fold, args.fold, vocab, topk=args.topk)
                t_a = time.time()
                out = gen_raw.generate(reqs, params, on_sample=sc.prefetch if mode == "overlapped" else None)
                t_gen = time.time() - t_a
                flat = [s for g in out for s in g]
                sc.score([build_batch(flat, 0, list(range(len(flat))), pad_to_multiple=8)],
                         Requirements(teacher_topk=args.topk))
                t_all = time.time() - t_a
                sc.close()
                timing.append({"mode": mode, "rep": rep, "generate_s": t_gen, "total_s": t_all,
                               "after_generation_s": t_all - t_gen,
                               "response_tokens": sum(len(s.response_ids) for s in flat), "samples": len(flat)})
                print(timing[-1], flush=True)
                res["overlap"] = timing
                save()
        if "idle" in phases and raw.proc is not None and folded.proc is not None:
            # CPU of each launched server's process group while it has nothing to do (--sleep-on-idle on cpu)
            time.sleep(5)
            a = {s.index: _group_cpu_s(s.proc.pid) for s in (raw, folded)}
            time.sleep(30)
            res["idle_cpu_fraction_of_a_core"] = {s.index: (_group_cpu_s(s.proc.pid) - a[s.index]) / 30
                                                  for s in (raw, folded)}
            res["launch_argv"] = raw.argv
            print(f"idle server CPU (fraction of a core, 30 s): {res['idle_cpu_fraction_of_a_core']}", flush=True)
            save()
        seq = [r["total_s"] for r in timing if r["mode"] == "sequential"]
        ovl = [r["total_s"] for r in timing if r["mode"] == "overlapped"]
        if seq and ovl:
            res["overlap_ratio_total_sequential_over_overlapped"] = sum(seq) / sum(ovl)
    finally:
        srv.stop(raw)
        srv.stop(folded)
    res["load_average"] = os.getloadavg()

    if res.get("overlap"):
        print("\n| mode | rep | samples | response tokens | generate s | scoring after generation s | total s |")
        print("|---|---|---|---|---|---|---|")
        for r in res["overlap"]:
            print(f"| {r['mode']} | {r['rep']} | {r['samples']} | {r['response_tokens']} | {r['generate_s']:.2f} | "
                  f"{r['after_generation_s']:.2f} | {r['total_s']:.2f} |")
        if "overlap_ratio_total_sequential_over_overlapped" in res:
            print(f"sequential / overlapped total time: {res['overlap_ratio_total_sequential_over_overlapped']:.2f}x "
                  f"(load average {res['load_average'][0]:.1f})")
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
