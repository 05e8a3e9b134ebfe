"""Objectives vs independent float64 loop references (values and gradients), and their properties.

The references below are written from METHOD.md token by token with Python scalars / scalar torch ops; they
share no code with megatron_tropd.objectives (the trust-region RNG is re-implemented here too).
"""
import math

import pytest
import torch

from megatron_tropd.objectives import (ObjectiveConfig, TokenInputs, build_objective, entropy_threshold,
                                       global_counts, reduce_metrics, token_weights)
from megatron_tropd.objectives.registry import per_token_loss

V = 12
STEP = 3
ALL_NAMES = ("opd", "reopold", "eopd", "entropy_opd", "jsd", "tropd", "full_vocab", "topk_fkl")


# ----------------------------------------------------------------------------------------------- test data
def make_batch(seed, b=4, s=7, k=6, prefix=True, dtype=torch.float64, sid_offset=100):
    """Consistent per-token quantities from random student / teacher logits over a V-token vocabulary."""
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, s, V, generator=g, dtype=dtype) * 1.5
    zt = zs + torch.randn(b, s, V, generator=g, dtype=dtype) * 1.5
    ls, lt = zs.log_softmax(-1), zt.log_softmax(-1)
    tok = torch.randint(V, (b, s, 1), generator=g)
    lp_s = ls.gather(-1, tok)[..., 0]
    tk_lp, tk_ids = lt.topk(k, dim=-1)
    lengths = torch.randint(3, s + 1, (b,), generator=g)
    pos = torch.arange(s).expand(b, s)
    response = pos < lengths[:, None]
    pre_len = torch.randint(1, 3, (b,), generator=g) * (torch.arange(b) % 2 == 1)  # odd rows have a prefix
    prefix_m = (pos < pre_len[:, None]) & response if prefix else torch.zeros_like(response)
    return TokenInputs(
        lp_s=lp_s.clone().requires_grad_(True),
        lp_old=(lp_s + 0.2 * torch.randn(b, s, generator=g, dtype=dtype)).detach(),  # rho != 1
        lp_t=lt.gather(-1, tok)[..., 0].detach(),
        lp_roll=(lp_s + 0.3 * torch.randn(b, s, generator=g, dtype=dtype)).detach(),
        response_mask=response, prefix_mask=prefix_m,
        sample_ids=torch.arange(b, dtype=torch.int64) + sid_offset + 1000 * seed,
        positions=(pos + 5).to(torch.int64), step=STEP,
        tk_lp=tk_lp.detach(), tk_ids=tk_ids,
        sk_lp=ls.gather(-1, tk_ids).clone().requires_grad_(True),
        ent_t=-(lt.exp() * lt).sum(-1), ent_s=-(ls.exp() * ls).sum(-1),
        full_kl=(lt.exp() * (lt - ls)).sum(-1).clone().requires_grad_(True),
    )


def run(inp, cfg, weights=None):
    obj = build_objective(cfg)
    if weights is None:
        counts = global_counts([(inp.response_mask, inp.prefix_mask)])
        weights = token_weights(inp.response_mask, inp.prefix_mask, counts, cfg.aggregation, inp.lp_s.dtype)
    loss, metrics = obj(inp, weights)
    leaves = [inp.lp_s, inp.sk_lp, inp.full_kl]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    return loss.detach(), grads, metrics


# --------------------------------------------------------------------------------- independent references
M64 = (1 << 64) - 1


def ref_uniform(*keys):
    h = None
    for key in keys:
        x = (key & M64) if h is None else (h ^ (key & M64))
        x = (x + 0x9E3779B97F4A7C15) & M64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
        h = x ^ (x >> 31)
    return (h >> 11) / 2.0 ** 53


def ref_trust(inp, seed, i, t, lp_ref):
    p = min(1.0, math.exp(float(inp.lp_t[i, t]) - float(lp_ref[i, t])))
    u = ref_uniform(seed, 1, inp.step, int(inp.sample_ids[i]), int(inp.positions[i, t]))
    return u < p


def ref_pg(lp_s, lp_old, r, clip):
    """-rho r, or max(-rho r, -clip(rho) r)."""
    rho = torch.exp(lp_s - lp_old)
    if clip is None:
        return -rho * r
    c = torch.clamp(rho, 1 - clip[0], 1 + clip[1])
    return torch.maximum(-rho * r, -c * r)


def ref_fkl(tk, sk, renorm):
    p = [math.exp(float(x)) for x in tk]
    z = sum(p) if renorm else 1.0
    return sum((pv / z) * (math.log(pv / z) - sv) for pv, sv in zip(p, sk))


