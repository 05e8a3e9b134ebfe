"""EmbeddedEngine (own sampling loop over a tiny random HF Llama) and teacher-prefix continuation."""
import pytest
import torch

from megatron_tropd.rollout.base import GenerationRequest, SamplingParams
from megatron_tropd.rollout.embedded import EmbeddedEngine, sample_tokens
from megatron_tropd.rollout.prefixes import generate_with_prefixes
from tiny_hf import tiny_llama

EOS = 2


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def engine(model):
    return EmbeddedEngine(model, max_batch_size=8)


def _prompt(i, length):
    g = torch.Generator().manual_seed(100 + i)
    return tuple(torch.randint(3, 120, (length,), generator=g).tolist())


REQS = [GenerationRequest(prompt_ids=_prompt(i, L), n=2, request_id=10 + i) for i, L in enumerate([3, 9, 5, 1])]


def _reference_logprobs(model, s, temperature):
    """Independent: one plain float64 forward over prompt + response, log_softmax(logits / T) at each response token."""
    ids = torch.tensor([s.prompt_ids + s.response_ids])
    m64 = model.to(torch.float64)
    try:
        logits = m64(ids).logits[0]
    finally:
        model.to(torch.float32)
    lp = torch.log_softmax(logits / temperature, dim=-1)
    start = len(s.prompt_ids) + s.prefix_len
    return lp[start - 1: -1].gather(-1, ids[0, start:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_logprobs_match_plain_forward(model, engine, temperature, top_p):
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=10, seed=1)
    out = engine.generate(REQS, params)
    assert [len(x) for x in out] == [2, 2, 2, 2]
    for req, samples in zip(REQS, out):
        for k, s in enumerate(samples):
            assert s.prompt_ids == list(req.prompt_ids) and s.request_id == req.request_id
            assert s.meta["sample_index"] == k and s.weight_version == 0
            assert len(s.logprobs) == len(s.response_ids) == 10
            ref = _reference_logprobs(model, s, temperature)
            # The *unfiltered* tempered distribution (top-p only restricts the draw).
            torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64), ref, atol=1e-5, rtol=0)
    assert out[0][0].response_ids != out[0][1].response_ids  # distinct seeds per sample index


def test_independent_of_batch_composition(engine):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=12, seed=7)
    together = engine.generate(REQS, params)
    alone = engine.generate([REQS[2]], params)[0]
    split = engine.generate([GenerationRequest(prompt_ids=REQS[2].prompt_ids, n=1, request_id=12,
                                               first_sample_index=1)], params)[0]
    small_batches = EmbeddedEngine(engine.model, max_batch_size=3).generate(list(reversed(REQS)), params)[::-1]
    assert [s.response_ids for s in alone] == [s.response_ids for s in together[2]]
    assert split[0].response_ids == together[2][1].response_ids
    assert [[s.response_ids for s in x] for x in small_batches] == [[s.response_ids for s in x] for x in together]
    torch.testing.assert_close(torch.tensor(alone[0].logprobs), torch.tensor(together[2][0].logprobs), atol=1e-5, rtol=0)
    again = engine.generate(REQS, params)  # same seed: identical
    assert [[s.response_ids for s in x] for x in again] == [[s.response_ids for s in x] for x in together]
    other_seed = engine.generate(REQS, SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=12, seed=8))
    assert [[s.response_ids for s in x] for x in other_seed] != [[s.response_ids for s in x] for x in together]


def test_stop_ids_lengths_and_greedy(model, engine):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    g = engine.generate(REQS, greedy)
    for req, samples in zip(REQS, g):
        ids = torch.tensor([list(req.prompt_ids)])
        for _ in range(6):  # plain argmax decoding
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert samples[0].response_ids == samples[1].response_ids == ids[0, len(req.prompt_ids):].tolist()
        assert samples[0].finish_reason == "length"
    # Stop ids: use a token the sampler emits early as the stop id; the response ends right after it.
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=3)
    free = engine.generate(REQS, params)
    stop_tok = free[1][0].response_ids[3]
    stopped = engine.generate(REQS, SamplingParams(temperature=1.0, max_new_tokens=16, seed=3, stop_token_ids=(stop_tok,)))
    for a, b in zip([s for x in free for s in x], [s for x in stopped for s in x]):
        if stop_tok in a.response_ids:
            cut = a.response_ids.index(stop_tok) + 1
            assert b.response_ids == a.response_ids[:cut] and b.finish_reason == "stop"
            assert len(b.logprobs) == cut
        else:
            assert b.response_ids == a.response_ids and b.finish_reason == "length"
    assert stopped[1][0].response_ids[-1] == stop_tok and len(stopped[1][0].response_ids) <= 4
    per_req = engine.generate([GenerationRequest(prompt_ids=REQS[0].prompt_ids, max_new_tokens=4)], params)[0][0]
    assert len(per_req.response_ids) == 4 and per_req.finish_reason == "length"


