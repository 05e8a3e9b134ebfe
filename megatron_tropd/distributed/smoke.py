"""`tropd smoke`: a tiny GPTModel forward-backward at a given TP x PP on this machine (CPU: gloo ranks),
checked against the unsharded run. The smallest real thing the package does; useful after an install."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=2)
    p.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=int, default=1)
    p.add_argument("--world-size", type=int, default=None, help="ranks to spawn (default tp*pp)")


def _step(groups, full, tokens):
    import torch

    from megatron_tropd.models.gpt import build_gpt_model
    from megatron_tropd.models.sharding import load_full_state_dict

    model = build_gpt_model(_arch(), groups)
    load_full_state_dict(model, full, groups)
    if groups.pp_size > 1:
        raise SystemExit("tropd smoke runs a plain forward; use --pp 1")
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    logits = model(tokens, pos, None)
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits.detach())


def _init(groups):
    from megatron_tropd.models.gpt import build_gpt_model
    from megatron_tropd.models.sharding import gather_full_state_dict

    return gather_full_state_dict(build_gpt_model(_arch(), groups), groups)


def _arch():
    from megatron_tropd.models.arch import ModelArch

    return ModelArch(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                     ffn_hidden_size=128, vocab_size=500, make_vocab_size_divisible_by=8)


def run(args) -> int:
    import time

    import torch

    from megatron_tropd.distributed.spawn import run_distributed

    t0 = time.time()
    full = run_distributed(_init, 1)[0]
    tokens = torch.randint(0, _arch().vocab_size, (2, 16))
    ref = run_distributed(_step, 1, args=(full, tokens))[0]
    world = args.world_size or args.tp
    out = run_distributed(_step, world, tp=args.tp, args=(full, tokens))[0]
    v = _arch().vocab_size  # padded rows differ by TP; compare the real vocabulary
    err = (out[..., :v] - ref[..., :v]).abs().max().item()
    print(f"tropd smoke: TP={args.tp} logits vs unsharded max |diff| = {err:.2e} ({time.time() - t0:.1f}s)")
    return 0 if err < 1e-4 else 1
