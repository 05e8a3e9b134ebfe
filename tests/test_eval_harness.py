"""evaluate() end to end with a scripted fake engine (the interface of rollout/base.py) and a character tokenizer:
metrics, per-problem files, summary/table/compare, benchmark-file errors (file + line), Parquet, CLI errors."""
import argparse
import json

import pytest

from megatron_tropd.evaluation import cli
from megatron_tropd.evaluation.benchmarks import Benchmark, Problem, format_prompt_ids, load_benchmark
from megatron_tropd.evaluation.harness import compare_summaries, evaluate
from megatron_tropd.rollout.base import GenerationRequest, Sample, SamplingParams


class CharTokenizer:
    """ids = code points; id 0 is EOS; no chat template (plain-text prompts)."""
    chat_template = None
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.encode(text)}

    def encode(self, text, add_special_tokens=True):  # no special tokens to add
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))


class ScriptedEngine:
    """Returns scripted responses keyed by a substring of the prompt; records what it was asked."""

    def __init__(self, script: dict[str, list[str]]):
        self.script, self.calls = script, []
        self.weight_version = 7

    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[list[Sample]]:
        self.calls.append((requests, params))
        tok = CharTokenizer()
        out = []
        for r in requests:
            prompt = tok.decode(r.prompt_ids)
            texts = next(v for k, v in self.script.items() if k in prompt)
            assert len(texts) >= r.n
            out.append([Sample(list(r.prompt_ids), tok(t)["input_ids"] + [0], [0.0] * (len(t) + 1), "stop",
                               self.weight_version, request_id=r.request_id) for t in texts[: r.n]])
        return out

    def close(self):
        pass


def _bench() -> Benchmark:
    return Benchmark("toy", [
        Problem(id="half", prompt="What is one half?", answer=r"\frac{1}{2}"),
        Problem(id="ten", prompt="What is 5+5?", answer="10"),
        Problem(id="mc", prompt="Pick blue.", choices=["red", "blue"], answer="B", scorer="choice"),
    ], "math")


SCRIPT = {
    "one half": [r"\boxed{0.5}", r"\boxed{1/3}", r"it is \boxed{\dfrac12}", "no idea"],  # 2 of 4 correct
    "5+5": ["#### 11", "#### 12", "#### 13", r"\boxed{10}"],  # 1 of 4 (the last)
    "Pick blue": ["Answer: b", "Answer: (B)", "Answer: A", "Answer: B"],  # 3 of 4
}