def test_prefix_continuation(model, engine):
    params = SamplingParams(temperature=0.9, max_new_tokens=10, seed=2, stop_token_ids=(EOS,))
    prefix = (40, 41, 42)
    s = engine.generate([GenerationRequest(prompt_ids=REQS[1].prompt_ids, prefix_ids=prefix, request_id=5)], params)[0][0]
    assert s.response_ids[:3] == list(prefix) and s.prefix_len == 3
    assert len(s.response_ids) <= 10 and len(s.logprobs) == len(s.response_ids) - 3
    torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64), _reference_logprobs(model, s, 0.9),
                               atol=1e-5, rtol=0)
    done = engine.generate([GenerationRequest(prompt_ids=(5, 6), prefix_ids=(7, EOS))], params)[0][0]
    assert done.response_ids == [7, EOS] and done.logprobs == [] and done.finish_reason == "stop"
    with pytest.raises(ValueError, match="exceeds max_new_tokens"):
        engine.generate([GenerationRequest(prompt_ids=(5,), prefix_ids=tuple(range(3, 14)))], params)


class _ScriptedTeacher:
    """A teacher engine that writes fixed prefixes (to test EOS handling deterministically)."""

    weight_version = 9

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, requests, params):
        from megatron_tropd.rollout.base import Sample

        self.calls.append((requests, params))
        out = []
        for r in requests:
            ids = self.script[r.first_sample_index][: r.max_new_tokens]
            ends = [k for k, t in enumerate(ids) if t in params.stop_token_ids]
            ids = ids[: ends[0] + 1] if ends else ids
            fin = "stop" if ids and ids[-1] in params.stop_token_ids else "length"
            out.append([Sample(list(r.prompt_ids), list(ids), [-1.0] * len(ids), fin, 9, 0, r.request_id)])
        return out


def test_generate_with_prefixes(model, engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=4, stop_token_ids=(EOS,))
    teacher = _ScriptedTeacher({0: [50, 51, 52, 53, 54], 1: [60, EOS, 61], 2: [70, 71, 72, 73, 74, 75, 76, 77, 78]})
    prompts = [REQS[0].prompt_ids, REQS[1].prompt_ids]
    lengths = [[3, 0, 0], [0, 4, 20]]
    out = generate_with_prefixes(engine, teacher, prompts, lengths, params, request_ids=[10, 11])
    (t_reqs, t_params), = teacher.calls
    assert t_params.seed != params.seed and [r.max_new_tokens for r in t_reqs] == [3, 4, 8]
    a = out[0][0]
    assert a.response_ids[:3] == [50, 51, 52] and a.prefix_len == 3 and not a.meta["teacher_only"]
    assert a.meta["prefix_logprobs"] == [-1.0] * 3 and len(a.logprobs) == len(a.response_ids) - 3
    # On-policy rollouts equal plain generation with the same (seed, request id, sample index).
    plain = engine.generate([GenerationRequest(prompt_ids=prompts[0], n=3, request_id=10)], params)[0]
    assert out[0][1].response_ids == plain[1].response_ids and out[0][1].prefix_len == 0
    assert out[0][2].response_ids == plain[2].response_ids
    # The prefix ended at EOS before length 4: kept whole, teacher-only, no student tokens.
    b = out[1][1]
    assert b.response_ids == [60, EOS] and b.prefix_len == 2 and b.logprobs == [] and b.meta["teacher_only"]
    assert b.finish_reason == "stop" and b.weight_version == engine.weight_version
    # A prefix that fills max_new_tokens is teacher-only too.
    c = out[1][2]
    assert c.response_ids == [70, 71, 72, 73, 74, 75, 76, 77] and c.meta["teacher_only"] and c.finish_reason == "length"


