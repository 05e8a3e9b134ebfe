"""SGLang teacher scoring against a REAL SGLang 0.5.23 server (CPU torch-native path, float32) serving the
SmolLM2-135M-Instruct teacher, checked against the megatron teacher (ops.token_logprobs / topk_logprobs).

One server per module: first it serves the plain checkpoint (T = 1 scoring, the refusal at T != 1, the request
temperature's (non-)effect), then `/update_weights_from_disk` swaps in the checkpoint folded for T = 0.7 (saves a
second start-up), and the last test stops and kills it. Needs TROPD_SGLANG_PYTHON (scripts/test.sh exports it);
without it the server tests skip with that reason.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from megatron_tropd.objectives import ObjectiveConfig, Requirements, build_objective
from megatron_tropd.rollout import sglang_server as srv
from megatron_tropd.rollout.base import GenerationRequest, Sample, SamplingParams
from megatron_tropd.rollout.sglang import SGLangEngine
from megatron_tropd.rollout.sglang_config import SGLangConfig
from megatron_tropd.rollout.sglang_scoring import (FOLD_MARKER, ScorerCapabilityError,
                                                   SGLangTeacherScorer, check_for_run, check_requirements,
                                                   fold_temperature, logit_temperature_of)
from megatron_tropd.rollout.sglang_server import SGLangServerError

SGL_PY = os.environ.get("TROPD_SGLANG_PYTHON", "")
needs_server = pytest.mark.skipif(
    not SGL_PY, reason="TROPD_SGLANG_PYTHON is not set: run scripts/test.sh, or "
    "export TROPD_SGLANG_PYTHON=$(bash scripts/setup_sglang_env.sh)")
STARTUP_S = 900.0  # generous: CI machines are shared (start-up took 45-240 s under load); idle ~30 s
T_FOLD = 0.7
K = 8
GAP = 1e-4  # top-k ids are compared where the teacher's k-th and (k+1)-th log-probs differ by more than this

QUESTIONS = ["What is the capital of France?", "Name a primary color.", "What is 3 + 4?"]
ANSWERS = ["The capital of France is Paris.", "Red is a primary color, and so are blue and yellow.",
           "3 + 4 = 7"]


def _cfg(**kw) -> SGLangConfig:
    return SGLangConfig(**{"python": SGL_PY, "startup_timeout_s": STARTUP_S, "request_timeout_s": 600, **kw})


@pytest.fixture(scope="module")
def teacher_dir():
    from megatron_tropd.models.builtin import default_cache_dir, resolve_model_path

    return resolve_model_path("builtin:smollm2-135m-instruct", default_cache_dir())  # ~30 s the first time


@pytest.fixture(scope="module")
def folded_dir(teacher_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fold")
    yield fold_temperature(teacher_dir, root / f"teacher_T{T_FOLD}", T_FOLD)
    shutil.rmtree(root, ignore_errors=True)  # a 0.5 GB shard: freed with the module, not at the session's end


@pytest.fixture(scope="module")
def samples(teacher_dir):
    """Prompt (chat template) + response sequences: real answers, and one of random tokens (improbable ones)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    out = []
    for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS)):
        text = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        resp = tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append(Sample(prompt_ids=prompt, response_ids=resp, logprobs=[0.0] * len(resp), finish_reason="stop",
                          weight_version=0, request_id=i))
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(0, tok.vocab_size, (12,), generator=g).tolist()
    out.append(Sample(prompt_ids=out[0].prompt_ids, response_ids=rand, logprobs=[0.0] * 12, finish_reason="length",
                      weight_version=0, request_id=9))
    # a teacher prefix counts as response: scored the same way
    out.append(Sample(prompt_ids=out[1].prompt_ids, response_ids=out[1].response_ids, logprobs=[0.0] * 4,
                      finish_reason="stop", weight_version=0, prefix_len=len(out[1].response_ids) - 4, request_id=10))
    return out


def _batch(samples, sample_ids=None):
    from megatron_tropd.training.batch import build_batch

    return build_batch(samples, 0, sample_ids or list(range(len(samples))), pad_to_multiple=8)