def test_evaluate_metrics_files_and_table(tmp_path):
    engine = ScriptedEngine(SCRIPT)
    res = evaluate(engine, _bench(), SamplingParams(temperature=0.6, seed=3), n=4, k_list=[1, 2, 4],
                   tokenizer=CharTokenizer(), out_dir=tmp_path, batch_problems=2)
    # pass@1 = mean(c/n); pass@2 = mean(1 - C(n-c,2)/C(4,2)); avg@2 = mean over first two samples
    assert res.metrics["pass@1"] == pytest.approx((2 / 4 + 1 / 4 + 3 / 4) / 3)
    assert res.metrics["pass@2"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6) + 1.0) / 3)
    assert res.metrics["pass@4"] == pytest.approx(1.0)
    assert res.metrics["avg@2"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert [len(c[0]) for c in engine.calls] == [2, 1]  # batched by problems
    req, params = engine.calls[0][0][0], engine.calls[0][1]
    assert params.stop_token_ids == (0,) and params.seed == 3  # EOS filled in from the tokenizer
    assert "\\boxed{}" in CharTokenizer().decode(req.prompt_ids)  # the math instruction was appended
    mc_prompt = CharTokenizer().decode(engine.calls[1][0][0].prompt_ids)
    assert "A. red\nB. blue" in mc_prompt and "Answer: X" in mc_prompt

    rows = [json.loads(line) for line in open(res.files["results"])]
    assert [r["id"] for r in rows] == ["half", "ten", "mc"]
    assert [r["n_correct"] for r in rows] == [2, 1, 3]
    assert [s["correct"] for s in rows[0]["samples"]] == [True, False, True, False]
    assert rows[0]["samples"][2]["extracted"] == r"\dfrac12"
    summary = json.load(open(res.files["summary"]))
    assert summary["metrics"] == res.metrics and summary["weight_version"] == 7 and summary["n"] == 4
    table = open(res.files["table"]).read()
    assert "pass@2" in table and f"{100 * res.metrics['pass@1']:.2f}" in table

    # a second "run" and the comparison table
    right = {"one half": [r"\boxed{0.5}"] * 4, "5+5": [r"\boxed{10}"] * 4, "Pick blue": ["Answer: B"] * 4}
    res2 = evaluate(ScriptedEngine(right), _bench(), SamplingParams(),
                    n=4, k_list=[1], tokenizer=CharTokenizer(), out_dir=tmp_path / "run2")
    assert res2.metrics["pass@1"] == pytest.approx(1.0)
    text = compare_summaries([res.files["summary"], res2.files["summary"]])
    assert "pass@1 +50.00, avg@1 +33.33" in text  # pass@1 0.5 -> 1.0; avg@1 (first samples) 2/3 -> 1


def test_evaluate_rejects_bad_k_and_bad_engine_output():
    with pytest.raises(ValueError, match="raise --n"):
        evaluate(ScriptedEngine(SCRIPT), _bench(), SamplingParams(), n=2, k_list=[4], tokenizer=CharTokenizer())

    class Short(ScriptedEngine):
        def generate(self, requests, params):
            return super().generate(requests, params)[:-1]

    missing = Benchmark("m", [Problem(id="x", prompt="q")], "math")
    engine = ScriptedEngine(SCRIPT)
    with pytest.raises(ValueError, match="problem 'x': the math scorer needs an 'answer'"):
        evaluate(engine, missing, SamplingParams(), n=1, k_list=[1], tokenizer=CharTokenizer())
    assert engine.calls == []  # rejected before generation
    with pytest.raises(RuntimeError, match="engine returned"):
        evaluate(Short(SCRIPT), _bench(), SamplingParams(), n=1, k_list=[1], tokenizer=CharTokenizer())


def test_benchmark_file_errors_name_file_and_line(tmp_path):
    good = '{"id": "a", "prompt": "1+1?", "answer": "2"}\n'
    cases = {
        "bad_json.jsonl": (good + '{"prompt": "x", "answer": \n', r"bad_json.jsonl:2: invalid JSON"),
        "no_prompt.jsonl": (good + "\n" + '{"answer": "3"}\n', r"no_prompt.jsonl:3: row has neither 'prompt'"),
        "unknown.jsonl": ('{"prompt": "x", "anwser": "3"}\n', r"unknown.jsonl:1: unknown field\(s\) \['anwser'\]"),
        "dup.jsonl": (good + good, r"duplicate id 'a'"),
        "bad_scorer.jsonl": ('{"prompt": "x", "answer": "1", "scorer": "nope"}\n', "unknown scorer 'nope'"),
        "empty.jsonl": ("\n", "no problems"),
    }
    for name, (text, pattern) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=pattern):
            load_benchmark(str(tmp_path / name))
    with pytest.raises(ValueError, match="does not exist"):
        load_benchmark(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown benchmark 'aime'"):
        load_benchmark("aime")


def test_parquet_and_jsonl_load_with_scorer_inference(tmp_path):
    import pandas as pd

    pd.DataFrame([
        {"id": "q1", "prompt": "Pick one", "choices": ["x", "y", "z"], "answer": "C"},
        {"id": "q2", "prompt": "Pick two", "choices": ["x", "y", "z"], "answer": "A"},
    ]).to_parquet(tmp_path / "mc.parquet")
    b = load_benchmark(str(tmp_path / "mc.parquet"), limit=1)
    assert b.scorer == "choice" and len(b.problems) == 1 and b.problems[0].choices == ["x", "y", "z"]
    (tmp_path / "code.jsonl").write_text(json.dumps({"prompt": "write f", "tests": "assert f() == 1",
                                                     "entry_point": "f"}) + "\n")
    assert load_benchmark(str(tmp_path / "code.jsonl")).scorer == "code"


def test_prompt_uses_chat_template():
    class Templated(CharTokenizer):
        chat_template = "x"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and not tokenize
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    ids = format_prompt_ids(Problem(id="1", prompt="hi"), Templated(), "Be brief.")
    assert CharTokenizer().decode(ids) == "<user>hi\n\nBe brief.<assistant>"


def test_cli_reports_bad_arguments(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--benchmark", "humaneval", "--model", str(tmp_path / "nope")])
    assert cli.run(args) == 2
    assert "is not a directory" in capsys.readouterr().err
    args = parser.parse_args(["--benchmark", "humaneval", "--model", str(tmp_path), "--n", "2", "--k", "4"])
    assert cli.run(args) == 2
    assert "--k [4] must lie in [1, --n=2]" in capsys.readouterr().err


def test_cli_sglang_engine_attaches_to_given_urls(tmp_path, monkeypatch):
    import megatron_tropd.rollout.sglang as sglang_mod

    made = {}

    class Recorder:
        def __init__(self, **kw):
            made.update(kw)

    monkeypatch.setattr(sglang_mod, "SGLangEngine", Recorder)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--benchmark", "humaneval", "--model", str(tmp_path), "--engine", "sglang",
                              "--sglang-url", "http://127.0.0.1:30000", "--sglang-url", "http://127.0.0.1:30001"])
    assert isinstance(cli._build_engine(args, tmp_path), Recorder)
    assert made["urls"] == ["http://127.0.0.1:30000", "http://127.0.0.1:30001"]
    assert made["base_model_dir"] == str(tmp_path)


def test_code_benchmark_scored_on_threads_keeps_sample_order():
    bench = Benchmark("code", [
        Problem(id="double", prompt="Write double(x).", tests="assert double(3) == 6", entry_point="double"),
        Problem(id="inc", prompt="Write inc(x).", tests=[{"input": "4\n", "output": "5"}]),
    ], "code")
    script = {
        "double": ["```python\ndef double(x):\n    return 2 * x\n```", "def double(x):\n    return x",
                   "```python\ndef double(x):\n    return x + x\n```"],
        "inc": ["print(int(input()) + 1)", "print(int(input()) - 1)", "while True:\n    pass"],
    }
    res = evaluate(ScriptedEngine(script), bench, SamplingParams(), n=3, k_list=[1, 3],
                   tokenizer=CharTokenizer(), score_workers=3,
                   sandbox_limits=__import__("megatron_tropd.evaluation.sandbox", fromlist=["x"]).SandboxLimits(
                       wall_s=20.0, cpu_s=1))
    assert [[s["correct"] for s in pp["samples"]] for pp in res.per_problem] == [[True, False, True],
                                                                                  [True, False, False]]
    assert res.per_problem[1]["samples"][2]["detail"].startswith("case 0: timeout")
    assert res.metrics["pass@1"] == pytest.approx((2 / 3 + 1 / 3) / 2) and res.metrics["pass@3"] == 1.0
    assert res.summary["sandbox"]["audit_hook_network_guard"] is True