def ref_threshold(inp, ent, frac):
    vals = sorted((float(ent[i, t]) for i, t in onp_tokens(inp)), reverse=True)
    return vals[math.ceil(round(frac * len(vals), 9)) - 1]


def onp_tokens(inp):
    b, s = inp.lp_s.shape
    return [(i, t) for i in range(b) for t in range(s) if inp.response_mask[i, t] and not inp.prefix_mask[i, t]]


def pre_tokens(inp):
    b, s = inp.lp_s.shape
    return [(i, t) for i in range(b) for t in range(s) if inp.prefix_mask[i, t]]


def ref_term(inp, cfg, i, t):
    """Per-token loss of the on-policy term at (i, t) per METHOD.md."""
    lp_s, lp_old, lp_t = inp.lp_s[i, t], float(inp.lp_old[i, t]), float(inp.lp_t[i, t])
    r = lp_t - lp_old
    clip = (cfg.clip_eps_low, cfg.clip_eps_high) if (cfg.ppo_clip or (cfg.ppo_clip is None and cfg.name == "eopd")) \
        else None
    floor = cfg.floor if cfg.floor is not None else math.log(cfg.reopold_lambda) / (1 - cfg.reopold_lambda)
    k = cfg.topk
    zero = lp_s * 0.0
    if cfg.name == "opd":
        return ref_pg(lp_s, lp_old, r, clip) if math.isfinite(r) else zero
    if cfg.name == "entropy_opd":
        ent = inp.ent_s if cfg.entropy_source == "student" else inp.ent_t
        if float(ent[i, t]) < ref_threshold(inp, ent, cfg.entropy_frac) or not math.isfinite(r):
            return zero
        return ref_pg(lp_s, lp_old, r, clip)
    if cfg.name == "reopold":
        if cfg.mask_clipped and r < floor:
            return zero
        if cfg.switch_step is not None and inp.step >= cfg.switch_step and \
                float(inp.ent_s[i, t]) < ref_threshold(inp, inp.ent_s, cfg.entropy_frac):
            return zero
        return ref_pg(lp_s, lp_old, max(r, floor), clip)
    if cfg.name == "eopd":
        loss = ref_pg(lp_s, lp_old, r, clip) if math.isfinite(r) else zero
        if float(inp.ent_t[i, t]) >= cfg.eopd_tau:  # inclusive gate, as the official EOPD code
            order = sorted(range(inp.tk_lp.shape[-1]), key=lambda v: -float(inp.tk_lp[i, t, v]))[:cfg.eopd_topk]
            p = [math.exp(float(inp.tk_lp[i, t, v])) for v in order]
            z = sum(p)
            loss = loss + cfg.eopd_alpha * sum(
                (pv / z) * (math.log(pv / z) - inp.sk_lp[i, t, v]) for pv, v in zip(p, order))
        return loss
    if cfg.name == "jsd":
        beta = cfg.jsd_beta
        direct = zero
        for v in range(k):
            pv = math.exp(float(inp.tk_lp[i, t, v]))
            m = beta * pv + (1 - beta) * torch.exp(inp.sk_lp[i, t, v])
            direct = direct + beta * pv * (math.log(pv) - torch.log(m))
        m_x = beta * math.exp(lp_t) + (1 - beta) * math.exp(lp_old)
        return direct + (1 - beta) * torch.exp(lp_s - lp_old) * (lp_old - math.log(m_x))
    if cfg.name == "tropd":
        lp_ref = inp.lp_roll if cfg.trust_logprob == "rollout" else inp.lp_old
        if ref_trust(inp, cfg.seed, i, t, lp_ref):
            return ref_pg(lp_s, lp_old, r, clip)
        if cfg.outlier == "mask":
            return zero
        if cfg.outlier == "clip":
            return ref_pg(lp_s, lp_old, max(r, floor), clip)
        p = [math.exp(float(x)) for x in inp.tk_lp[i, t, :k]]
        z = sum(p) if cfg.renormalize else 1.0
        return sum((pv / z) * (math.log(pv / z) - inp.sk_lp[i, t, v]) for v, pv in enumerate(p))
    if cfg.name == "full_vocab":
        return inp.full_kl[i, t]
    if cfg.name == "topk_fkl":
        p = [math.exp(float(x)) for x in inp.tk_lp[i, t, :k]]
        z = sum(p) if cfg.renormalize else 1.0
        return sum((pv / z) * (math.log(pv / z) - inp.sk_lp[i, t, v]) for v, pv in enumerate(p))
    raise AssertionError(cfg.name)