def _megatron_reference(groups, model_dir: str, samples: list, temps: list[float], k: int) -> dict:
    """The megatron teacher (ops.token_logprobs / topk_logprobs through MegatronTeacherScorer): lp_t, top-(k+1)."""
    from megatron_tropd.models.hf_mapping import arch_from_hf_config
    from megatron_tropd.training.roles import build_teacher, hf_loader
    from megatron_tropd.training.scoring import MegatronTeacherScorer, ScoreOptions

    arch = arch_from_hf_config(model_dir)
    teacher = build_teacher(arch, groups, hf_loader(model_dir, arch, groups))
    out = {}
    for t in temps:
        scorer = MegatronTeacherScorer(teacher, groups, ScoreOptions(t, arch.vocab_size))
        (o,) = scorer.score([_batch(samples)], Requirements(teacher_topk=k + 1))
        out[t] = {"lp_t": o.lp_t.cpu(), "tk_lp": o.tk_lp.cpu(), "tk_ids": o.tk_ids.cpu()}
    return out


@pytest.fixture(scope="module")
def reference(teacher_dir, samples):
    from megatron_tropd.distributed.spawn import run_distributed

    (ref,) = run_distributed(_megatron_reference, 1, args=(str(teacher_dir), samples, [1.0, T_FOLD], K),
                             timeout=900)
    return ref


@pytest.fixture(scope="module")
def server(teacher_dir, tmp_path_factory):
    if not SGL_PY:
        pytest.skip("TROPD_SGLANG_PYTHON is not set")
    s = srv.launch(teacher_dir, _cfg(), tmp_path_factory.mktemp("logs"), "teacher", 0)
    try:
        print(f"[sglang-scoring] server healthy after {srv.wait_healthy([s], STARTUP_S):.0f}s")
        yield s
    finally:
        srv.stop(s)


@pytest.fixture(scope="module")
def folded_server(server, folded_dir):
    """The module's server after `/update_weights_from_disk` to the folded checkpoint (it then reports that dir as
    its model_path). The raw-server tests come first in this file, so they see the raw weights."""
    r = srv.post(server.url, "/update_weights_from_disk", {"model_path": str(folded_dir), "weight_version": "1"},
                 timeout=600)
    assert r.get("success"), r
    return server


def _vocab(teacher_dir) -> int:
    return json.loads((Path(teacher_dir) / "config.json").read_text())["vocab_size"]


def _check_against(tt, ref: dict, batch, k: int = K) -> dict:
    m = batch.response_mask
    lp_err = float((tt.lp_t[m] - ref["lp_t"][m]).abs().max())
    assert (tt.lp_t[~m] == 0).all() and (tt.tk_ids[~m] == 0).all() and (tt.tk_lp[~m] == 0).all()
    r_lp, r_ids, s_lp, s_ids = ref["tk_lp"][m], ref["tk_ids"][m], tt.tk_lp[m], tt.tk_ids[m]
    separated = (r_lp[:, k - 1] - r_lp[:, k]) > GAP
    mismatched = [i for i in separated.nonzero().squeeze(-1).tolist()
                  if set(s_ids[i].tolist()) != set(r_ids[i, :k].tolist())]
    # values at the same ids (where the id sets agree): the top-k log-probs themselves
    val_err = 0.0
    for i in range(len(s_ids)):
        ref_at = dict(zip(r_ids[i].tolist(), r_lp[i].tolist()))
        if set(s_ids[i].tolist()) <= set(ref_at):
            val_err = max(val_err, max(abs(v - ref_at[t]) for t, v in zip(s_ids[i].tolist(), s_lp[i].tolist())))
    assert bool((s_lp[:, :-1] >= s_lp[:, 1:]).all()), "top-k must be sorted by log-prob, descending"
    return {"lp_err": lp_err, "topk_val_err": val_err, "separated": int(separated.sum()), "mismatched": mismatched,
            "tokens": int(m.sum())}


