#!/usr/bin/env python
"""Convert a megatron-core distributed checkpoint written by convert_hf_to_megatron.py (or
megatron_tropd.conversion.megatron_io.save_megatron_checkpoint(arch=..., hf_dir=...)) back to an HF safetensors checkpoint with
config.json and the tokenizer. Streams one tensor at a time; the output appears only when complete.

--tp/--pp choose the layout used to load (any that divides the model; default 1/1).
CPU / single node: spawns TP*PP local gloo ranks.  GPU cluster: torchrun --nproc-per-node=TP*PP this script.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megatron-dir", required=True, type=Path, help="megatron distributed checkpoint directory")
    p.add_argument("--out", required=True, type=Path, help="HF checkpoint directory to create")
    p.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=None)
    p.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=int, default=None)
    p.add_argument("--max-shard-size-mb", type=int, default=4096, help="safetensors shard size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)

    from megatron_tropd.conversion import cli as convert

    try:
        arch, meta, cfg, tp, pp = convert.validate_megatron_to_hf(args.megatron_dir, args.out, args.tp, args.pp,
                                                                 args.overwrite)
    except (ValueError, FileNotFoundError) as e:
        convert.fail(str(e))
    convert.log(f"{arch.architecture}: {arch.num_layers} layers (saved at tp={meta.get('tensor_model_parallel_size')} "
                f"pp={meta.get('pipeline_model_parallel_size')}; loading at tp={tp} pp={pp})")
    convert.run(convert.megatron_to_hf_rank, tp, pp,
                (str(args.megatron_dir.resolve()), str(args.out.resolve()), arch, cfg, args.overwrite,
                 args.max_shard_size_mb << 20))
    convert.log(f"done: {args.out}")


if __name__ == "__main__":
    main()
