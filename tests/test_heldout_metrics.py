"""Held-out distillation metrics (evaluation/heldout.py) against a plain unsharded float64 reference: the same HF
models run by transformers in float64, every metric written out with log_softmax / argmax over the full vocabulary.
Megatron side at TP 1, TP 2, PP 2 and DP 2 (gloo ranks; logits stay sharded [b, s, V/tp])."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from megatron_tropd.distributed.spawn import run_distributed
from megatron_tropd.evaluation.heldout import distinct_n
from megatron_tropd.rollout.base import GenerationRequest, Sample, SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from tiny_hf import VOCAB, char_tokenizer, tiny_llama  # noqa: E402

TEMPERATURE = 0.8  # scoring temperature (eval.temperature): every metric is taken at it
N_PROMPTS, PER_PROMPT = 4, 2


@dataclass
class FakePrompt:
    id: int
    token_ids: list

    def score(self, text: str) -> float:
        return float("a" in text)


class FixedEngine:
    """Deterministic 'samples' per (salt, request id, sample index); some responses repeat a bigram."""

    def __init__(self, salt: int):
        self.salt, self.calls, self.weight_version = salt, 0, 0

    def generate(self, requests, params):
        self.calls += 1
        out = []
        for req in requests:
            group = []
            for k in range(req.first_sample_index, req.first_sample_index + req.n):
                g = torch.Generator().manual_seed(1000003 * self.salt + 7919 * req.request_id + k)
                ids = torch.randint(6, 100, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g).tolist()
                if k % 2:
                    ids = ids[:2] * 3  # a loop: low distinct-n
                group.append(Sample(prompt_ids=list(req.prompt_ids), response_ids=ids, logprobs=[0.0] * len(ids),
                                    finish_reason="length", weight_version=0, request_id=req.request_id,
                                    meta={"sample_index": k}))
            out.append(group)
        return out


def _prompts():
    g = torch.Generator().manual_seed(5)
    return [FakePrompt(i, torch.randint(6, 100, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist())
            for i in range(N_PROMPTS)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout_models")
    tok = char_tokenizer()
    for name, seed in (("student", 0), ("teacher", 1)):
        tiny_llama(seed=seed, layers=2).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def _evaluate(groups, root: str, teacher_samples: bool):
    from megatron_tropd.config import OptimConfig
    from megatron_tropd.evaluation.heldout import EVAL_REQUEST_ID_OFFSET, HeldOutEval, HeldOutOptions
    from megatron_tropd.models.hf_mapping import arch_from_hf_config
    from megatron_tropd.training.roles import build_student, build_teacher, hf_loader
    from megatron_tropd.training.scoring import MegatronTeacherScorer, ScoreOptions

    s_dir, t_dir = f"{root}/student", f"{root}/teacher"
    s_arch, t_arch = arch_from_hf_config(s_dir), arch_from_hf_config(t_dir)
    student = build_student(s_arch, groups, hf_loader(s_dir, s_arch, groups), OptimConfig(), total_updates=1)
    teacher = MegatronTeacherScorer(build_teacher(t_arch, groups, hf_loader(t_dir, t_arch, groups)), groups,
                                    ScoreOptions(TEMPERATURE, VOCAB))
    rank0 = groups.rank == 0
    engine, t_engine = (FixedEngine(1), FixedEngine(2)) if rank0 else (None, None)
    params = SamplingParams(temperature=TEMPERATURE, max_new_tokens=16)
    opts = HeldOutOptions(samples_per_prompt=PER_PROMPT, micro_batch_size=2, vocab_size=VOCAB, pad_id=0,
                          run_dir=Path(root), teacher_samples=teacher_samples)
    evaluate = HeldOutEval(_prompts(), engine, teacher, student, groups, char_tokenizer(), params, opts,
                           teacher_engine=t_engine)
    first, second = evaluate(0), evaluate(1)
    assert EVAL_REQUEST_ID_OFFSET > 0
    return {"first": first, "second": second, "teacher_calls": t_engine.calls if rank0 else None}


def _requests():
    from megatron_tropd.evaluation.heldout import EVAL_REQUEST_ID_OFFSET

    return [GenerationRequest(prompt_ids=tuple(p.token_ids), n=PER_PROMPT, request_id=EVAL_REQUEST_ID_OFFSET + p.id)
            for p in _prompts()]


def _reference(root: Path) -> dict:
    """Every metric from transformers' float64 logits over the full vocabulary, one sequence at a time."""
    from transformers import AutoModelForCausalLM

    hf = {n: AutoModelForCausalLM.from_pretrained(root / n, dtype=torch.float64).eval() for n in ("student", "teacher")}
    tok = char_tokenizer()

    def logps(samples):
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            p, r = len(s.prompt_ids), len(s.response_ids)
            with torch.no_grad():
                out = {n: torch.log_softmax(m(ids).logits[0, p - 1:p - 1 + r, :VOCAB] / TEMPERATURE, -1)
                       for n, m in hf.items()}
            yield out["student"], out["teacher"], torch.tensor(s.response_ids)

    def mean(xs):
        xs = torch.cat(xs)
        return float(xs.double().mean())

    def kl(a, b):  # sum_v e^a (a - b)
        return (a.exp() * (a - b)).sum(-1)

    ent = lambda a: -(a.exp() * a).sum(-1)  # noqa: E731
    ref = {}
    s_samples = [s for g in FixedEngine(1).generate(_requests(), None) for s in g]
    cols = {k: [] for k in ("reverse_kl_k1", "token_agreement", "reverse_kl", "top1_agreement", "teacher_nll",
                            "student_entropy", "teacher_entropy")}
    for ls, lt, x in logps(s_samples):
        at = torch.arange(len(x))
        cols["reverse_kl_k1"].append(ls[at, x] - lt[at, x])
        cols["token_agreement"].append((lt.argmax(-1) == x).double())
        cols["reverse_kl"].append(kl(ls, lt))
        cols["top1_agreement"].append((ls.argmax(-1) == lt.argmax(-1)).double())
        cols["teacher_nll"].append(-lt[at, x])
        cols["student_entropy"].append(ent(ls))
        cols["teacher_entropy"].append(ent(lt))
    ref.update({k: mean(v) for k, v in cols.items()})
    texts = [tok.decode(s.response_ids, skip_special_tokens=True) for s in s_samples]
    ref["accuracy"] = sum(float("a" in t) for t in texts) / len(texts)
    ref["response_length"] = sum(len(s.response_ids) for s in s_samples) / len(s_samples)
    t_samples = [s for g in FixedEngine(2).generate(_requests(), None) for s in g]
    cols = {k: [] for k in ("forward_kl", "top1_agreement_teacher", "student_nll_teacher")}
    for ls, lt, x in logps(t_samples):
        cols["forward_kl"].append(kl(lt, ls))
        cols["top1_agreement_teacher"].append((ls.argmax(-1) == lt.argmax(-1)).double())
        cols["student_nll_teacher"].append(-ls[torch.arange(len(x)), x])
    ref.update({k: mean(v) for k, v in cols.items()})
    ref["teacher_response_length"] = sum(len(s.response_ids) for s in t_samples) / len(t_samples)
    for n in (2, 3):  # distinct n-grams per response, averaged
        for key, samples in ((f"distinct_{n}", s_samples), (f"teacher_distinct_{n}", t_samples)):
            ratios = []
            for s in samples:
                grams = [tuple(s.response_ids[i:i + n]) for i in range(len(s.response_ids) - n + 1)]
                ratios.append(len(set(grams)) / len(grams))
            ref[key] = sum(ratios) / len(ratios)
    return ref


