"""`tropd prune`: ModelOpt Minitron pruning of a tiny megatron teacher, checked against independent references.

- depth: ModelOpt's layer scores equal 1 - cos(h_in, h_out) computed in float64 from the HF model's own decoder
  layers; a layer made an exact identity scores 0 and is the first dropped; the student's layers are exactly the
  teacher's kept layers (bit-equal tensors);
- width (ffn): the kept neurons are the top ones by the reference importance (L2 over sequences of the mean
  |down_proj input|), and every student matrix is the teacher's with those rows / columns;
- every student loads strictly into transformers and into our megatron loader and gives finite logits;
- bad targets fail at once with an error naming the flag and the valid values.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_tropd.distributed.spawn import run_distributed
from megatron_tropd.models.prune import PruneError, PruneTarget, every_k_for, modelopt_unavailable_reason

from tiny_hf import char_tokenizer, tiny_llama

MODELOPT_MISSING = modelopt_unavailable_reason()
needs_modelopt = pytest.mark.skipif(MODELOPT_MISSING is not None, reason=f"ModelOpt Minitron unusable: "
                                                                         f"{MODELOPT_MISSING}")
NEAR_IDENTITY = 1  # this tiny-teacher layer barely changes the residual stream (o_proj, down_proj scaled by 1e-2)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prune") / "teacher"
    model = tiny_llama(seed=3, layers=4, hidden=32, tie=True)
    with torch.no_grad():
        layer = model.model.layers[NEAR_IDENTITY]  # (an exact identity scores 0, which ModelOpt 0.43 rejects)
        layer.self_attn.o_proj.weight.mul_(1e-2)
        layer.mlp.down_proj.weight.mul_(1e-2)
    model.save_pretrained(str(out))
    char_tokenizer().save_pretrained(str(out))
    return out


def _calib() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(6, 100, (n,), generator=g).tolist() for n in (24, 17, 30)]


def _prune_rank(groups, teacher: str, jobs: list[tuple[str, PruneTarget]], calib, scores_root=None):
    """Prune `teacher` to each (out, target) in turn; per job the report and our loader's logits of the result."""
    from megatron_tropd.models.prune import prune_teacher

    out = []
    for path, target in jobs:
        report = prune_teacher(teacher, path, target, "minitron", groups, calib, scores_root=scores_root).__dict__
        out.append((report, _our_loader_logits(groups, path, calib[0])))
    return out


def _prune(teacher_dir, jobs, scores_root=None) -> list[tuple[dict, torch.Tensor]]:
    (results,) = run_distributed(_prune_rank, 1, timeout=120, args=(
        str(teacher_dir), [(str(p), t) for p, t in jobs], _calib(), str(scores_root) if scores_root else None))
    return results


def _hf_layer_reference(teacher_dir: Path, calib):
    """float64 HF teacher: per layer sum over sequences of mean_t (1 - cos(h_in, h_out)), and per layer the ffn
    importance sqrt(sum over sequences of (mean_t |down_proj input|)^2)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float64).eval()
    n = len(model.model.layers)
    scores, ffn = [0.0] * n, [0.0] * n
    seen: dict = {}

    def layer_hook(i):
        def hook(mod, args, kwargs, out):
            h_in = kwargs.get("hidden_states", args[0] if args else None)
            h_out = out[0] if isinstance(out, tuple) else out
            seen[("layer", i)] = (h_in, h_out)
        return hook

    def down_hook(i):
        def hook(mod, args):
            seen[("down", i)] = args[0]
        return hook

    layers = list(model.model.layers)
    handles = [layer.register_forward_hook(layer_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.mlp.down_proj.register_forward_pre_hook(down_hook(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        for ids in calib:
            model(torch.tensor([ids]))
            for i in range(n):
                h_in, h_out = seen[("layer", i)]
                scores[i] += float((1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)).mean())
                ffn[i] = ffn[i] + seen[("down", i)][0].abs().mean(dim=0) ** 2  # [ffn]
    for h in handles:
        h.remove()
    return scores, [f.sqrt() for f in ffn]


def _load_hf_strict(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _our_loader_logits(groups, path: str, ids):
    from megatron_tropd.conversion.hf_io import load_hf_checkpoint_into_model
    from megatron_tropd.models.gpt import build_gpt_model
    from megatron_tropd.models.hf_mapping import arch_from_hf_config

    arch = arch_from_hf_config(path)
    model = build_gpt_model(arch, groups).eval()
    load_hf_checkpoint_into_model(model, path, arch, groups)
    tokens = torch.tensor([ids])
    with torch.no_grad():
        return model(tokens, torch.arange(len(ids))[None], None)[..., : arch.vocab_size].float()


def _check_loads(path: Path, ours: torch.Tensor) -> None:
    """The student loads strictly into transformers, and our loader's logits (`ours`) match its logits."""
    hf = _load_hf_strict(path)
    with torch.no_grad():
        hf_logits = hf(torch.tensor([_calib()[0]])).logits.float()
    assert torch.isfinite(hf_logits).all() and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, hf_logits, atol=2e-4, rtol=1e-4)


