"""megatron dist checkpoints load at every layout pair of TP {1, 2} x PP {1, 2}, with a padded vocabulary that differs
between the layouts (260 tokens: 384 rows at TP=1, 512 at TP=2), tied and untied embeddings:

- the conversion CLI path: `hf_to_megatron_rank` at layout A, `megatron_to_hf_rank` at layout B -> the HF tensors
  are bit-exact to the source;
- the training path (`student.megatron_checkpoint`): `build_student` with `load_megatron_checkpoint` at layout B ->
  the student's weights equal the source bit-exactly and its padding rows are zero.
Before the fix, A = TP1 (or PP2) into B = TP2 failed with `CheckpointingException: Invalid access pattern for
ShardedTensor(key='embedding.word_embeddings.weight', ...)`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from megatron_tropd.distributed.spawn import run_distributed

sys.path.insert(0, str(Path(__file__).parent))
from tiny_hf import tiny_llama  # noqa: E402

VOCAB = 260
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (TP, PP) on 4 ranks: DP = 4, 2, 2, 1
MODELS = ("tied", "untied")


def _tag(tp: int, pp: int) -> str:
    return f"tp{tp}pp{pp}"


def _relayout(tp: int, pp: int):
    from megatron.core import parallel_state as ps

    from megatron_tropd.distributed import parallel

    ps.destroy_model_parallel()
    return parallel.initialize(tp, pp)


def _all_layouts(groups, hf_dirs: dict, work: str) -> dict | None:
    """Convert every model at every layout, then load every checkpoint at every layout through both paths.
    Returns {(model, saved, loaded): (training-path tensors equal, padding rows zero)} on rank 0."""
    import json

    import torch.distributed as dist

    from megatron_tropd.config import OptimConfig
    from megatron_tropd.conversion import cli, hf_io, megatron_io
    from megatron_tropd.models.hf_mapping import arch_from_hf_config
    from megatron_tropd.models.sharding import EMBEDDING, TIED_OUTPUT, local_parameters
    from megatron_tropd.training.roles import build_student

    archs = {m: arch_from_hf_config(d) for m, d in hf_dirs.items()}
    sources = {m: dict(hf_io.SafetensorsReader(d).items()) for m, d in hf_dirs.items()}
    for tp, pp in LAYOUTS:
        g = _relayout(tp, pp)
        for m, d in hf_dirs.items():
            cli.hf_to_megatron_rank(g, d, f"{work}/{m}_{_tag(tp, pp)}", archs[m])
    results = {}
    for tp, pp in LAYOUTS:
        g = _relayout(tp, pp)
        for m, d in hf_dirs.items():
            hf_config = json.loads(Path(d, "config.json").read_text())
            for stp, spp in LAYOUTS:
                ckpt = f"{work}/{m}_{_tag(stp, spp)}"
                out = f"{work}/hf_{m}_{_tag(stp, spp)}_to_{_tag(tp, pp)}"
                cli.megatron_to_hf_rank(g, ckpt, out, archs[m], hf_config)  # tools/convert_megatron_to_hf.py
                student = build_student(archs[m], g, lambda model: megatron_io.load_megatron_checkpoint(model, ckpt, g),
                                        OptimConfig(), total_updates=1)
                got = dict(hf_io.iter_hf_tensors(student.gpt, g, archs[m]))  # collective over TP x PP
                same = got.keys() == sources[m].keys() and all(torch.equal(got[k], sources[m][k]) for k in got)
                rows = [p for n, p in local_parameters(student.gpt, g) if n in (EMBEDDING, TIED_OUTPUT)]
                first = g.tp_rank * rows[0].shape[0]
                pad_zero = all(bool((p[max(VOCAB - first, 0):] == 0).all()) for p in rows)
                flags = torch.tensor([same, pad_zero], dtype=torch.int32)
                dist.all_reduce(flags, op=dist.ReduceOp.MIN)
                results[m, _tag(stp, spp), _tag(tp, pp)] = tuple(bool(f) for f in flags)
    return results if groups.rank == 0 else None


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout_models")
    hf_dirs = {}
    for i, m in enumerate(MODELS):
        model = tiny_llama(seed=i, layers=2, vocab=VOCAB, tie=m == "tied")
        model.save_pretrained(root / m)
        hf_dirs[m] = str(root / m)
    work = tmp_path_factory.mktemp("layouts")
    results = run_distributed(_all_layouts, 4, args=(hf_dirs, str(work)), timeout=900)[0]
    return hf_dirs, work, results


@pytest.mark.parametrize("loaded", [_tag(*lay) for lay in LAYOUTS])
@pytest.mark.parametrize("saved", [_tag(*lay) for lay in LAYOUTS])
@pytest.mark.parametrize("model", MODELS)
def test_megatron_checkpoint_loads_at_every_layout(layout_runs, model, saved, loaded):
    from megatron_tropd.conversion import hf_io, megatron_io

    hf_dirs, work, results = layout_runs
    _, meta, _ = megatron_io.read_checkpoint_info(work / f"{model}_{saved}")
    assert meta["padded_vocab_size"] == (384 if saved.startswith("tp1") else 512)
    src = hf_io.SafetensorsReader(hf_dirs[model])
    back = hf_io.SafetensorsReader(work / f"hf_{model}_{saved}_to_{loaded}")  # the conversion CLI path
    assert set(back) == set(src)
    for name in src:
        assert torch.equal(back[name], src[name]), name
    same, pad_zero = results[model, saved, loaded]  # the training path
    assert same, "student weights differ from the source"
    assert pad_zero, "padding rows are not zero"