# ------------------------------------------------------------------------------------------------ no server
def test_capabilities_refuse_objectives_needing_full_logits():
    for name in ("eopd", "full_vocab"):
        req = build_objective(ObjectiveConfig(name=name)).requirements
        with pytest.raises(ScorerCapabilityError, match=f"teacher.scorer=sglang cannot serve {name}: it needs "
                                                        f"the full-vocabulary") as e:
            check_requirements(req, name)
        assert "use teacher.scorer=megatron" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ScorerCapabilityError, match="entropy threshold"):
        check_requirements(build_objective(ObjectiveConfig(name="entropy_opd", entropy_source="teacher"))
                           .requirements, "entropy_opd")
    for name in ("opd", "tropd", "jsd", "reopold"):  # lp_t and top-k only: servable
        check_requirements(build_objective(ObjectiveConfig(name=name)).requirements, name)


def test_fold_temperature_divides_logits(tmp_path):
    """The folded checkpoint's logits are the original's / T (HF transformers, float64), files symlinked."""
    from transformers import AutoModelForCausalLM

    from tiny_hf import char_tokenizer, tiny_llama

    src = tmp_path / "src"
    tiny_llama(seed=3).save_pretrained(str(src))
    char_tokenizer().save_pretrained(str(src))
    out = fold_temperature(src, tmp_path / "folded", 0.6)
    assert logit_temperature_of(out) == 0.6 and logit_temperature_of(src) == 1.0
    assert logit_temperature_of(tmp_path / "nowhere") is None
    assert (out / "config.json").is_symlink() and not (out / "model.safetensors").is_symlink()
    assert json.loads((out / FOLD_MARKER).read_text())["source"] == str(src.resolve())
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert fold_temperature(src, out, 0.6) == out and (out / "model.safetensors").stat().st_mtime_ns == mtime
    ids = torch.randint(0, 50, (2, 9))
    a = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float64)(ids).logits
    b = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float64)(ids).logits
    assert torch.allclose(b, a / 0.6, rtol=1e-6, atol=1e-9)
    fold_temperature(src, out, 0.9)  # another T rewrites it
    assert logit_temperature_of(out) == 0.9
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma"}))
    with pytest.raises(ValueError, match="model_type 'gemma'"):
        fold_temperature(src, tmp_path / "g", 0.6)


class _FakeEngine:
    """Answers /generate payloads the way SGLang 0.5.23 does (entry 0 None, flat base64 top-k, nested
    token_ids_logprob), normalised over `model_vocab` logits z_v = 4 sin(0.3 t + 0.7 v) (t: the previous token).
    Checks alignment and the renormalisation to the real vocabulary; the real numbers are checked against the
    megatron teacher with the real server below."""

    def __init__(self, model_vocab: int = 100):
        self.cfg = SGLangConfig(concurrency=2)
        self.servers, self.payloads, self.model_vocab = [], [], model_vocab

    def logits(self, prev: int) -> torch.Tensor:
        return 4 * torch.sin(0.3 * prev + 0.7 * torch.arange(self.model_vocab, dtype=torch.float64))

    def request(self, payload, what):
        import base64

        import numpy as np

        self.payloads.append(payload)
        ids, start, kk = payload["input_ids"], payload["logprob_start_len"], payload["top_logprobs_num"]
        extra = payload.get("token_ids_logprob") or []
        entries, vals, top, extras = [[None, ids[start], None]], [], [], [None]
        for pos in range(start + 1, len(ids)):
            lp = torch.log_softmax(self.logits(ids[pos - 1]), -1)
            entries.append([float(lp[ids[pos]]), ids[pos], None])
            v, i = torch.topk(lp, kk)
            vals.append(v.tolist())
            top.append(i.tolist())
            extras.append([[float(lp[e]), e, None] for e in extra])
        r = len(ids) - start - 1
        meta = {"input_token_logprobs": entries, "input_top_logprobs_shape": [r, kk],
                "input_top_logprobs_null_prefix": 1,
                "input_top_logprobs_val_flat_b64": base64.b64encode(np.array(vals, dtype="<f4").tobytes()).decode(),
                "input_top_logprobs_idx_flat_b64": base64.b64encode(np.array(top, dtype="<i4").tobytes()).decode()}
        if extra:
            meta["input_token_ids_logprobs"] = extras
        return {"meta_info": meta}