def test_generate_with_prefixes_real_teacher(engine):
    teacher = EmbeddedEngine(tiny_llama(seed=1))
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=4)
    out = generate_with_prefixes(engine, teacher, [REQS[0].prompt_ids], [[5, 0]], params)
    t = teacher.generate([GenerationRequest(prompt_ids=REQS[0].prompt_ids, n=1, max_new_tokens=5)],
                         SamplingParams(temperature=1.0, max_new_tokens=8, seed=4 + 0x7EAC4E5))[0][0]
    assert out[0][0].response_ids[:5] == t.response_ids and out[0][0].prefix_len == 5
    assert out[0][0].meta["prefix_logprobs"] == t.logprobs


def test_update_weights(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=0)
    eng = EmbeddedEngine(tiny_llama(seed=0))
    before = eng.generate(REQS[:1], params)[0][0]
    new = tiny_llama(seed=5).state_dict()
    eng.update_weights(iter(new.items()), version=3)  # a generator: streamed
    assert eng.weight_version == 3
    after = eng.generate(REQS[:1], params)[0][0]
    assert after.weight_version == 3 and after.logprobs != before.logprobs
    ref = EmbeddedEngine(tiny_llama(seed=5)).generate(REQS[:1], params)[0][0]
    assert after.response_ids == ref.response_ids
    with pytest.raises(ValueError, match=r"unknown tensor name 'model.layers.0.mlp.up.weight'.*closest"):
        eng.update_weights([("model.layers.0.mlp.up.weight", torch.zeros(1))], version=4)
    assert eng.weight_version == 3  # nothing copied: still usable
    eng.generate(REQS[:1], params)
    with pytest.raises(ValueError, match=r"model.norm.weight: shape \(7,\) does not match the model's \(32,\)"):
        eng.update_weights([("model.embed_tokens.weight", new["model.embed_tokens.weight"]),
                            ("model.norm.weight", torch.zeros(7))], version=4)
    with pytest.raises(RuntimeError, match="partially updated"):  # half-updated weights are never sampled from
        eng.generate(REQS[:1], params)
    with pytest.raises(ValueError, match="tensors missing"):
        eng.update_weights([("model.norm.weight", torch.ones(32))], version=4)
    eng.update_weights(new.items(), version=4)
    assert eng.generate(REQS[:1], params)[0][0].response_ids == ref.response_ids
    tied = EmbeddedEngine(tiny_llama(seed=0, tie=True))  # tied lm_head may be omitted
    tied.update_weights([(k, v) for k, v in tiny_llama(seed=2, tie=True).state_dict().items() if k != "lm_head.weight"], 1)


def test_sample_tokens_top_p_and_distribution():
    logp = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), -1)
    p = logp.exp()[0]
    u = torch.linspace(0.0005, 0.9995, 1000)
    toks = sample_tokens(logp.expand(1000, 4), u, 1.0, 1.0)
    freq = torch.bincount(toks, minlength=4).double() / 1000
    torch.testing.assert_close(freq, p.double(), atol=2e-3, rtol=0)
    nucleus = sample_tokens(logp.expand(1000, 4), u, 1.0, 0.7)  # p = .64, .24, ...: keeps ids 0 and 1
    assert set(nucleus.tolist()) == {0, 1}
    assert abs((nucleus == 0).double().mean().item() - p[0] / (p[0] + p[1])) < 2e-3


def test_top_p_fast_path_equals_full_sort():
    g = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(3, 2000, generator=g) * 6, torch.randn(1, 2000, generator=g) * 0.1])  # peaked + flat
    logp = torch.log_softmax(logits, -1).repeat_interleave(100, dim=0)  # [400, v]
    u = torch.rand(400, generator=g, dtype=torch.float64)
    for top_p in (0.5, 0.9, 0.99):
        sp, order = torch.sort(logp.exp(), dim=-1, descending=True, stable=True)  # reference: full sort
        sp = sp.double()
        sp = sp.masked_fill(sp.cumsum(-1) - sp >= top_p, 0.0)
        cdf = sp.cumsum(-1)
        ref = order.gather(-1, torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True))[:, 0]
        assert sample_tokens(logp, u, 1.0, top_p).tolist() == ref.tolist()
