"""Objectives on 2 data-parallel ranks (gloo) with uneven micro-batches == the single-process full batch."""
import torch

from megatron_tropd.objectives import (ObjectiveConfig, TokenInputs, build_objective, entropy_threshold,
                                       global_counts, reduce_metrics, token_weights)
from megatron_tropd.distributed.spawn import run_distributed

from test_objectives import make_batch, ref_grads, with_threshold

CONFIGS = [
    ObjectiveConfig(name="tropd", topk=6),
    ObjectiveConfig(name="tropd", topk=6, outlier="clip", aggregation="sequence_mean"),
    ObjectiveConfig(name="reopold", switch_step=0, entropy_frac=0.3),
    ObjectiveConfig(name="eopd", eopd_topk=6),
    ObjectiveConfig(name="entropy_opd"),
    ObjectiveConfig(name="jsd", topk=6),
]
ROWS = {0: [[5, 0], [3]], 1: [[1], [4, 2, 6, 7]]}  # per DP rank: micro-batches of sample rows (any order)
GRAD_LEAVES = ("lp_s", "sk_lp")


def _rows(batch: dict, idx) -> TokenInputs:
    out = {k: (v[idx].clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    for k in GRAD_LEAVES + ("full_kl",):
        out[k].requires_grad_(True)
    return TokenInputs(**out)


def _dp_step(groups, batch: dict, configs):
    """One step on this DP rank's micro-batches: global threshold + counts (one collective each), weights, loss."""
    results = []
    for cfg in configs:
        obj = build_objective(cfg)
        mbs = [_rows(batch, torch.tensor(idx)) for idx in ROWS[groups.dp_rank]]
        req = obj.requirements
        if req.entropy_threshold is not None:
            thr = entropy_threshold([mb.ent_s if req.entropy_threshold == "student" else mb.ent_t for mb in mbs],
                                    [mb.on_policy_mask for mb in mbs], req.entropy_frac, groups.dp)
            for mb in mbs:
                mb.entropy_threshold = thr
        counts = global_counts([(mb.response_mask, mb.prefix_mask) for mb in mbs], groups.dp)
        grads, metrics, loss_sum = {}, [], 0.0
        for idx, mb in zip(ROWS[groups.dp_rank], mbs):
            loss, m = obj(mb, token_weights(mb.response_mask, mb.prefix_mask, counts, cfg.aggregation, torch.float64))
            leaves = [getattr(mb, k) for k in GRAD_LEAVES]
            g = torch.autograd.grad(loss, leaves, allow_unused=True)
            grads[tuple(idx)] = [torch.zeros_like(x) if y is None else y for x, y in zip(leaves, g)]
            metrics.append(m)
            loss_sum += float(loss.detach())
        loss_t = torch.tensor([loss_sum], dtype=torch.float64)
        torch.distributed.all_reduce(loss_t, group=groups.dp)
        results.append({"grads": grads, "loss": float(loss_t), "metrics": reduce_metrics(metrics, groups.dp)})
    return results


def test_two_dp_ranks_match_single_process_and_reference():
    full = make_batch(21, b=8)
    batch = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in vars(full).items()}
    per_rank = run_distributed(_dp_step, 2, args=(batch, CONFIGS))
    for c, cfg in enumerate(CONFIGS):
        single = _rows(batch, torch.arange(8))
        with_threshold(single, cfg)
        counts = global_counts([(single.response_mask, single.prefix_mask)])
        obj = build_objective(cfg)
        loss, m = obj(single, token_weights(single.response_mask, single.prefix_mask, counts, cfg.aggregation,
                                            torch.float64))
        leaves = [getattr(single, k) for k in GRAD_LEAVES]
        g_single = [torch.zeros_like(x) if y is None else y
                    for x, y in zip(leaves, torch.autograd.grad(loss, leaves, allow_unused=True))]
        ref_loss, ref_g = ref_grads(single, cfg)
        assert abs(float(loss.detach()) - float(ref_loss)) < 1e-12
        torch.testing.assert_close(g_single[0], ref_g[0], rtol=1e-10, atol=1e-14)
        got = [torch.zeros_like(g) for g in g_single]
        for res in per_rank:
            assert abs(res[c]["loss"] - float(loss.detach())) < 1e-12, cfg
            for idx, gs in res[c]["grads"].items():
                for j, gr in enumerate(gs):
                    got[j][list(idx)] = gr
        for gd, gs in zip(got, g_single):
            torch.testing.assert_close(gd, gs, rtol=1e-12, atol=1e-15)
        means = reduce_metrics([m])
        assert per_rank[0][c]["metrics"].keys() == means.keys()
        for k, v in means.items():
            assert abs(per_rank[0][c]["metrics"][k] - v) < 1e-12 or (v != v), (cfg.name, k)
        if cfg.name == "tropd":
            assert 0.0 < means["trust/frac"] < 1.0  # both branches exercised