@pytest.mark.parametrize("model_vocab", [100, 104])
def test_score_aligns_rows_and_renormalises_to_the_real_vocabulary(model_vocab):
    """Values land at each row's response targets (teacher prefix included), zeros / pad ids elsewhere, and equal
    log_softmax over the real vocabulary [0, 100) even when the server's model has padding rows (100 -> 104: their
    mass is requested and divided out; top-k never holds a padding id); prefetched samples are not requested again;
    a request covers exactly the response (logprob_start_len = prompt - 1)."""
    k, V, samples = 3, 100, []
    for i, (p, r, pre) in enumerate([(3, 4, 0), (5, 2, 1), (2, 6, 6)]):
        resp = list(range(10 + i, 10 + i + r))
        samples.append(Sample(prompt_ids=list(range(1, p + 1)), response_ids=resp, logprobs=[0.0] * (r - pre),
                              finish_reason="length", weight_version=0, prefix_len=pre, request_id=i))
    eng = _FakeEngine(model_vocab)
    scorer = SGLangTeacherScorer(eng, 0.7, V, topk=k, pad_id=0, model_vocab_size=model_vocab)
    scorer.prefetch(samples[0])
    batch = _batch(samples, [100, 101, 102])
    out = scorer.score(batch.micro_batches(1), Requirements(teacher_topk=k))
    assert len(out) == 3 and len(eng.payloads) == 3 and scorer.stats["prefetch_hits"] == 1
    for mb, tt, s, pay in zip(batch.micro_batches(1), out, samples, eng.payloads):
        m = mb.response_mask[0]
        assert torch.equal(mb.targets[0][m], torch.tensor(s.response_ids))  # the rows' response targets
        ctx = list(s.prompt_ids) + list(s.response_ids)
        real = torch.stack([torch.log_softmax(eng.logits(ctx[j - 1])[:V], -1)
                            for j in range(len(s.prompt_ids), len(ctx))])  # [r, V] float64 reference
        want_lp = real.gather(1, torch.tensor(s.response_ids)[:, None])[:, 0]
        want_tk, want_ids = torch.topk(real, k)
        assert torch.allclose(tt.lp_t[0][m].double(), want_lp, atol=1e-6)
        assert torch.equal(tt.tk_ids[0][m], want_ids) and torch.allclose(tt.tk_lp[0][m].double(), want_tk, atol=1e-6)
        assert (tt.lp_t[0][~m] == 0).all() and (tt.tk_ids[0][~m] == 0).all() and tt.ent_t is None
        assert pay["logprob_start_len"] == len(s.prompt_ids) - 1 and pay["sampling_params"]["max_new_tokens"] == 0
        assert pay["top_logprobs_num"] == k + model_vocab - V
        assert pay.get("token_ids_logprob", []) == list(range(V, model_vocab))
    # prefetched leftovers (samples this call did not score) are dropped, not kept forever
    scorer.prefetch(samples[1])
    scorer.score([batch.micro_batches(1)[0]], Requirements(teacher_topk=k))
    assert scorer._pending == {}  # noqa: SLF001
    # a rank without the servers never talks HTTP
    with pytest.raises(SGLangServerError, match="holds no SGLang teacher engine"):
        SGLangTeacherScorer(None, 0.7, V, topk=k).score([batch], Requirements(teacher_topk=k))
    scorer.close()


