#!/usr/bin/env python
"""Convert an HF checkpoint (Llama / SmolLM2, Qwen2, Qwen3; safetensors) into a megatron-core distributed
checkpoint, with its ModelArch (tropd_arch.json) and the HF config + tokenizer (hf/) stored alongside.

CPU / single node: spawns TP*PP local gloo ranks.  GPU cluster: torchrun --nproc-per-node=TP*PP this script.
The checkpoint loads at any TP/PP (megatron_tropd.conversion.megatron_io.load_megatron_checkpoint).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, type=Path, help="HF checkpoint directory (config.json, *.safetensors)")
    p.add_argument("--out", required=True, type=Path, help="megatron checkpoint directory to create")
    p.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=int, default=1)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)

    from megatron_tropd.conversion import cli as convert

    try:
        arch = convert.validate_hf_to_megatron(args.hf_dir, args.out, args.tp, args.pp, args.overwrite)
    except (ValueError, FileNotFoundError) as e:
        convert.fail(str(e))
    arch = arch.replace(make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    convert.log(f"{arch.architecture}: {arch.num_layers} layers, hidden {arch.hidden_size}, "
                f"vocab {arch.vocab_size} (padded {arch.padded_vocab_size(args.tp)} at tp={args.tp}); "
                f"{args.tp * args.pp} ranks")
    convert.run(convert.hf_to_megatron_rank, args.tp, args.pp,
                (str(args.hf_dir.resolve()), str(args.out.resolve()), arch, args.overwrite))
    convert.log(f"done: {args.out}")


if __name__ == "__main__":
    main()