def ref_loss(inp, cfg):
    """Global token mean (or sequence mean) of the on-policy terms + prefix_beta * mean(-lp_s) on the prefix."""
    onp, pre = onp_tokens(inp), pre_tokens(inp)
    if cfg.aggregation == "token_mean":
        loss = sum(ref_term(inp, cfg, i, t) for i, t in onp) / max(len(onp), 1)
        loss = loss + sum(cfg.prefix_beta * -inp.lp_s[i, t] for i, t in pre) / max(len(pre), 1)
        return loss
    total = 0.0
    for toks in (onp, None):
        is_pre = toks is None
        toks = pre if is_pre else onp
        rows = sorted({i for i, _ in toks})
        for row in rows:
            mine = [(i, t) for i, t in toks if i == row]
            vals = [cfg.prefix_beta * -inp.lp_s[i, t] if is_pre else ref_term(inp, cfg, i, t) for i, t in mine]
            total = total + sum(vals) / len(vals) / len(rows)
    return total


def ref_grads(inp, cfg):
    leaves = [inp.lp_s, inp.sk_lp, inp.full_kl]
    loss = ref_loss(inp, cfg)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def with_threshold(inp, cfg):
    req = build_objective(cfg).requirements
    if req.entropy_threshold is not None:
        ent = inp.ent_s if req.entropy_threshold == "student" else inp.ent_t
        inp.entropy_threshold = entropy_threshold([ent], [inp.response_mask & ~inp.prefix_mask], req.entropy_frac)
    return inp


CASES = [
    ObjectiveConfig(name="opd"),
    ObjectiveConfig(name="opd", ppo_clip=True, clip_eps_low=0.1, clip_eps_high=0.15),
    ObjectiveConfig(name="opd", aggregation="sequence_mean"),
    ObjectiveConfig(name="reopold"),
    ObjectiveConfig(name="reopold", mask_clipped=True),
    ObjectiveConfig(name="reopold", floor=-1.0, switch_step=STEP, entropy_frac=0.4),
    ObjectiveConfig(name="reopold", switch_step=STEP + 1),  # stage 1 still
    ObjectiveConfig(name="eopd", eopd_topk=4, eopd_tau=0.8),
    ObjectiveConfig(name="eopd", eopd_topk=6, eopd_alpha=0.5, eopd_tau=1.2),
    ObjectiveConfig(name="entropy_opd"),
    ObjectiveConfig(name="entropy_opd", entropy_source="teacher", entropy_frac=0.5),
    ObjectiveConfig(name="jsd", topk=6),
    ObjectiveConfig(name="jsd", topk=6, jsd_beta=0.3),
    ObjectiveConfig(name="tropd", topk=6),
    ObjectiveConfig(name="tropd", topk=6, renormalize=True, seed=7),
    ObjectiveConfig(name="tropd", topk=6, outlier="clip"),
    ObjectiveConfig(name="tropd", topk=6, outlier="mask", prefix_beta=0.5),
    ObjectiveConfig(name="tropd", topk=6, trust_logprob="rollout", ppo_clip=True),
    ObjectiveConfig(name="tropd", topk=6, aggregation="sequence_mean"),
    ObjectiveConfig(name="full_vocab"),
    ObjectiveConfig(name="topk_fkl", topk=6),
    ObjectiveConfig(name="topk_fkl", topk=4, renormalize=True),
]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.name}")
def test_matches_float64_reference(cfg):
    inp = with_threshold(make_batch(0), cfg)
    loss, grads, _ = run(inp, cfg)
    ref, ref_g = ref_grads(inp, cfg)
    assert abs(float(loss) - float(ref)) < 1e-10 * max(1.0, abs(float(ref))), (float(loss), float(ref))
    for g, rg, name in zip(grads, ref_g, ("lp_s", "sk_lp", "full_kl")):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-12, msg=f"grad {name}")
    assert grads[0].abs().sum() > 0  # the test data exercise the on-policy or prefix gradient
    if cfg.name == "opd" and cfg.ppo_clip:  # and the PPO clip is active on some tokens
        assert 0 < float(run(inp, cfg)[2]["clipped_frac"][0])


def test_reference_cases_exercise_every_branch():
    """The shared test batch has trusted and outlier tokens, r below the floor, and gated / ungated EOPD tokens."""
    inp = make_batch(0)
    toks = onp_tokens(inp)
    r = [float(inp.lp_t[i, t] - inp.lp_old[i, t]) for i, t in toks]
    trust = [ref_trust(inp, 0, i, t, inp.lp_old) for i, t in toks]
    assert any(trust) and not all(trust)
    assert any(x < math.log(0.1) / 0.9 for x in r) and any(x > 0 for x in r)
    h = [float(inp.ent_t[i, t]) for i, t in toks]
    assert any(x > 0.8 for x in h) and any(x <= 0.8 for x in h)