def test_check_for_run_refuses_what_servers_cannot_serve():
    from types import SimpleNamespace as NS

    def cfg(**kw):
        base = dict(rollout=NS(engine="sglang", temperature=0.7), data=NS(eval_size=0))
        base.update(kw)
        return NS(**base)

    spec = NS(key="teacher")
    eopd = build_objective(ObjectiveConfig(name="eopd")).requirements
    with pytest.raises(ScorerCapabilityError, match="teacher.scorer=sglang cannot serve objective.name='eopd'.*"
                                                    "use teacher.scorer=megatron"):
        check_for_run(cfg(), spec, eopd, "eopd")
    with pytest.raises(ScorerCapabilityError, match="set rollout.engine=sglang"):
        check_for_run(cfg(rollout=NS(engine="embedded", temperature=1.0)), spec, Requirements(), "opd")
    with pytest.raises(ScorerCapabilityError, match="set data.eval_size=0"):
        check_for_run(cfg(data=NS(eval_size=4)), spec, Requirements(), "opd")
    with pytest.raises(ScorerCapabilityError, match="teachers\\[1\\].scorer=sglang: .* only the first teacher"):
        check_for_run(cfg(), NS(key="teachers[1]"), Requirements(), "opd")
    check_for_run(cfg(), spec, build_objective(ObjectiveConfig(name="tropd")).requirements, "tropd")  # servable


def test_build_for_run_on_every_rank(tmp_path):
    from types import SimpleNamespace as NS

    from megatron_tropd.config import ConfigError
    from megatron_tropd.rollout.sglang_scoring import build_for_run
    from megatron_tropd.training.scoring import ScoreOptions

    objective = build_objective(ObjectiveConfig(name="tropd", topk=5))
    ctx = dict(cfg=NS(sglang=SGLangConfig()), score=ScoreOptions(0.7, 100), vocab=100, pad_id=0, objective=objective)
    fake = _FakeEngine()
    fake.base_model_dir = None  # no checkpoint to read the served vocabulary from: the scorer says so
    with pytest.raises(SGLangServerError, match="cannot tell the teacher servers' vocabulary size"):
        build_for_run({**ctx, "groups": NS(rank=0, is_last_stage=True), "engines": {"teacher": fake}})
    fake.base_model_dir = tmp_path
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 104}))
    on_rank0 = build_for_run({**ctx, "groups": NS(rank=0, is_last_stage=True), "engines": {"teacher": fake}})
    assert on_rank0.model_vocab_size == 104
    elsewhere = build_for_run({**ctx, "groups": NS(rank=1, is_last_stage=True), "engines": {}})
    assert on_rank0.engine is not None and elsewhere.engine is None
    assert on_rank0.topk == 5 and on_rank0.temperature == 0.7 and on_rank0.vocab_size == 100
    with pytest.raises(ConfigError, match="no SGLang teacher engine"):
        build_for_run({**ctx, "groups": NS(rank=0, is_last_stage=True), "engines": {}})


# ------------------------------------------------------------------------------------------------ real server
@needs_server
def test_raw_server_scores_exactly_at_temperature_1(server, teacher_dir, samples, reference):
    eng = SGLangEngine(servers=[server], cfg=_cfg(), role="teacher", check_health=False)
    scorer = SGLangTeacherScorer(eng, 1.0, _vocab(teacher_dir), topk=K)
    batch = _batch(samples)
    (tt,) = scorer.score(batch.micro_batches(len(samples)), Requirements(teacher_topk=K))
    r = _check_against(tt, reference[1.0], batch)
    print(f"[sglang-scoring] T=1 raw server: {r['tokens']} tokens, max |lp - megatron| {r['lp_err']:.2e}, top-{K} "
          f"values {r['topk_val_err']:.2e}, id sets differ at {len(r['mismatched'])} of {r['separated']} "
          f"separated positions")
    assert r["tokens"] >= 40 and r["separated"] >= 20
    assert r["lp_err"] < 1e-4 and r["topk_val_err"] < 1e-4 and r["mismatched"] == []
    assert tt.ent_t is None
    # one micro-batch per sample: the same rows
    parts = scorer.score(batch.micro_batches(1), Requirements(teacher_topk=K))
    assert torch.allclose(torch.cat([p.lp_t for p in parts]), tt.lp_t, atol=1e-5)


