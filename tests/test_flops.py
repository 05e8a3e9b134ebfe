"""Analytic step FLOPs and MFU (training/flops.py): the parameter count matches a built model's, the token and
FLOP arithmetic, the measured peak, and MFU in the progress line."""
import torch

from megatron_tropd.distributed.spawn import run_distributed
from megatron_tropd.models.gpt import build_gpt_model
from megatron_tropd.training.flops import matmul_params, measure_peak_flops, real_tokens, step_flops
from megatron_tropd.training.metrics import progress_line
from test_step import STUDENT, TEACHER, VOCAB


def _counts(groups):
    out = {}
    for name, arch in (("student", STUDENT), ("teacher", TEACHER)):
        model = build_gpt_model(arch, groups)
        h = arch.hidden_size
        # matmul weights of the layers (norms and the embedding lookup excluded) + the real-vocabulary output layer
        layers = sum(p.numel() for n, p in model.named_parameters()
                     if "norm" not in n and n not in ("embedding.word_embeddings.weight", "output_layer.weight"))
        out[name] = layers + VOCAB * h
    return out


def test_matmul_params_match_the_built_model():
    built = run_distributed(_counts, 1)[0]
    assert matmul_params(STUDENT, VOCAB) == built["student"]
    assert matmul_params(TEACHER, VOCAB) == built["teacher"]


def test_real_tokens_and_step_flops():
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 2:4] = True  # inputs 0..3 are real
    mask[1, 1:6] = True  # all 6
    assert real_tokens(mask) == 10
    # generation 2*(10*3 + 100*1), teacher 2*100*10*2, old pass 2*10*10, training 6*10*10*1
    assert step_flops(10, 100, 10, 3, 1, teacher_passes=2, old_pass=True, updates=1) == 260 + 4000 + 200 + 600
    assert step_flops(10, 100, 10, 3, 1, teacher_passes=1, old_pass=False, updates=2) == 260 + 2000 + 1200


def test_peak_is_measured_and_mfu_is_in_the_progress_line():
    assert measure_peak_flops(torch.device("cpu"), size=64, seconds=0.02) > 1e6
    line = progress_line({"step": 2, "loss": 0.5, "throughput/tokens_per_s": 41.0, "throughput/mfu": 0.3125})
    assert line == "step 2 | loss 0.5 | tok/s 41 | mfu 0.3125"
