"""Foundation: a small GPTModel (local spec) gives the same logits, loss and gradients at every TP x PP x DP
layout as the unsharded TP=1 PP=1 run with the same weights and batch (gloo, CPU)."""
import pytest
import torch
import torch.distributed as dist

from megatron_tropd.models.arch import ModelArch

from megatron_tropd.models.gpt import build_gpt_model
from megatron_tropd.models.sharding import gather_full_state_dict, load_full_state_dict
from megatron_tropd.distributed.spawn import run_distributed

ARCH = ModelArch(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                 vocab_size=250, make_vocab_size_divisible_by=8, add_qkv_bias=True, qk_layernorm=True)
SEQ, BATCH, MICRO = 12, 8, 4


def _reference_weights(groups):
    torch.manual_seed(0)
    model = build_gpt_model(ARCH, groups)
    full = gather_full_state_dict(model, groups)
    # Make every tensor non-trivial (norms are ones at init) so sharding mistakes show up.
    return {k: v + 0.05 * torch.randn_like(v) for k, v in full.items()}


def _train_step(groups, full, tokens, n_micro):
    """One forward-backward over this DP rank's share of `tokens` in `n_micro` micro-batches; returns the mean
    token cross-entropy, full gradients and the gathered logits of the first micro-batch."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model = build_gpt_model(ARCH, groups)
    load_full_state_dict(model, full, groups)
    per_dp = tokens.shape[0] // groups.dp_size
    mine = tokens[groups.dp_rank * per_dp:(groups.dp_rank + 1) * per_dp]
    micro = list(mine.chunk(n_micro))
    logits_seen = []

    def forward_step(data_iterator, model):
        tok = next(data_iterator)
        inp, labels = tok[:, :-1], tok[:, 1:]
        pos = torch.arange(inp.shape[1]).unsqueeze(0).expand_as(inp)
        out = model(inp, pos, None)
        if groups.is_last_stage:
            logits_seen.append(gather_from_tensor_model_parallel_region(out.detach()).clone())
            from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

            # clone: vocab_parallel_cross_entropy modifies fp32 logits in place
            out = vocab_parallel_cross_entropy(out.float().transpose(0, 1).contiguous().clone(), labels.t().contiguous())

        def loss_func(per_token):
            return per_token.sum(), torch.tensor(per_token.numel()), {"loss": per_token.detach().mean()}

        return out, loss_func

    result = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro), model=[model], num_microbatches=n_micro,
        seq_length=SEQ - 1, micro_batch_size=micro[0].shape[0], forward_only=False,
    )
    for name, p in model.named_parameters():
        # What megatron's finalize_model_grads does without the DDP wrapper: q/k-norm weights are replicated
        # across TP but see different heads on each rank, so their grads are summed over TP; then DP-average.
        if "q_layernorm" in name or "k_layernorm" in name:
            dist.all_reduce(p.grad, group=groups.tp)
        dist.all_reduce(p.grad, group=groups.dp)
        p.grad /= groups.dp_size
    loss = None
    if groups.is_last_stage:
        loss = torch.stack([r["loss"] for r in result]).mean()
        dist.all_reduce(loss, group=groups.dp)
        loss = loss / groups.dp_size
    grads = gather_full_state_dict(model, groups, value=lambda p: p.grad)
    return {"loss": loss, "grads": grads, "logits": logits_seen[0] if logits_seen else None,
            "coords": (groups.tp_rank, groups.pp_rank, groups.dp_rank)}


@pytest.fixture(scope="module")
def reference():
    full = run_distributed(_reference_weights, 1)[0]
    tokens = torch.randint(0, ARCH.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    ref = run_distributed(_train_step, 1, args=(full, tokens, MICRO))[0]
    return full, tokens, ref


@pytest.mark.parametrize("world,tp,pp", [(2, 2, 1), (2, 1, 2), (4, 2, 2), (2, 1, 1)],
                         ids=["tp2", "pp2", "tp2xpp2", "dp2"])
def test_layout_matches_unsharded(reference, world, tp, pp):
    full, tokens, ref = reference
    results = run_distributed(_train_step, world, tp=tp, pp=pp, args=(full, tokens, MICRO))
    for out in results:
        assert set(out["grads"]) == set(ref["grads"])
        for name, g in ref["grads"].items():
            torch.testing.assert_close(out["grads"][name], g, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        if out["loss"] is not None:
            torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
        if out["logits"] is not None and out["coords"][2] == 0:
            # Gathered logits of this DP rank's first micro-batch == the unsharded ones for the same rows.
            rows = out["logits"].shape[0]
            torch.testing.assert_close(out["logits"], ref["logits"][:rows], rtol=1e-5, atol=1e-5)
    assert any(o["loss"] is not None for o in results)


def test_padded_vocab_rows_and_grads_are_assembled_in_full(reference):
    full, _, ref = reference
    emb = ref["grads"]["embedding.word_embeddings.weight"]
    assert emb.shape[0] == ARCH.padded_vocab_size(1) >= ARCH.vocab_size
    assert torch.count_nonzero(ref["grads"]["decoder.layers.3.mlp.linear_fc1.weight"]) > 0
