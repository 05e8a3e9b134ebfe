"""Parity with the published baselines (docs/objectives.md): EOPD's inclusive gate on the teacher's full-vocabulary
entropy at the rollout temperature, and both transcriptions of REOPOLD's reward floor."""
import math

import pytest
import torch

from megatron_tropd import ops
from megatron_tropd.objectives import ObjectiveConfig, TokenInputs, build_objective, reopold_floor


def _inputs(b=2, s=5, k=4, seed=0, **extra):
    g = torch.Generator().manual_seed(seed)
    lp_s = (-torch.rand(b, s, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    tk = torch.log_softmax(torch.randn(b, s, k, generator=g, dtype=torch.float64), -1) - 0.1
    return TokenInputs(
        lp_s=lp_s, lp_old=lp_s.detach().clone(), lp_t=-torch.rand(b, s, generator=g, dtype=torch.float64) * 3,
        response_mask=torch.ones(b, s, dtype=torch.bool), prefix_mask=torch.zeros(b, s, dtype=torch.bool),
        sample_ids=torch.arange(b), positions=torch.arange(s).expand(b, s).contiguous(), step=0,
        tk_lp=tk, tk_ids=torch.arange(k).expand(b, s, k).contiguous(),
        sk_lp=torch.log_softmax(torch.randn(b, s, k, generator=g, dtype=torch.float64), -1).requires_grad_(True),
        **extra)


def test_reopold_floor_forms():
    assert reopold_floor(0.1) == pytest.approx(math.log(0.1) / 0.9, abs=1e-15) == pytest.approx(-2.5584278811)
    assert reopold_floor(0.1, "log_odds") == pytest.approx(math.log(0.1 / 0.9), abs=1e-15)
    assert reopold_floor(0.1, "log_odds") == pytest.approx(-2.1972245773)
    assert ObjectiveConfig(name="reopold").reward_floor == reopold_floor(0.1)  # METHOD.md's form is the default
    cfg = ObjectiveConfig(name="reopold", reopold_floor_form="log_odds", reopold_lambda=0.2)
    assert cfg.reward_floor == pytest.approx(math.log(0.25))
    assert ObjectiveConfig(name="reopold", reopold_floor_form="log_odds", floor=-1.0).reward_floor == -1.0
    with pytest.raises(ValueError, match="reopold_floor_form 'logit'.*log_lambda_div, log_odds"):
        ObjectiveConfig(name="reopold", reopold_floor_form="logit")


@pytest.mark.parametrize("form", ["log_lambda_div", "log_odds"])
def test_reopold_clips_at_the_chosen_floor(form):
    """r far below the floor: every token's reward is exactly the floor, so d loss / d lp_s = -floor / N."""
    inp = _inputs()
    inp.lp_t = inp.lp_old - 50.0
    cfg = ObjectiveConfig(name="reopold", reopold_floor_form=form)
    objective = build_objective(cfg)
    n = inp.response_mask.sum()
    loss, _ = objective(inp, torch.full_like(inp.lp_old, 1.0) / n)
    (grad,) = torch.autograd.grad(loss, inp.lp_s)
    torch.testing.assert_close(grad, torch.full_like(grad, -reopold_floor(0.1, form) / float(n)), rtol=1e-12, atol=0)


def test_eopd_gate_is_inclusive():
    """H_T exactly tau opens the gate (the official code's >=); just below does not."""
    tau = 0.8
    ent = torch.tensor([[tau, math.nextafter(tau, 0.0), math.nextafter(tau, 1.0), tau, 0.0]] * 2,
                       dtype=torch.float64)
    inp = _inputs(ent_t=ent)
    _, metrics = build_objective(ObjectiveConfig(name="eopd", eopd_topk=4, eopd_tau=tau))(
        inp, torch.ones_like(inp.lp_old))
    s, c = metrics["eopd_gate_frac"]
    assert float(s) == 6 and float(c) == 10  # columns 0, 2, 3 of both rows


def test_eopd_entropy_is_full_vocabulary_at_the_rollout_temperature():
    """The scorer's ent_t is ops.entropy of the logits shard over the real vocabulary at temperature T: equal to
    -sum p log p of softmax(z / T) over ids < vocab_size (padding excluded), float64 reference."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 40, generator=g, dtype=torch.float64) * 3
    logits[..., 37:] = 50.0  # padding rows with large junk values must not count
    for t in (0.6, 1.0, 1.3):
        lp = torch.log_softmax(logits[..., :37] / t, -1)
        ref = -(lp.exp() * lp).sum(-1)
        torch.testing.assert_close(ops.entropy(logits, temperature=t, vocab_size=37), ref, rtol=1e-12, atol=1e-12)


def test_prefix_length_distribution_option():
    """TrOPD leaves the prefix-length distribution open: l ~ Uniform{1..L_max(t)} (default) or l = L_max(t)."""
    from megatron_tropd.objectives import PrefixOptions, max_prefix_len, sample_prefix_lengths

    uni = PrefixOptions(total_steps=8, max_response_len=20, prefix_fraction=0.5, seed=1)
    top = PrefixOptions(total_steps=8, max_response_len=20, prefix_fraction=0.5, seed=1, length_dist="max")
    seen = set()
    for step in range(9):
        l_max = max_prefix_len(step, 8, 20)
        assert sample_prefix_lengths(3, 4, step, top) == ([l_max] * 2 + [0] * 2 if l_max else [0] * 4)
        for pid in range(30):
            ls = sample_prefix_lengths(pid, 4, step, uni)
            assert all(1 <= l <= l_max for l in ls[:2]) if l_max else ls[:2] == [0, 0]
            assert ls[2:] == [0, 0]
            seen.update(ls[:2]) if step == 0 else None
    assert len(seen) > 10  # spread over 1..20 at step 0, not a single length
    with pytest.raises(ValueError, match="prefix length distribution 'geometric'"):
        PrefixOptions(total_steps=8, max_response_len=20, length_dist="geometric")


def test_prefix_length_config_key():
    from pathlib import Path

    from megatron_tropd.config import ConfigError, load_config

    main = Path(__file__).resolve().parents[1] / "examples/configs/smollm2_tropd_cpu.yaml"
    assert load_config(main, ["guidance.prefix_length=max"]).guidance.prefix_length == "max"
    with pytest.raises(ConfigError, match="guidance.prefix_length must be one of uniform, max"):
        load_config(main, ["guidance.prefix_length=fixed"])
