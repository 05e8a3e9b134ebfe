"""megatron_tropd.ops against an independent float64 unsharded reference, at TP = 1, 2, 4 (gloo ranks).

Each rank takes its vocabulary shard of the same full logits, runs every op in float64 / float32 / bf16,
backprops a fixed random upstream gradient and returns its values and shard gradients. The parent checks that
all TP ranks agree, re-assembles the shard gradients along the vocabulary and compares with the reference
(plain log-softmax over the real vocabulary in float64, autograd for gradients). Inputs have padding columns
filled with huge logits (a leak would show), temperature 0.7, rows with a +1e4 logit, -1e4 logits, a +1e4
common offset, and integer logits full of ties (top-k tie-break: lowest global id first).
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_tropd import ops
from megatron_tropd.distributed.spawn import run_distributed

V_PADDED = 48  # divisible by 1, 2, 4
VOCABS = (43, 35)  # 35: at TP=4 rank 3 holds only padding
SHAPE = (2, 4)  # [b, s] leading dims
TEMP = 0.7
K = 6
BETA = 0.3
KL_KINDS = ("forward", "reverse", "jsd")
DTYPES = (torch.float64, torch.float32, torch.bfloat16)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}
GRAD_OPS = ("lp", "ent", "at") + tuple(f"kl_{k}" for k in KL_KINDS)


def make_inputs(vocab: int, seed: int = 0) -> dict:
    """Full padded student/teacher logits [b, s, V_PADDED] in float64 plus ids and upstream gradients."""
    g = torch.Generator().manual_seed(seed + vocab)
    s = torch.randn(*SHAPE, V_PADDED, generator=g, dtype=torch.float64) * 2
    t = torch.randn(*SHAPE, V_PADDED, generator=g, dtype=torch.float64) * 2
    s[0, 0, 5] = 1e4  # one dominant logit
    s[0, 1, :30:3] = -1e4  # very negative logits
    t[0, 1, 1:40:4] = -1e4
    s[0, 2] += 1e4  # large common offset (tests centering before / T)
    s[1, 0] = torch.randint(-2, 3, (V_PADDED,), generator=g).double()  # many ties
    t[1, 1] = torch.randint(-1, 2, (V_PADDED,), generator=g).double()
    s[..., vocab:] = 1e6  # padding: must never leak
    t[..., vocab:] = 1e6
    tokens = torch.randint(0, vocab, SHAPE, generator=g)
    tokens[0, 0] = 5
    ids = torch.randint(0, vocab, (*SHAPE, 5), generator=g)
    ids[..., 0] = ids[..., 1]  # duplicate ids
    ids[..., 2] = vocab - 1  # the last real id
    grads = {op: torch.randn(*SHAPE, *((5,) if op == "at" else ()), generator=g, dtype=torch.float64)
             for op in GRAD_OPS}
    return dict(s=s, t=t, tokens=tokens, ids=ids, grads=grads)


def run_ops(s_shard, t_shard, inp, vocab, tp_group) -> dict:
    """Every op on one shard; returns {op: (value, shard grad or None)} plus the top-k."""
    kw = dict(temperature=TEMP, vocab_size=vocab)
    calls = {
        "lp": lambda x: ops.token_logprobs(x, inp["tokens"], tp_group, **kw),
        "ent": lambda x: ops.entropy(x, tp_group, **kw),
        "at": lambda x: ops.logprobs_at(x, inp["ids"], tp_group, **kw),
        **{f"kl_{k}": (lambda x, k=k: ops.kl_divergence(x, t_shard, tp_group, kind=k, beta=BETA, **kw))
           for k in KL_KINDS},
    }
    out = {}
    before = s_shard.detach().clone()
    for name, fn in calls.items():
        x = s_shard.detach().clone().requires_grad_(True)
        y = fn(x)
        y.backward(inp["grads"][name].to(y.dtype))
        out[name] = (y.detach(), x.grad)
    assert torch.equal(s_shard, before), "an op modified the caller's logits in place"
    out["topk"] = ops.topk_logprobs(s_shard, K, tp_group, **kw)
    return out


def _rank_fn(groups, inputs: dict, chunk_elements: int) -> dict:
    ops.CHUNK_ELEMENTS = ops.MIN_CHUNK_ELEMENTS = chunk_elements  # tiny chunks: exercise the chunk loops
    tp, r = groups.tp_size, groups.tp_rank
    res = {}
    for vocab, inp in inputs.items():
        for dtype in DTYPES:
            s = inp["s"].to(dtype).chunk(tp, dim=-1)[r].contiguous()
            t = inp["t"].to(dtype).chunk(tp, dim=-1)[r].contiguous()
            res[(vocab, dtype)] = run_ops(s, t, inp, vocab, groups.tp)
    return res


# ---------------------------------------------------------------------------------------------------------------
# Independent float64 reference (full, unsharded logits)
# ---------------------------------------------------------------------------------------------------------------
def ref_logp(full: torch.Tensor, vocab: int) -> torch.Tensor:
    z = full[..., :vocab] / TEMP
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def ref_kl(ls: torch.Tensor, lt: torch.Tensor, kind: str) -> torch.Tensor:
    ps, pt = ls.exp(), lt.exp()
    if kind == "forward":
        return (pt * (lt - ls)).sum(-1)
    if kind == "reverse":
        return (ps * (ls - lt)).sum(-1)
    lm = torch.logaddexp(lt + math.log(BETA), ls + math.log(1 - BETA))  # log m, finite where both p underflow
    return BETA * (pt * (lt - lm)).sum(-1) + (1 - BETA) * (ps * (ls - lm)).sum(-1)


def reference(inp: dict, vocab: int, dtype: torch.dtype) -> dict:
    """{op: (value, grad w.r.t. the full padded logits)} from the same `dtype` values, in float64."""
    out = {}
    t64 = inp["t"].to(dtype).double()
    fns = {
        "lp": lambda ls: ls.gather(-1, inp["tokens"].unsqueeze(-1)).squeeze(-1),
        "ent": lambda ls: -(ls.exp() * ls).sum(-1),
        "at": lambda ls: ls.gather(-1, inp["ids"]),
        **{f"kl_{k}": (lambda ls, k=k: ref_kl(ls, ref_logp(t64, vocab), k)) for k in KL_KINDS},
    }
    for name, fn in fns.items():
        x = inp["s"].to(dtype).double().requires_grad_(True)
        y = fn(ref_logp(x, vocab))
        (grad,) = torch.autograd.grad(y, x, inp["grads"][name])
        out[name] = (y.detach(), grad)
    out["logp"] = ref_logp(inp["s"].to(dtype).double(), vocab)
    return out


def assert_rel(actual: torch.Tensor, ref: torch.Tensor, tol: float, scale: float, what: str) -> None:
    """|actual - ref| <= tol * (|ref| + scale) elementwise (scale: 1 nat for values, max|grad| for grads)."""
    err = (actual.double() - ref).abs()
    bound = tol * (ref.abs() + scale)
    bad = ~(err <= bound)
    assert not bad.any(), f"{what}: max err {err.max().item():.3g}, worst at {bad.nonzero()[:3].tolist()}"


def check_against_reference(per_rank: list[dict], inputs: dict) -> None:
    for vocab, inp in inputs.items():
        for dtype in DTYPES:
            tol, tag = TOL[dtype], f"vocab={vocab} {dtype}"
            res = [r[(vocab, dtype)] for r in per_rank]
            ref = reference(inp, vocab, dtype)
            out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            for name in GRAD_OPS:
                val = res[0][name][0]
                assert val.dtype == out_dtype, f"{tag} {name}: dtype {val.dtype}"
                for r in res[1:]:  # every TP rank holds the same result
                    torch.testing.assert_close(r[name][0], val, rtol=0, atol=0)
                assert_rel(val, ref[name][0], tol, 1.0, f"{tag} {name} value")
                grad = torch.cat([r[name][1] for r in res], dim=-1)
                assert grad.dtype == dtype and grad.shape == inp["s"].shape
                assert (grad[..., vocab:] == 0).all(), f"{tag} {name}: padding got gradient"
                ref_grad = ref[name][1]  # w.r.t. the full padded logits: 0 on padding columns
                assert_rel(grad, ref_grad, tol, ref_grad.abs().max().item(), f"{tag} {name} grad")
            # top-k: same on all ranks, never padding, ids match the reference, lowest id first on ties
            vals, ids = res[0]["topk"]
            for r in res[1:]:
                assert torch.equal(r["topk"][1], ids) and torch.equal(r["topk"][0], vals)
            assert vals.dtype == out_dtype and ids.dtype == torch.long and (ids < vocab).all()
            assert (vals[..., :-1] >= vals[..., 1:]).all(), "top-k not sorted descending"
            logp = ref["logp"]
            stable = torch.sort(logp, dim=-1, descending=True, stable=True).indices[..., :K]  # lowest id first
            assert torch.equal(ids, stable), f"{tag} top-k ids {ids[1, 0]} vs {stable[1, 0]}"
            assert_rel(vals, logp.gather(-1, ids), tol, 1.0, f"{tag} top-k values")
            if dtype == torch.float64:
                rv, ri = torch.topk(logp[0, 3], K)  # a row without ties: torch.topk itself
                assert torch.equal(ids[0, 3], ri)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_ops_match_float64_reference(tp):
    inputs = {v: make_inputs(v) for v in VOCABS}
    per_rank = run_distributed(_rank_fn, tp, tp=tp, args=(inputs, 24), timeout=120)
    check_against_reference(per_rank, inputs)


def test_unsharded_matches_reference_and_default_chunks():
    """tp_group=None (no collectives) with the default chunk size."""
    inputs = {v: make_inputs(v, seed=1) for v in VOCABS}
    per_rank = [{(v, d): run_ops(inp["s"].to(d), inp["t"].to(d), inp, v, None)
                 for v, inp in inputs.items() for d in DTYPES}]
    check_against_reference(per_rank, inputs)


def test_topk_ties_lowest_id_first_and_padding_never_selected():
    x = torch.zeros(3, 10)
    x[:, 8:] = 100.0  # padding with the largest logits
    x[1, 4] = 1.0
    vals, ids = ops.topk_logprobs(x, 4, vocab_size=8)
    assert ids.tolist() == [[0, 1, 2, 3], [4, 0, 1, 2], [0, 1, 2, 3]]
    torch.testing.assert_close(vals[0], torch.full((4,), -torch.log(torch.tensor(8.0))))
    vals, ids = ops.topk_logprobs(x.bfloat16(), 8, vocab_size=8)
    assert sorted(ids[0].tolist()) == list(range(8)) and vals.dtype == torch.float32
    # negative zero ties with zero, -inf logits are still real ids
    y = torch.tensor([[-0.0, 0.0, -float("inf"), -1.0]])
    assert ops.topk_logprobs(y, 4)[1].tolist() == [[0, 1, 3, 2]]


def test_backward_saves_no_logits_sized_tensor():
    """Autograd keeps the input logits and O(tokens) statistics only, never a softmax-sized tensor."""
    x = torch.randn(64, 256, requires_grad=True)
    t = torch.randn(64, 256)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        ops.token_logprobs(x, torch.zeros(64, dtype=torch.long)).sum().backward()
        ops.entropy(x).sum().backward()
        ops.kl_divergence(x, t, kind="jsd").sum().backward()
    big = [s for s in saved if s.numel() >= x.numel() and s.data_ptr() not in (x.data_ptr(), t.data_ptr())]
    assert saved and not big


@pytest.mark.parametrize("call, match", [
    (lambda x: ops.token_logprobs(x, torch.tensor([0, 10]), vocab_size=10), "outside the real vocabulary"),
    (lambda x: ops.token_logprobs(x, torch.tensor([0, -1])), "outside the real vocabulary"),
    (lambda x: ops.token_logprobs(x, torch.tensor([0, 1, 2])), "tokens shape"),
    (lambda x: ops.token_logprobs(x, torch.tensor([0.0, 1.0])), "integer"),
    (lambda x: ops.logprobs_at(x, torch.tensor([[0], [11]]), vocab_size=11), "outside the real vocabulary"),
    (lambda x: ops.logprobs_at(x, torch.tensor([0, 1])), "ids shape"),
    (lambda x: ops.topk_logprobs(x, 11, vocab_size=10), "k=11"),
    (lambda x: ops.topk_logprobs(x, 0), "k=0"),
    (lambda x: ops.entropy(x, vocab_size=13), "vocab_size=13"),
    (lambda x: ops.entropy(x, temperature=0.0), "temperature"),
    (lambda x: ops.entropy(x.long()), "floating-point"),
    (lambda x: ops.kl_divergence(x, x[:, :6]), "same shape"),
    (lambda x: ops.kl_divergence(x, x, kind="tv"), "kind="),
    (lambda x: ops.kl_divergence(x, x, kind="jsd", beta=1.0), "beta="),
])
def test_bad_inputs_raise_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(2, 12))