@needs_server
def test_raw_server_ignores_request_temperature_and_is_refused_at_other_temperatures(server, teacher_dir, samples,
                                                                                      reference):
    """The finding, measured: input log-probs do not change with the request's temperature (bitwise), so they are
    at T = 1; a scorer asked for T = 0.7 from this server refuses with the fix instead of scoring wrongly."""
    eng = SGLangEngine(servers=[server], cfg=_cfg(), role="teacher", check_health=False)
    scorer = SGLangTeacherScorer(eng, 1.0, _vocab(teacher_dir), topk=K)
    s = samples[0]
    pay = scorer.payload(s.prompt_ids, s.response_ids, K)
    a = eng.request(pay, "T=1")["meta_info"]
    pay["sampling_params"]["temperature"] = T_FOLD
    b = eng.request(pay, f"T={T_FOLD}")["meta_info"]
    assert a["input_token_logprobs"] == b["input_token_logprobs"]
    assert a["input_top_logprobs_val_flat_b64"] == b["input_top_logprobs_val_flat_b64"]
    # ... and those log-probs are far from the teacher's at T = 0.7 (what scoring at the wrong temperature costs)
    batch = _batch(samples)
    (tt,) = scorer.score([batch], Requirements(teacher_topk=K))
    m = batch.response_mask
    wrong = float((tt.lp_t[m] - reference[T_FOLD]["lp_t"][m]).abs().max())
    print(f"[sglang-scoring] raw server vs megatron at T={T_FOLD}: max |lp diff| {wrong:.2f}")
    assert wrong > 0.5
    with pytest.raises(SGLangServerError, match=r"cannot score at rollout.temperature=0.7: .* SGLang 0.5.23 applies "
                                                r"no temperature to input log-probs .* Fix: .*fold"):
        SGLangTeacherScorer(eng, T_FOLD, _vocab(teacher_dir), topk=K)


@needs_server
def test_folded_server_scores_exactly_at_its_temperature(folded_server, teacher_dir, samples, reference):
    """A server serving the folded checkpoint scores exactly at its temperature and refuses any other."""
    eng = SGLangEngine(servers=[folded_server], cfg=_cfg(), role="teacher", check_health=False,
                       logit_temperature=T_FOLD)
    with pytest.raises(SGLangServerError, match="folded for temperature 0.7"):
        SGLangTeacherScorer(eng, 1.0, _vocab(teacher_dir), topk=K)  # folded server, T = 1 rollouts: refused
    scorer = SGLangTeacherScorer(eng, T_FOLD, _vocab(teacher_dir), topk=K)
    batch = _batch(samples)
    (tt,) = scorer.score([batch], Requirements(teacher_topk=K))
    res = _check_against(tt, reference[T_FOLD], batch)
    print(f"[sglang-scoring] T={T_FOLD} folded server: max |lp - megatron| {res['lp_err']:.2e}, top-{K} values "
          f"{res['topk_val_err']:.2e}, id sets differ at {len(res['mismatched'])} of {res['separated']}")
    assert res["lp_err"] < 1e-4 and res["topk_val_err"] < 1e-4 and res["mismatched"] == []


@needs_server
def test_scoring_overlaps_generation(folded_server, teacher_dir, samples):
    """Samples are scored as the engine finishes them (`on_sample=scorer.prefetch`); `score` then sends nothing."""
    eng = SGLangEngine(servers=[folded_server], cfg=_cfg(), role="teacher", check_health=False,
                       logit_temperature=T_FOLD)
    scorer = SGLangTeacherScorer(eng, T_FOLD, _vocab(teacher_dir), topk=K)
    reqs = [GenerationRequest(prompt_ids=tuple(samples[i].prompt_ids), n=2, request_id=i) for i in range(2)]
    out = eng.generate(reqs, SamplingParams(temperature=T_FOLD, max_new_tokens=6, seed=1), on_sample=scorer.prefetch)
    flat = [s for g in out for s in g]
    assert scorer.stats["prefetched"] == 4
    batch = _batch(flat)
    (tt,) = scorer.score([batch], Requirements(teacher_topk=K))
    assert scorer.stats["prefetch_hits"] == 4 and scorer.stats["requests"] == 4  # nothing scored twice
    # the engine's own log-probs of its sampled tokens (decode path, at T through the fold) vs the scorer's
    m = batch.response_mask
    assert float((tt.lp_t[m] - batch.lp_roll[m]).abs().max()) < 1e-4
    direct = SGLangTeacherScorer(eng, T_FOLD, _vocab(teacher_dir), topk=K).score([batch], Requirements(teacher_topk=K))
    assert torch.allclose(direct[0].lp_t, tt.lp_t, atol=1e-5) and torch.equal(direct[0].tk_ids, tt.tk_ids)
    scorer.close()


