"""Prompt data: JSONL / Parquet / reasoning-gym loading, bad-row reporting, held-out split, resumable sampler."""
import json
import logging

import pytest

from megatron_tropd.data import DataConfig, DataError, PromptDataset, PromptSampler, exact_match_score
from tiny_hf import char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def _good(i):
    return json.dumps({"prompt": f"What is {i}+1?", "answer": str(i + 1), "level": i % 3})


def test_jsonl_loads_with_chat_template(tmp_path, tok):
    p = _write_jsonl(tmp_path / "d.jsonl", [_good(i) for i in range(6)])
    ds = PromptDataset(DataConfig(source="jsonl", path=str(p), size=None), tok)
    assert len(ds.train) == 6 and ds.eval == []
    first = ds.train[0]
    assert first.text == "<|user|>What is 0+1?</s><|assistant|>"
    assert first.token_ids == tok.encode(first.text, add_special_tokens=False)
    assert first.metadata["level"] == 0 and first.metadata["source"].endswith("d.jsonl:1")
    assert first.score("so the answer is 1") == 1.0 and first.score("it is 2") == 0.0
    plain = PromptDataset(DataConfig(source="jsonl", path=str(p), use_chat_template=False, system_prompt="Be brief."), tok)
    assert plain.train[0].text == "Be brief.\n\nWhat is 0+1?"


def test_parquet_loads(tmp_path, tok):
    import pandas as pd

    p = tmp_path / "d.parquet"
    pd.DataFrame({"q": ["2+2?", "", "3+3?"], "a": ["4", "x", "6"]}).to_parquet(p)
    cfg = DataConfig(source="parquet", path=str(p), prompt_field="q", answer_field="a", size=None)
    ds = PromptDataset(cfg, tok)
    assert [x.answer for x in ds.train] == ["4", "6"]  # the empty prompt (row 2) was skipped
    with pytest.raises(DataError, match=r"d\.parquet:row 2.*'q'"):
        PromptDataset(DataConfig(**{**cfg.__dict__, "on_bad_row": "fail"}), tok)
    with pytest.raises(DataError, match="no column 'prompt'"):
        PromptDataset(DataConfig(source="parquet", path=str(p)), tok)


BAD_LINES = [
    _good(0),
    '{"prompt": "unterminated',  # line 2: invalid JSON
    json.dumps({"question": "x", "answer": "1"}),  # line 3: missing prompt field
    json.dumps({"prompt": "   ", "answer": "1"}),  # line 4: empty prompt
    json.dumps({"prompt": "y" * 200, "answer": "1"}),  # line 5: too long
    json.dumps({"prompt": "no answer"}),  # line 6: missing answer
    _good(7),
]


def test_bad_rows_skip_warns_with_file_and_line(tmp_path, tok, caplog):
    p = _write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    with caplog.at_level(logging.WARNING, logger="megatron_tropd.data"):
        ds = PromptDataset(DataConfig(source="jsonl", path=str(p), size=None, max_prompt_tokens=64), tok)
    assert [x.answer for x in ds.train] == ["1", "8"]
    msgs = [r.getMessage() for r in caplog.records]
    for line, what in [(2, "invalid JSON"), (3, "'prompt'"), (4, "'prompt'"), (5, "at most 64 tokens"), (6, "'answer'")]:
        assert any(f"bad.jsonl:{line}:" in m and what in m for m in msgs), (line, msgs)


@pytest.mark.parametrize("line,pattern", [
    (2, r"bad\.jsonl:2: .*expected valid JSON, found invalid JSON"),
    (3, r"bad\.jsonl:3: .*field 'prompt': expected a non-empty string, found missing"),
    (4, r"bad\.jsonl:4: .*field 'prompt': expected a non-empty string, found '   '"),
    (5, r"bad\.jsonl:5: .*expected at most 64 tokens .*found 2\d\d tokens"),
])
def test_bad_rows_fail_names_file_line_field(tmp_path, tok, line, pattern):
    p = _write_jsonl(tmp_path / "bad.jsonl", [BAD_LINES[0], BAD_LINES[line - 1]])
    # The bad row is line 2 of this two-line file.
    with pytest.raises(DataError, match=pattern.replace(f"bad\\.jsonl:{line}", "bad\\.jsonl:2")):
        PromptDataset(DataConfig(source="jsonl", path=str(p), on_bad_row="fail", max_prompt_tokens=64), tok)


def test_reasoning_gym_and_disjoint_eval_split(tok):
    cfg = DataConfig(source="reasoning_gym", task="chain_sum", size=40, eval_size=10, seed=3, max_prompt_tokens=None)
    ds = PromptDataset(cfg, tok)
    assert len(ds.train) == 40 and len(ds.eval) == 10
    assert not {p.id for p in ds.train} & {p.id for p in ds.eval}
    assert not {p.text for p in ds.train} & {p.text for p in ds.eval}
    p = ds.train[0]
    assert p.score(f"The answer is {p.answer}") == 1.0
    assert p.score("The answer is 123456789") == 0.0
    again = PromptDataset(cfg, tok)  # seeded: same prompts, same split
    assert [x.text for x in again.train] == [x.text for x in ds.train]
    with pytest.raises(ValueError, match="data.task"):
        PromptDataset(DataConfig(task="no_such_task", size=2), tok)


def test_file_eval_split_disjoint(tmp_path, tok):
    p = _write_jsonl(tmp_path / "d.jsonl", [_good(i) for i in range(30)] + [_good(3)])  # a duplicate row
    ds = PromptDataset(DataConfig(source="jsonl", path=str(p), size=None, eval_size=8, seed=1), tok)
    assert len(ds.eval) == 8 and len(ds.train) == 22
    assert not {x.text for x in ds.train} & {x.text for x in ds.eval}


def test_sampler_epochs_and_resume():
    prompts = list(range(10))  # any objects work
    s = PromptSampler(prompts, batch_size=4, seed=5)
    full = [s.next_batch() for _ in range(8)]  # 32 prompts = 3.2 epochs
    seen = [x for b in full for x in b]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]  # reshuffled per epoch
    s2 = PromptSampler(prompts, batch_size=4, seed=5)
    for _ in range(3):
        s2.next_batch()
    state = json.loads(json.dumps(s2.state_dict()))  # survives a JSON checkpoint
    s3 = PromptSampler(prompts, batch_size=4, seed=5)
    s3.load_state_dict(state)
    assert [s3.next_batch() for _ in range(5)] == full[3:]
    with pytest.raises(ValueError, match="batch_size"):
        PromptSampler(prompts, batch_size=3, seed=5).load_state_dict(state)
    assert PromptSampler(prompts, 4, seed=6).next_batch() != full[0]


def test_default_scorer():
    s = exact_match_score("1,234")
    assert s("so we get \\boxed{1234}") == 1.0
    assert s("#### 1234.0") == 1.0
    assert s("5 apples, total 1234") == 1.0
    assert s("1235") == 0.0