@pytest.fixture(scope="module")
def reference(models):
    return _reference(models)


EXACT = ("token_agreement", "top1_agreement", "top1_agreement_teacher", "accuracy", "response_length",
         "teacher_response_length", "distinct_2", "distinct_3", "teacher_distinct_2", "teacher_distinct_3")


@pytest.mark.parametrize("world,tp,pp", [(1, 1, 1), (2, 2, 1), (2, 1, 2), (2, 1, 1)], ids=["tp1", "tp2", "pp2", "dp2"])
def test_metrics_match_float64_reference(models, reference, world, tp, pp):
    outs = run_distributed(_evaluate, world, tp=tp, pp=pp, args=(str(models), True))
    ref = reference
    assert ref["reverse_kl"] > 0.1 and ref["forward_kl"] > 0.1  # the two models really differ
    assert 0 < ref["distinct_2"] < 1  # some responses loop
    for out in outs:  # every rank gets the same dict
        got = out["first"]
        missing = set(ref) - set(got)
        assert not missing, missing
        for key, value in ref.items():
            if key in EXACT:
                assert got[key] == pytest.approx(value, abs=1e-12), key
            else:
                assert got[key] == pytest.approx(value, rel=2e-4, abs=2e-4), (key, got[key], value)
        # the teacher's samples are drawn once and reused (the student's are redrawn every evaluation)
        for key in ("forward_kl", "teacher_response_length", "teacher_distinct_2"):
            assert out["second"][key] == got[key]
    assert outs[0]["teacher_calls"] == 1