@needs_modelopt
def test_minitron_depth_keeps_the_most_important_layers(teacher_dir, tmp_path):
    from safetensors.torch import load_file

    ((report, ours),) = _prune(teacher_dir, [(tmp_path / "depth2", PruneTarget(num_layers=2))])
    ref, _ = _hf_layer_reference(teacher_dir, _calib())
    assert report["layer_scores"] == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert min(report["layer_scores"]) == report["layer_scores"][NEAR_IDENTITY] < 1e-2 * max(ref)
    want = sorted(sorted(range(4), key=lambda i: -ref[i])[:2])
    assert report["kept_layers"] == want and NEAR_IDENTITY not in want
    assert report["roundtrip_max_abs_diff"] < 1e-5
    # the student's layers are the teacher's kept layers, renumbered, bit for bit; the rest is the teacher's
    t, s = load_file(str(teacher_dir / "model.safetensors")), load_file(str(tmp_path / "depth2" / "model.safetensors"))
    expect = {k: v for k, v in t.items() if not k.startswith("model.layers.")}
    for new, old in enumerate(want):
        expect.update({k.replace(f"model.layers.{old}.", f"model.layers.{new}."): v for k, v in t.items()
                       if k.startswith(f"model.layers.{old}.")})
    assert s.keys() == expect.keys()
    for k in s:
        assert torch.equal(s[k], expect[k]), k
    info = json.loads((tmp_path / "depth2" / "prune_info.json").read_text())
    assert info["method"] == "minitron" and info["versions"]["nvidia-modelopt"] == "0.43.0"
    assert (tmp_path / "depth2" / "tokenizer.json").is_file()
    _check_loads(tmp_path / "depth2", ours)


