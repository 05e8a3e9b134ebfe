"""Bad input fails at start-up, before any model is built: every case of docs/errors.md through `tropd train`
in-process (exit 2, one `tropd train: ...` line naming the key, no traceback, no GPTModel constructed), the
all-bad-rows JSONL once as a real process, and the good inputs resolve."""
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_hf import char_tokenizer, tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GOOD_ROWS = [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(12)]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Tiny student (2 layers, 4 heads, 2 KV heads) and teacher (3 layers) sharing a tokenizer, good prompts, and
    one broken variant of each input."""
    root = tmp_path_factory.mktemp("preflight")
    tok = char_tokenizer()
    for name, layers in (("student", 2), ("teacher", 3)):
        tiny_llama(seed=0, layers=layers).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    _jsonl(root / "good.jsonl", GOOD_ROWS)
    _jsonl(root / "all_bad.jsonl", [{"question": "no prompt field"}, {"prompt": "   "}, "{not json"])

    def variant(name, base="student"):
        d = root / name
        shutil.copytree(root / base, d)
        return d

    cfg = json.loads((root / "student" / "config.json").read_text())
    (variant("gpt2") / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    (variant("bad_json") / "config.json").write_text("{not json")
    for f in variant("no_weights").glob("*.safetensors"):
        f.unlink()
    for f in variant("no_tokenizer").iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            f.unlink()
    other = variant("other_tokenizer", "teacher")  # same size, two tokens swapped: a different vocabulary
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (other / "tokenizer.json").write_text(json.dumps(tj))
    small = variant("small_vocab", "teacher")
    (small / "config.json").write_text(json.dumps({**json.loads((small / "config.json").read_text()),
                                                    "vocab_size": 64}))
    (root / "not_a_dir").write_text("x")
    (root / "no_ckpt").mkdir()
    import pandas as pd

    pd.DataFrame({"question": ["What is 1+1?"], "answer": ["2"]}).to_parquet(root / "no_prompt_column.parquet")
    return root


def _args(inputs: Path, tmp_path: Path, overrides: list[str]):
    from megatron_tropd.cli import build_parser

    base = [f"student.path={inputs / 'student'}", f"teacher.path={inputs / 'teacher'}", "data.source=jsonl",
            f"data.path={inputs / 'good.jsonl'}", "data.size=null", "data.eval_size=2", f"train.run_dir={tmp_path}",
            "train.progress=false", "train.tensorboard=false", "rollout.prompts_per_step=2",
            "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8", "optim.micro_batch_size=2",
            "objective.topk=8", "eval.samples_per_prompt=2"]
    return build_parser().parse_args(["train", "--config", str(ROOT / "examples/configs/smollm2_tropd_cpu.yaml"),
                                      *base, *overrides])


# (id, overrides with {d} = the inputs dir, environment, needles that the one error line must contain)
CASES = [
    ("config_key", ["train.stepz=3"], {}, ["train.stepz"]),
    ("cluster_section", ["cluster.container_mounts=[nocolon]"], {}, ["cluster.container_mounts", "/src:/dst"]),
    ("sglang_section", ["rollout.engine=sglang", "sglang.weight_sync=bogus"], {}, ["sglang.weight_sync='bogus'",
                                                                                   "use one of"]),
    ("sglang_no_servers", ["rollout.engine=sglang", "sglang.student_servers=0"], {},
     ["sglang.student_servers=0", "sglang.student_urls"]),
    ("sglang_python", ["rollout.engine=sglang", "sglang.python=/nonexistent/python3"], {},
     ["sglang.python='/nonexistent/python3'", "SGLang venv"]),
    ("world_size", ["parallel.tensor_model_parallel_size=2"], {"WORLD_SIZE": "3"},
     ["parallel.tensor_model_parallel_size=2", "3 ranks"]),
    ("batch_split", ["rollout.prompts_per_step=3", "rollout.samples_per_prompt=1"], {},
     ["rollout.prompts_per_step x rollout.samples_per_prompt = 3", "optim.micro_batch_size=2", "multiple of 2"]),
    ("full_vocab_pp", ["objective.name=full_vocab", "parallel.pipeline_model_parallel_size=2"], {"WORLD_SIZE": "2"},
     ["objective.name='full_vocab'", "pipeline_model_parallel_size=1"]),
    ("max_prefix_tokens", ["guidance.max_prefix_tokens=99"], {}, ["guidance.max_prefix_tokens=99",
                                                                   "rollout.max_new_tokens=8"]),
    ("run_dir_is_file", ["train.run_dir={d}/not_a_dir"], {}, ["train.run_dir=", "not a directory"]),
    ("missing_model_dir", ["student.path={d}/nope"], {}, ["student.path=", "no config.json"]),
    ("unknown_builtin", ["teacher.path=builtin:nope"], {}, ["teacher.path='builtin:nope'", "unknown builtin"]),
    ("unsupported_arch", ["student.path={d}/gpt2"], {}, ["student.path=", "unsupported architecture"]),
    ("bad_config_json", ["teacher.path={d}/bad_json"], {}, ["teacher.path=", "not valid JSON"]),
    ("no_weights", ["student.path={d}/no_weights"], {}, ["student.path=", "no *.safetensors"]),
    ("megatron_checkpoint", ["student.megatron_checkpoint={d}/no_ckpt"], {},
     ["student.megatron_checkpoint=", "no metadata.json"]),
    ("student_layout", ["parallel.tensor_model_parallel_size=4", "rollout.prompts_per_step=4"], {"WORLD_SIZE": "4"},
     ["parallel.tensor_model_parallel_size=4", "student", "num_key_value_heads=2"]),
    ("teacher_layout", ["parallel.pipeline_model_parallel_size=2"], {"WORLD_SIZE": "2"},
     ["pipeline_model_parallel_size=2", "teacher", "num_hidden_layers=3"]),
    ("no_tokenizer", ["student.path={d}/no_tokenizer"], {}, ["student.path=", "tokenizer"]),
    ("tokenizers_differ", ["teacher.path={d}/other_tokenizer"], {}, ["teacher.path=", "tokenizers differ"]),
    ("vocab_too_small", ["teacher.path={d}/small_vocab"], {}, ["teacher.path=", "vocab_size=64"]),
    ("stop_token_ids", ["rollout.stop_token_ids=[500]"], {}, ["rollout.stop_token_ids=[500]", "vocabulary"]),
    ("topk_too_large", ["objective.topk=500"], {}, ["objective.topk", "top-500"]),
    ("data_path_missing", ["data.path={d}/nope.jsonl"], {}, ["data.path=", "does not exist"]),
    ("all_rows_bad", ["data.path={d}/all_bad.jsonl"], {}, ["data.path=", "all 3 rows are bad rows",
                                                           "all_bad.jsonl:1"]),
    ("bad_row_fail", ["data.path={d}/all_bad.jsonl", "data.on_bad_row=fail"], {},
     ["all_bad.jsonl:1: bad prompt row", "data.on_bad_row=skip"]),
    ("parquet_column", ["data.source=parquet", "data.path={d}/no_prompt_column.parquet"], {},
     ["no column 'prompt'", "data.prompt_field"]),
    ("unknown_task", ["data.source=reasoning_gym", "data.task=no_such_task", "data.size=4"], {},
     ["data.task='no_such_task'"]),
    ("eval_size", ["data.eval_size=99"], {}, ["data.eval_size=99", "leaves no training prompts"]),
    ("eval_split", ["data.eval_size=3", "eval.samples_per_prompt=1"], {},
     ["data.eval_size=3", "eval.samples_per_prompt=1", "multiple of 2"]),
    ("too_long", ["rollout.max_new_tokens=250"], {}, ["rollout.max_new_tokens=250", "max_position_embeddings=256"]),
    ("benchmark_file", ["eval.benchmark={d}/nope.jsonl"], {}, ["eval.benchmark=", "no such file"]),
]


@pytest.fixture
def no_model_is_built(monkeypatch):
    """Make any GPTModel construction fail loudly (and count it): start-up checks must stop a bad run before."""
    from megatron.core.models.gpt import GPTModel

    built = []

    def refuse(self, *a, **k):
        built.append(1)
        raise AssertionError("a GPTModel was built before the bad input was reported")

    monkeypatch.setattr(GPTModel, "__init__", refuse)
    return built


@pytest.mark.parametrize("name,overrides,env,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_any_model(inputs, tmp_path, monkeypatch, capsys, no_model_is_built,
                                                name, overrides, env, needles):
    from megatron_tropd.training import cli

    for key in ("WORLD_SIZE", "RANK", "TROPD_SGLANG_STUDENT_URLS", "TROPD_SGLANG_TEACHER_URLS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = _args(inputs, tmp_path / "run", [o.replace("{d}", str(inputs)) for o in overrides])
    rc = cli.run(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("tropd train:")]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not no_model_is_built


def test_bad_rows_keep_their_file_line_reports(inputs, caplog):
    from megatron_tropd.config import load_config
    from megatron_tropd.data import DataError
    from megatron_tropd.training.preflight import preflight

    cfg = load_config(None, [f"student.path={inputs / 'student'}", f"teacher.path={inputs / 'teacher'}",
                             "data.source=jsonl", f"data.path={inputs / 'all_bad.jsonl'}", "data.size=null",
                             "optim.micro_batch_size=1", "objective.topk=8"])
    with caplog.at_level(logging.WARNING, logger="megatron_tropd.data"), pytest.raises(DataError) as e:
        preflight(cfg, world_size=1)
    msgs = [r.getMessage() for r in caplog.records]
    for line, what in [(1, "'prompt'"), (2, "'prompt'"), (3, "invalid JSON")]:
        assert any(f"all_bad.jsonl:{line}:" in m and what in m for m in msgs), (line, msgs)
    assert "\n" not in str(e.value)


def test_good_inputs_resolve_without_weights_or_process_groups(inputs):
    import torch.distributed as dist

    from megatron_tropd.config import load_config
    from megatron_tropd.training.preflight import preflight

    cfg = load_config(None, [f"student.path={inputs / 'student'}", f"teacher.path={inputs / 'teacher'}",
                             "data.source=jsonl", f"data.path={inputs / 'good.jsonl'}", "data.size=null",
                             "data.eval_size=2", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
                             "optim.micro_batch_size=2", "objective.topk=8", "eval.samples_per_prompt=2"])
    r = preflight(cfg, world_size=2)
    assert r.dp_size == 2 and r.vocab == len(char_tokenizer()) and len(r.dataset.eval) == 2
    assert len(r.dataset.train) == len(GOOD_ROWS) - 2 and r.student_arch.num_layers == 2
    assert r.student_arch.padded_vocab_size(1) == r.teacher_arch.padded_vocab_size(1)
    assert not dist.is_initialized()
    # a stand-in (config.json + tokenizer, no weights) passes with require_weights=False only
    cfg.student.path = str(inputs / "no_weights")
    assert preflight(cfg, world_size=1, require_weights=False).student_dir == inputs / "no_weights"


def test_all_bad_rows_jsonl_fails_at_start_up_as_a_real_process(inputs, tmp_path):
    """The motivating case: `tropd train` on a JSONL whose rows are all bad ended in a traceback after the models
    loaded. Now: exit 2, the file:line warnings, then one line, before any model."""
    cmd = [sys.executable, "-m", "megatron_tropd.cli", "train", "--config",
           str(ROOT / "examples/configs/smollm2_tropd_cpu.yaml"), f"student.path={inputs / 'student'}",
           f"teacher.path={inputs / 'teacher'}", "data.source=jsonl", f"data.path={inputs / 'all_bad.jsonl'}",
           f"train.run_dir={tmp_path}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("tropd train: data.path=") and "all 3 rows are bad rows" in last, out.stderr
    assert "all_bad.jsonl:3: bad prompt row" in out.stderr
    assert not (tmp_path / "checkpoints").exists()