def test_without_teacher_samples_only_student_metrics(models, reference):
    out = run_distributed(_evaluate, 1, args=(str(models), False))[0]["first"]
    assert "forward_kl" not in out and "teacher_response_length" not in out
    assert out["reverse_kl"] == pytest.approx(reference["reverse_kl"], rel=2e-4, abs=2e-4)


def test_distinct_n():
    assert distinct_n([[1, 2, 3, 4]], 2) == 1.0
    assert distinct_n([[1, 2, 1, 2, 1, 2]], 2) == pytest.approx(2 / 5)
    assert distinct_n([[1, 2, 1, 2, 1, 2], [5, 6, 7]], 3) == pytest.approx((2 / 4 + 1) / 2)
    assert distinct_n([[1], []], 2) != distinct_n([[1], []], 2)  # nan: no response has a bigram
    assert math.isnan(distinct_n([], 2))


def test_before_after_table_and_figures(tmp_path):
    """`tropd train` prints the held-out metrics before / after (teacher column where it has one); `tropd plot`
    draws every eval metric and the distillation grid."""
    from megatron_tropd.training.loop import summary_text
    from megatron_tropd.training.metrics import MetricsLogger
    from megatron_tropd.training.plot import plot_run

    before = {"forward_kl": 11.1, "reverse_kl": 7.9, "top1_agreement": 0.006, "distinct_2": 0.5,
              "teacher_distinct_2": 0.9, "response_length": 30.0, "teacher_response_length": 24.0}
    after = {**before, "forward_kl": 2.1, "top1_agreement": 0.39, "distinct_2": 0.8}
    with MetricsLogger(tmp_path, tensorboard=False, progress=False) as ml:
        ml.log(0, {"loss": 1.0})
        ml.log_eval(0, before)
        ml.log_eval(4, after)
    text = summary_text({"before": before, "after": after, "steps": 4, "wall_s": 1.0}, tmp_path)
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line[:1].isalpha() and " " in line}
    assert rows["forward_kl"] == ["11.1000", "2.1000"]
    assert rows["top1_agreement"] == ["0.0060", "0.3900"]
    assert rows["distinct_2"] == ["0.5000", "0.8000", "0.9000"]  # the teacher's own value
    names = {p.name for p in plot_run(tmp_path, tmp_path / "png")}
    assert {"eval_forward_kl.png", "eval_top1_agreement.png", "eval_distillation.png", "loss.png"} <= names
    assert (tmp_path / "png" / "eval_distillation.png").stat().st_size > 1000