def _two_ranks(groups, url: str, fold: float, vocab: int, samples: list) -> dict:
    """Rank 0 holds the engine; each rank scores its own micro-batch through the collective path."""
    eng = SGLangEngine(urls=[url], cfg=_cfg(request_timeout_s=30, retries=0), role="teacher", check_health=False,
                       logit_temperature=fold) if groups.rank == 0 else None
    scorer = SGLangTeacherScorer(eng, fold, vocab, topk=K, groups=groups, check_servers=False)
    mine = _batch(samples, list(range(len(samples)))).split(2)[groups.rank]
    t0 = time.time()
    try:
        (tt,) = scorer.score([mine], Requirements(teacher_topk=K))
    except SGLangServerError as e:
        return {"error": str(e), "seconds": time.time() - t0}
    return {"lp_t": tt.lp_t, "tk_ids": tt.tk_ids, "requests": scorer.stats["requests"], "error": None}


@needs_server
def test_collective_scoring_over_two_ranks(folded_server, teacher_dir, samples):
    """With a process group, every rank's rows go to the rank holding the servers and come back (gloo, world 2)."""
    from megatron_tropd.distributed.spawn import run_distributed

    server = folded_server

    four = samples[:4]
    res = run_distributed(_two_ranks, 2, args=(server.url, T_FOLD, _vocab(teacher_dir), four), timeout=900)
    assert [r["error"] for r in res] == [None, None]
    eng = SGLangEngine(servers=[server], cfg=_cfg(), role="teacher", check_health=False, logit_temperature=T_FOLD)
    (full,) = SGLangTeacherScorer(eng, T_FOLD, _vocab(teacher_dir), topk=K).score([_batch(four)],
                                                                                  Requirements(teacher_topk=K))
    assert torch.allclose(torch.cat([r["lp_t"] for r in res]), full.lp_t, atol=1e-5)
    assert torch.equal(torch.cat([r["tk_ids"] for r in res]), full.tk_ids)
    assert res[0]["requests"] == 4 and res[1]["requests"] == 0  # rank 1 never talks HTTP


@needs_server
def test_unresponsive_then_dead_server_is_a_clear_error_not_a_hang(folded_server, teacher_dir, samples):
    """Runs last (it stops and kills the module's server)."""
    server = folded_server
    cfg = _cfg(request_timeout_s=5, retries=1, backoff_s=0.2, on_server_failure="fail")
    eng = SGLangEngine(servers=[server], cfg=cfg, role="teacher", check_health=False, logit_temperature=T_FOLD)
    scorer = SGLangTeacherScorer(eng, T_FOLD, _vocab(teacher_dir), topk=K)
    batch = _batch(samples)
    os.killpg(server.proc.pid, signal.SIGSTOP)  # alive but answers nothing
    try:
        t0 = time.time()
        with pytest.raises(SGLangServerError, match=r"teacher\[0\] http://127\.0\.0\.1:\d+ is down while serving "
                                                    r"score sample_id=\d+"):
            scorer.score([batch], Requirements(teacher_topk=K))
        stalled = time.time() - t0
    finally:
        os.killpg(server.proc.pid, signal.SIGCONT)
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=30)
    t0 = time.time()
    with pytest.raises(SGLangServerError, match="is down while serving score"):
        scorer.score([batch], Requirements(teacher_topk=K))
    dead = time.time() - t0
    print(f"[sglang-scoring] stalled server -> error in {stalled:.1f}s; killed server -> error in {dead:.1f}s")
    assert stalled < 60 and dead < 30
    scorer.close()
    # over two ranks: the error reaches the rank without servers too (no rank waits forever in the collective)
    from megatron_tropd.distributed.spawn import run_distributed

    res = run_distributed(_two_ranks, 2, args=(server.url, T_FOLD, _vocab(teacher_dir), samples[:4]), timeout=300)
    assert all(r["error"] and "is down while serving score" in r["error"] for r in res), res
    assert "failed" in res[1]["error"] and max(r["seconds"] for r in res) < 60