@needs_modelopt
def test_minitron_width_keeps_the_most_important_neurons(teacher_dir, tmp_path):
    from safetensors.torch import load_file

    scores_root = tmp_path / "scores"
    # the second target reuses the first one's calibration statistics (ModelOpt's checkpoint: no forward passes)
    (report, ours_ffn), (again, ours_mixed) = _prune(teacher_dir, [
        (tmp_path / "ffn", PruneTarget(ffn_hidden_size=40)),
        (tmp_path / "mixed", PruneTarget(num_layers=3, ffn_hidden_size=48, num_attention_heads=2, hidden_size=24))],
        scores_root)
    assert report["calibration"]["scores_cached"] is False and any(scores_root.iterdir())
    _, ffn_ref = _hf_layer_reference(teacher_dir, _calib())
    t, s = load_file(str(teacher_dir / "model.safetensors")), load_file(str(tmp_path / "ffn" / "model.safetensors"))
    for i in range(4):
        p = f"model.layers.{i}.mlp."
        keep = ffn_ref[i].argsort(descending=True)[:40]
        # the kept neurons are the 40 most important; gate, up and down are sliced consistently
        student_rows = s[p + "gate_proj.weight"]
        order = [int((t[p + "gate_proj.weight"] == row).all(dim=1).nonzero()[0]) for row in student_rows]
        assert set(order) == set(keep.tolist()), i
        torch.testing.assert_close(s[p + "up_proj.weight"], t[p + "up_proj.weight"][order], rtol=0, atol=0)
        torch.testing.assert_close(s[p + "down_proj.weight"], t[p + "down_proj.weight"][:, order], rtol=0, atol=0)
    assert again["calibration"]["scores_cached"] is True
    assert again["layer_scores"] == pytest.approx(report["layer_scores"])
    cfg = json.loads((tmp_path / "mixed" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["hidden_size"],
            cfg["head_dim"], cfg["num_key_value_heads"]) == (3, 48, 2, 24, 8, 2)
    _check_loads(tmp_path / "ffn", ours_ffn)
    _check_loads(tmp_path / "mixed", ours_mixed)


def test_bad_targets_fail_clearly(teacher_dir, tmp_path):
    from megatron_tropd.models.hf_mapping import arch_from_hf_config
    from megatron_tropd.models.prune import prune_teacher

    arch = arch_from_hf_config(teacher_dir)  # 4 layers, ffn 64, hidden 32, 4 heads in 2 groups
    cases = [(PruneTarget(num_layers=5), "--target-layers) = 5 is larger than the teacher's 4"),
             (PruneTarget(ffn_hidden_size=65), "--ffn-hidden) = 65 is larger than the teacher's 64"),
             (PruneTarget(num_layers=0), "must be a positive integer"),
             (PruneTarget(num_attention_heads=3), "choose one of [2, 4]"),
             (PruneTarget(hidden_size=30), "--hidden) = 30 is not a multiple of the student's 4 attention heads"),
             (PruneTarget(num_layers=4), "nothing to prune")]
    for target, msg in cases:
        with pytest.raises(PruneError) as e:
            target.check(arch)
        assert msg in str(e.value), (target, str(e.value))
    with pytest.raises(PruneError, match=r"N must divide the teacher's L = 30 layers; 7 does not. Choose N in "):
        every_k_for(30, 7)
    assert every_k_for(30, 15) == 2 and every_k_for(30, 6) == 5
    with pytest.raises(PruneError, match="only removes layers"):
        prune_teacher(teacher_dir, tmp_path / "x", PruneTarget(num_layers=2, ffn_hidden_size=32), "every_k", None)
    (tmp_path / "exists").mkdir()
    with pytest.raises(PruneError, match="exists; remove it or pass --overwrite"):
        prune_teacher(teacher_dir, tmp_path / "exists", PruneTarget(num_layers=2), "every_k", None)


def test_every_k_student_and_cli_errors(teacher_dir, tmp_path, capsys):
    from megatron_tropd import cli

    out = tmp_path / "every2"
    assert cli.main(["prune", "--teacher", str(teacher_dir), "--out", str(out), "--method", "every_k",
                     "--target-layers", "2"]) == 0
    info = json.loads((out / "prune_info.json").read_text())
    assert info["method"] == "every_k" and info["kept_layers"] == [0, 2]
    _load_hf_strict(out)
    capsys.readouterr()
    assert cli.main(["prune", "--teacher", str(teacher_dir), "--out", str(tmp_path / "y"),
                     "--target-layers", "9"]) == 2
    err = capsys.readouterr().err
    assert "error: num_layers (--target-layers) = 9 is larger than the teacher's 4" in err
    assert cli.main(["prune", "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "z"),
                     "--target-layers", "2"]) == 2
    assert "--teacher" in capsys.readouterr().err


def test_builtin_names(tmp_path):
    from megatron_tropd.models.builtin import minitron_prune_args, resolve_model_path

    assert minitron_prune_args("minitron15") == ["--target-layers", "15"]
    assert minitron_prune_args("minitron30-ffn576-heads6") == ["--target-layers", "30", "--ffn-hidden", "576",
                                                               "--heads", "6"]
    for bad in ("minitron", "minitron0", "minitron15-ffn", "minitron15-foo3", "every5"):
        assert minitron_prune_args(bad) is None, bad
    for bad in ("builtin:smollm2-135m-instruct:minitron", "builtin:smollm2-135m-instruct:minitron15-width3",
                "builtin:smollm2-135m-instruct:every0"):
        with pytest.raises(ValueError, match="unknown builtin model .* known: .*:minitronN"):
            resolve_model_path(bad, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # checked before anything is written


@needs_modelopt
def test_tropd_prune_subprocess_makes_a_cached_student(teacher_dir, tmp_path):
    """The path a builtin:...:minitronN name takes: `tropd prune` in a subprocess (calibration on reasoning-gym
    prompts + the teacher's greedy tokens), complete-or-absent output, reused on the next call."""
    from megatron_tropd.models.builtin import materialize_minitron_student

    out = tmp_path / "cache" / "tiny-minitron2"
    args = ["--target-layers", "2", "--ffn-hidden", "48", "--calib-prompts", "2", "--calib-response-tokens", "4"]
    assert materialize_minitron_student(teacher_dir, out, args, tmp_path / "cache" / "scores") == out
    info = json.loads((out / "prune_info.json").read_text())
    assert info["method"] == "minitron" and NEAR_IDENTITY not in info["kept_layers"]
    assert info["calibration"]["prompts"] == 2 and info["calibration"]["task"] == "basic_arithmetic"
    model = _load_hf_strict(out)
    assert model.config.num_hidden_layers == 2 and model.config.intermediate_size == 48
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert materialize_minitron_student(teacher_dir, out, args) == out  # complete: reused, not rebuilt
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