def test_float32_inputs_close_to_float64():
    cfg = ObjectiveConfig(name="tropd", topk=6)
    inp64 = make_batch(1)
    inp32 = TokenInputs(**{k: (v.detach().float().requires_grad_(v.requires_grad)
                               if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                           for k, v in vars(inp64).items()})
    l64, g64, _ = run(inp64, cfg)
    l32, g32, _ = run(inp32, cfg)
    assert l32.dtype == torch.float32
    assert abs(float(l32) - float(l64)) < 1e-4
    torch.testing.assert_close(g32[1].double(), g64[1], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ properties
def test_opd_gradient_is_minus_r_times_rho():
    inp = make_batch(2, prefix=False)
    cfg = ObjectiveConfig(name="opd")
    _, grads, _ = run(inp, cfg)
    n = len(onp_tokens(inp))
    expect = torch.zeros_like(inp.lp_old)
    for i, t in onp_tokens(inp):
        r = float(inp.lp_t[i, t] - inp.lp_old[i, t])
        expect[i, t] = -r * math.exp(float(inp.lp_s[i, t].detach() - inp.lp_old[i, t])) / n
    torch.testing.assert_close(grads[0], expect, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("outlier", ["fkl", "clip", "mask"])
def test_tropd_with_full_trust_equals_opd(outlier):
    inp = make_batch(3)
    inp.lp_t = torch.maximum(inp.lp_t, inp.lp_old + 0.01)  # r > 0 everywhere: P_trust = 1
    l_tr, g_tr, m = run(inp, ObjectiveConfig(name="tropd", topk=6, outlier=outlier))
    l_opd, g_opd, _ = run(inp, ObjectiveConfig(name="opd"))
    assert float(l_tr) == pytest.approx(float(l_opd), rel=1e-14)
    torch.testing.assert_close(g_tr[0], g_opd[0], rtol=0, atol=0)
    assert g_tr[1].abs().sum() == 0
    assert float(m["trust/frac"][0] / m["trust/frac"][1]) == 1.0


def test_trust_logprob_rollout_uses_lp_roll():
    inp = make_batch(15, b=6, prefix=False)
    with torch.no_grad():
        inp.lp_old.copy_(inp.lp_t - 0.5)  # r_old > 0: P_trust(old) = 1
        inp.lp_roll.copy_(inp.lp_t + 1.0)  # P_trust(rollout) = exp(-1)
    frac = {}
    for which in ("old", "rollout"):
        cfg = ObjectiveConfig(name="tropd", topk=6, trust_logprob=which)
        loss, grads, m = run(inp, cfg)
        ref, ref_g = ref_grads(inp, cfg)
        assert float(loss) == pytest.approx(float(ref), rel=1e-12)
        torch.testing.assert_close(grads[1], ref_g[1], rtol=1e-10, atol=1e-14)
        frac[which] = float(m["trust/frac"][0] / m["trust/frac"][1])
    assert frac["old"] == 1.0 and 0.1 < frac["rollout"] < 0.7


def test_fkl_outlier_gradient_is_direct_forward_kl():
    """All tokens outliers (lp_t very low): d loss / d logits_S = w * sum_v pi_T,v d(-log pi_S,v), and the
    sampled token's log-prob gets no gradient (it is not a detached reward)."""
    b, s, k = 2, 3, 5
    g = torch.Generator().manual_seed(4)
    zs = torch.randn(b, s, V, generator=g, dtype=torch.float64, requires_grad=True)
    tk_lp, tk_ids = torch.randn(b, s, V, generator=g, dtype=torch.float64).log_softmax(-1).topk(k, dim=-1)
    ls = zs.log_softmax(-1)
    lp_s = ls[..., 0]
    mask = torch.ones(b, s, dtype=torch.bool)
    inp = TokenInputs(lp_s=lp_s, lp_old=lp_s.detach(), lp_t=torch.full((b, s), -60.0, dtype=torch.float64),
                      response_mask=mask, prefix_mask=~mask, sample_ids=torch.arange(b),
                      positions=torch.arange(s).expand(b, s).contiguous(), step=0,
                      tk_lp=tk_lp, tk_ids=tk_ids, sk_lp=ls.gather(-1, tk_ids))
    loss, metrics = build_objective(ObjectiveConfig(name="tropd", topk=k))(inp, torch.full((b, s), 0.25,
                                                                                            dtype=torch.float64))
    assert metrics["trust/outlier_frac"][0] == b * s
    g_lp_s, = torch.autograd.grad(loss, lp_s, retain_graph=True)
    assert g_lp_s.abs().max() == 0  # no reward-weighted score-function gradient on the sampled token
    g_logits, = torch.autograd.grad(loss, zs)
    # sum_v pi_T,v d(-log pi_S,v)/dz = (sum_v pi_T,v) * softmax(z) - scatter(pi_T)
    pi_t = tk_lp.exp()
    expect = pi_t.sum(-1, keepdim=True) * zs.detach().softmax(-1)
    expect = expect - torch.zeros_like(expect).scatter(-1, tk_ids, pi_t)
    torch.testing.assert_close(g_logits, 0.25 * expect, rtol=1e-10, atol=1e-14)
    assert float(metrics["fkl_outlier"][0]) > 0


@pytest.mark.parametrize("name", ALL_NAMES)
def test_teacher_minus_inf_and_garbage_padding_are_finite(name):
    inp = make_batch(5, k=6)
    onp = inp.response_mask & ~inp.prefix_mask
    pad = ~inp.response_mask
    with torch.no_grad():
        first = onp.nonzero()[:3]
        inp.lp_t[first[:, 0], first[:, 1]] = float("-inf")
        inp.tk_lp[first[:, 0], first[:, 1], -2:] = float("-inf")  # teacher support smaller than k
        inp.lp_t[pad] = float("nan")
        inp.lp_old[pad] = float("nan")
        inp.lp_s[pad] = float("nan")
        inp.sk_lp[pad] = float("nan")
        inp.full_kl[pad] = float("inf")
    cfg = ObjectiveConfig(name=name, topk=6, eopd_topk=6, eopd_tau=0.0, switch_step=0)
    inp = with_threshold(inp, cfg)
    loss, grads, metrics = run(inp, cfg)
    assert torch.isfinite(loss)
    for gr in grads:
        assert torch.isfinite(gr).all()
        assert (gr[pad] == 0).all()
    assert all(math.isfinite(float(v)) for v, _ in metrics.values())
    per_tok, m = per_token_loss(inp, cfg)
    if name == "tropd":  # -inf teacher log-prob: P_trust = 0, always an outlier
        assert not m["trust/frac"][0][first[:, 0], first[:, 1]].any()
    if name == "opd":  # no finite K1 reward: nothing applies, the token contributes exactly 0
        assert (per_tok[first[:, 0], first[:, 1]] == 0).all()
        assert float(metrics["reward/nonfinite_frac"][0]) == 3


@pytest.mark.parametrize("name", ALL_NAMES)
def test_all_tokens_masked_gives_zero_loss_and_zero_grad(name):
    inp = make_batch(6)
    with torch.no_grad():
        inp.lp_t.fill_(float("-inf"))
    inp.response_mask = torch.zeros_like(inp.response_mask)
    inp.prefix_mask = torch.zeros_like(inp.prefix_mask)
    cfg = ObjectiveConfig(name=name, topk=6, eopd_topk=6)
    inp = with_threshold(inp, cfg)
    assert inp.entropy_threshold in (None, float("inf"))
    loss, grads, metrics = run(inp, cfg)
    assert float(loss) == 0.0
    assert all((gr == 0).all() for gr in grads)
    assert all(float(c) == 0 for _, c in metrics.values())
    assert all(math.isnan(v) for v in reduce_metrics([metrics]).values())


def test_reopold_floor_default():
    cfg = ObjectiveConfig(name="reopold")
    assert cfg.reward_floor == pytest.approx(math.log(0.1) / 0.9, abs=1e-15)
    assert cfg.reward_floor == pytest.approx(-2.5584278811044956)
    assert ObjectiveConfig(name="reopold", floor=-1.5).reward_floor == -1.5
    # A token with r far below the floor gets exactly the floor's reward: gradient -floor * rho / N.
    inp = make_batch(7, prefix=False)
    with torch.no_grad():
        inp.lp_t.copy_(inp.lp_old - 50.0)
    _, grads, m = run(inp, cfg)
    n = len(onp_tokens(inp))
    rho = torch.exp(inp.lp_s - inp.lp_old).detach()
    torch.testing.assert_close(grads[0], (-cfg.reward_floor * rho / n) * inp.response_mask, rtol=1e-12, atol=0)
    assert float(m["reward_clipped_frac"][0]) == n


def test_eopd_gate_switches_at_tau():
    inp = make_batch(8, prefix=False)
    tau = 0.8
    onp = inp.response_mask
    inp.ent_t = torch.where(torch.arange(inp.ent_t.shape[1]) % 3 == 0, torch.tensor(tau, dtype=torch.float64),
                            torch.where(torch.arange(inp.ent_t.shape[1]) % 3 == 1,
                                        torch.tensor(math.nextafter(tau, 1.0), dtype=torch.float64),
                                        torch.tensor(math.nextafter(tau, 0.0), dtype=torch.float64))).expand_as(onp)
    _, grads, m = run(inp, ObjectiveConfig(name="eopd", eopd_topk=6, eopd_tau=tau))
    gated = (grads[1].abs().sum(-1) > 0)
    expect = onp & (torch.arange(onp.shape[1]) % 3 <= 1)  # H_T == tau and H_T > tau are gated (>=)
    assert torch.equal(gated, expect)
    assert float(m["eopd_gate_frac"][0]) == expect.sum()


def test_eopd_default_topk_selects_highest_teacher_entries():
    """Given a larger teacher top-k (64 for TrOPD) EOPD uses its own k = 16 highest, in any order."""
    inp = make_batch(9, k=V, prefix=False)  # k = 12 here; use eopd_topk = 5 and shuffle the top-k order
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(0))
    inp.tk_lp = inp.tk_lp[..., perm]
    inp.sk_lp = inp.sk_lp.detach()[..., perm].requires_grad_(True)
    cfg = ObjectiveConfig(name="eopd", eopd_topk=5)
    loss, grads, _ = run(inp, cfg)
    ref, ref_g = ref_grads(inp, cfg)
    assert float(loss) == pytest.approx(float(ref), rel=1e-12)
    torch.testing.assert_close(grads[1], ref_g[1], rtol=1e-10, atol=1e-14)
    assert ObjectiveConfig(name="eopd").eopd_topk == 16 and build_objective("eopd").requirements.teacher_topk == 16


def test_entropy_threshold_top_fraction():
    h = torch.arange(20, dtype=torch.float64).reshape(2, 10)
    mask = torch.ones(2, 10, dtype=torch.bool)
    assert entropy_threshold([h[:1], h[1:]], [mask[:1], mask[1:]], 0.2) == 16.0  # top 4 of 20: {16..19}
    assert entropy_threshold([h], [mask], 0.15) == 17.0  # ceil(3.0) = 3 tokens, not 4
    assert entropy_threshold([h], [torch.zeros_like(mask)], 0.2) == float("inf")


def test_metrics_means():
    inp = make_batch(10)
    cfg = ObjectiveConfig(name="tropd", topk=6)
    _, _, m = run(inp, cfg)
    means = reduce_metrics([m])
    onp = onp_tokens(inp)
    r = [float(inp.lp_t[i, t] - inp.lp_old[i, t]) for i, t in onp]
    assert means["reward/mean_r"] == pytest.approx(sum(r) / len(r))
    assert means["reward/k1_rkl"] == pytest.approx(-sum(r) / len(r))
    trust = [ref_trust(inp, 0, i, t, inp.lp_old) for i, t in onp]
    assert means["trust/frac"] == pytest.approx(sum(trust) / len(trust))
    assert means["trust/outlier_frac"] == pytest.approx(1 - sum(trust) / len(trust))
    fkl = [ref_fkl(inp.tk_lp[i, t], [float(x) for x in inp.sk_lp[i, t].detach()], False)
           for (i, t), tr in zip(onp, trust) if not tr]
    assert means["fkl_outlier"] == pytest.approx(sum(fkl) / len(fkl))
    assert means["entropy/teacher"] == pytest.approx(sum(float(inp.ent_t[i, t]) for i, t in onp) / len(onp))
    for key in ("loss/opd_trust", "loss/outlier_fkl", "loss/prefix", "prefix_tokens", "response_tokens"):
        assert key in means


def test_microbatch_split_and_order_give_same_loss_and_grad():
    for cfg in (ObjectiveConfig(name="tropd", topk=6), ObjectiveConfig(name="reopold", switch_step=0),
                ObjectiveConfig(name="eopd", eopd_topk=6), ObjectiveConfig(name="opd", aggregation="sequence_mean")):
        full = make_batch(11, b=6)
        obj = build_objective(cfg)
        with_threshold(full, cfg)
        loss_full, g_full, _ = run(full, cfg)
        # Same samples, reversed order, in micro-batches of 2 / 1 / 3 rows.
        order = torch.arange(6).flip(0)
        splits = [order[:2], order[2:3], order[3:]]
        mbs = [slice_inputs(full, idx) for idx in splits]
        counts = global_counts([(mb.response_mask, mb.prefix_mask) for mb in mbs])
        thr = full.entropy_threshold
        total = 0.0
        g = torch.zeros_like(full.lp_s)
        for idx, mb in zip(splits, mbs):
            mb.entropy_threshold = thr
            w = token_weights(mb.response_mask, mb.prefix_mask, counts, cfg.aggregation, torch.float64)
            loss, _ = obj(mb, w)
            total += float(loss.detach())
            g[idx] = torch.autograd.grad(loss, mb.lp_s)[0]
        assert total == pytest.approx(float(loss_full), rel=1e-12)
        torch.testing.assert_close(g, g_full[0], rtol=1e-12, atol=1e-15)


def slice_inputs(inp, idx):
    out = {}
    for name, v in vars(inp).items():
        if isinstance(v, torch.Tensor):
            v = v.detach()[idx].clone()
            if name in ("lp_s", "sk_lp", "full_kl"):
                v.requires_grad_(True)
        out[name] = v
    return TokenInputs(**out)


def test_trust_mask_is_layout_independent():
    from megatron_tropd.objectives import trust_mask

    inp = make_batch(12, b=6)
    p = torch.rand(inp.lp_s.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = trust_mask(p, 5, STEP, inp.sample_ids, inp.positions)
    perm = torch.tensor([4, 1, 5, 0, 3, 2])
    parts = [perm[:1], perm[1:4], perm[4:]]
    got = torch.zeros_like(full)
    for idx in parts:
        got[idx] = trust_mask(p[idx], 5, STEP, inp.sample_ids[idx], inp.positions[idx])
    assert torch.equal(got, full)
    for i in range(6):
        for t in range(inp.lp_s.shape[1]):
            u = ref_uniform(5, 1, STEP, int(inp.sample_ids[i]), int(inp.positions[i, t]))
            assert bool(full[i, t]) == (u < float(p[i, t]))
    assert 0.3 < full.double().mean() < 0.7
    assert not torch.equal(full, trust_mask(p, 5, STEP + 1, inp.sample_ids, inp.positions))  # step matters


def test_rng_matches_uint64_reference_and_is_uniform():
    from megatron_tropd.objectives import rng

    keys = torch.tensor([0, 1, 2 ** 62 + 12345, -7, 2 ** 40])
    u = rng.uniform(3, 1, 9, keys)
    for key, val in zip(keys.tolist(), u.tolist()):
        assert val == ref_uniform(3, 1, 9, key)
    big = rng.uniform(0, 1, 0, torch.arange(20000))
    assert 0.0 <= big.min() and big.max() < 1.0
    assert abs(big.mean().item() - 0.5) < 0.01


# --------------------------------------------------------------------------------------- config / contract
def test_config_validation_messages():
    with pytest.raises(ValueError, match="valid: opd, reopold, eopd, entropy_opd, jsd, tropd, full_vocab, topk_fkl"):
        ObjectiveConfig(name="kl")
    with pytest.raises(ValueError, match="outlier"):
        ObjectiveConfig(outlier="drop")
    with pytest.raises(ValueError, match="trust_logprob"):
        ObjectiveConfig(trust_logprob="new")
    with pytest.raises(ValueError, match="jsd_beta"):
        ObjectiveConfig(jsd_beta=1.0)
    with pytest.raises(ValueError, match="reopold_lambda"):
        ObjectiveConfig(reopold_lambda=1.0)
    with pytest.raises(ValueError, match="unknown objective config keys \\['topK'\\]"):
        ObjectiveConfig.from_dict({"topK": 3})
    with pytest.raises(ValueError, match="aggregation"):
        ObjectiveConfig(aggregation="sum")
    assert ObjectiveConfig.from_dict({"name": "eopd"}).use_ppo_clip
    assert not ObjectiveConfig().use_ppo_clip


def test_requirements_and_missing_inputs():
    req = {n: build_objective(n).requirements for n in ALL_NAMES}
    assert req["tropd"].teacher_topk == 64 and req["tropd"].student_at_teacher_topk
    assert build_objective(ObjectiveConfig(outlier="mask")).requirements.teacher_topk == 0
    assert build_objective(ObjectiveConfig(trust_logprob="rollout")).requirements.rollout_logprobs
    assert req["opd"].teacher_topk == 0 and not req["opd"].teacher_entropy and req["opd"].full_vocab_kl is None
    assert req["eopd"].teacher_entropy and req["eopd"].teacher_topk == 16
    assert req["entropy_opd"].student_entropy and req["entropy_opd"].entropy_threshold == "student"
    assert req["reopold"].entropy_threshold is None
    assert build_objective(ObjectiveConfig(name="reopold", switch_step=5)).requirements.student_entropy
    assert req["full_vocab"].full_vocab_kl == "forward"
    inp = make_batch(13)
    inp.sk_lp = None
    w = torch.ones_like(inp.lp_old)
    with pytest.raises(ValueError, match="sk_lp"):
        build_objective(ObjectiveConfig(name="tropd", topk=6))(inp, w)
    with pytest.raises(ValueError, match="teacher_topk = 64"):
        build_objective("tropd")(make_batch(13), w)
    with pytest.raises(ValueError, match="entropy_threshold"):
        build_objective("entropy_opd")(make_batch(13), w)
    bad = make_batch(13)
    bad.prefix_mask = ~bad.response_mask
    with pytest.raises(ValueError, match="subset"):
        build_objective("opd")(bad, w)
    bad = make_batch(13)
    bad.lp_t = bad.lp_t[:, :-1]
    with pytest.raises(ValueError, match="lp_t must be"):
        build_objective("opd")(bad, w)
    with pytest.raises(ValueError, match="weights must be"):
        build_objective("opd")(make_batch(13), w[:, :-1])


def test_full_vocab_through_ops_kl_divergence():
    ops = pytest.importorskip("megatron_tropd.ops")
    del ops
    from megatron_tropd.objectives import compute_full_kl

    g = torch.Generator().manual_seed(14)
    zs = torch.randn(2, 3, V, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(2, 3, V, generator=g, dtype=torch.float64)
    for kind in ("forward", "reverse", "jsd"):
        cfg = ObjectiveConfig(name="full_vocab", full_vocab_kind=kind, jsd_beta=0.3)
        kl = compute_full_kl(zs, zt, cfg)
        ps, pt = zs.softmax(-1), zt.softmax(-1)
        m = 0.3 * pt + 0.7 * ps
        ref = {"forward": (pt * (pt.log() - ps.log())).sum(-1), "reverse": (ps * (ps.log() - pt.log())).sum(-1),
               "jsd": 0.3 * (pt * (pt.log() - m.log())).sum(-1) + 0.7 * (ps * (ps.log() - m.log())).sum(-1)}[kind]
        torch.testing.assert_close(kl, ref, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------ prefix schedule
def test_max_prefix_len_cosine_schedule():
    from megatron_tropd.objectives import max_prefix_len

    L, T = 8096, 200
    for t in range(T + 1):
        assert max_prefix_len(t, T, L) == math.floor(L * (1 + math.cos(math.pi * t / T)) / 2)
    assert max_prefix_len(0, T, L) == L and max_prefix_len(T, T, L) == 0 and max_prefix_len(T // 2, T, L) == L // 2
    assert max_prefix_len(T + 5, T, L) == 0  # clamped past the last step
    with pytest.raises(ValueError, match="step"):
        max_prefix_len(-1, T, L)


def test_sample_prefix_lengths_fraction_range_determinism():
    from megatron_tropd.objectives import PrefixOptions, max_prefix_len, sample_prefix_lengths

    opts = PrefixOptions(total_steps=100, max_response_len=40, seed=3)
    step = 30
    l_max = max_prefix_len(step, 100, 40)
    plans = [sample_prefix_lengths(pid, 4, step, opts) for pid in range(400)]
    assert plans == [sample_prefix_lengths(pid, 4, step, opts) for pid in range(400)]  # deterministic
    assert all(p[2:] == [0, 0] and all(1 <= x <= l_max for x in p[:2]) for p in plans)  # 0.5 of 4 rollouts
    vals = [x for p in plans for x in p[:2]]
    assert set(vals) == set(range(1, l_max + 1))  # the whole range Uniform{1..L_max} occurs
    assert abs(sum(vals) / len(vals) - (l_max + 1) / 2) < 1.0
    assert sample_prefix_lengths(0, 4, step, PrefixOptions(100, 40, seed=4)) != plans[0] or \
        sample_prefix_lengths(1, 4, step, PrefixOptions(100, 40, seed=4)) != plans[1]  # seed matters
    assert sample_prefix_lengths(5, 4, 100, opts) == [0, 0, 0, 0]  # L_max(T) = 0
    assert sample_prefix_lengths(5, 4, 0, PrefixOptions(100, 40, enabled=False)) == [0, 0, 0, 0]
    assert sum(x > 0 for x in sample_prefix_lengths(5, 8, 0, PrefixOptions(100, 40, prefix_fraction=0.25))) == 2
    with pytest.raises(ValueError, match="prefix_fraction"):
        PrefixOptions(100, 40, prefix_fraction=1.5)