# ------------------------------------------------------------------------------------------------ end to end
@needs_server
def test_tropd_train_with_teacher_scorer_sglang(tmp_path):
    """`tropd train teacher.scorer=sglang`: the run launches a student server and a teacher server (folded for the
    rollout temperature 0.7, since the scorer must score at it), the teacher server writes the prefixes and scores
    every rollout (tiny models; the teacher has padding rows, 128 > 102: its server normalises over them and the
    scorer renormalises to the real vocabulary). Two steps train; every sample is scored on the server, each one
    prefetched as it finished generating and reused by the step (the overlap)."""
    import subprocess
    import sys

    from tiny_hf import char_tokenizer, tiny_llama

    tok = char_tokenizer()
    # the student's rows = the tokenizer (the student server samples only real ids); the teacher has padding rows
    for name, seed, layers, vocab in (("student", 0, 2, len(tok)), ("teacher", 1, 3, 128)):
        tiny_llama(seed=seed, layers=layers, vocab=vocab).save_pretrained(str(tmp_path / name))
        tok.save_pretrained(str(tmp_path / name))
    overrides = {"student.path": tmp_path / "student", "teacher.path": tmp_path / "teacher",
                 "teacher.scorer": "sglang", "train.run_dir": tmp_path / "run", "train.steps": 2,
                 "train.progress": "false", "train.tensorboard": "false", "train.save_interval": 0,
                 "rollout.engine": "sglang", "rollout.temperature": T_FOLD, "rollout.prompts_per_step": 2,
                 "rollout.samples_per_prompt": 2, "rollout.max_new_tokens": 8, "optim.micro_batch_size": 2,
                 "data.size": 16, "data.eval_size": 0, "objective.name": "tropd", "objective.topk": 8,
                 "guidance.prefix_fraction": 0.5, "sglang.startup_timeout_s": STARTUP_S}
    root = Path(__file__).resolve().parents[1]
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "megatron_tropd.cli", "train", "--config",
                        str(root / "examples/configs/smollm2_tropd_cpu.yaml"),
                        *[f"{k}={v}" for k, v in overrides.items()]], cwd=root, capture_output=True, text=True,
                       timeout=1800, env={**os.environ, "TROPD_SGLANG_PYTHON": SGL_PY})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    print(f"[sglang-scoring] tropd train teacher.scorer=sglang, 2 steps in {time.time() - t0:.0f}s: "
          + "; ".join(f"{r['sglang_scoring/requests']:.0f} requests, {r['sglang_scoring/prefetch_hits']:.0f} "
                      f"prefetch hits, score wait {r['sglang_scoring/score_s']:.2f}s" for r in rows))
    assert [r["step"] for r in rows] == [0, 1] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    folded = tmp_path / "run" / f"sglang_teacher_T{T_FOLD:g}"
    assert logit_temperature_of(folded) == pytest.approx(T_FOLD)  # the launched teacher server serves logits / T
    for r in rows:  # 4 rollouts a step, each scored once on the server, all of them prefetched during generation
        assert r["sglang_scoring/requests"] == 4 and r["sglang_scoring/prefetched"] == 4
        assert r["sglang_scoring/prefetch_hits"] == 4
