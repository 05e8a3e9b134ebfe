"""Prompt data: load prompts (reasoning-gym generators, JSONL, Parquet), tokenize them (chat template when the
tokenizer has one), split off a held-out eval set, and sample seeded, resumable batches of prompts per step.

Bad rows (missing field, empty prompt, too long, invalid JSON) are reported with file and line number: a warning
and the row is skipped (`on_bad_row: skip`), or a `DataError` naming file, line, field, expected vs found (`fail`).
A source that leaves no usable prompt (missing file, unknown task, every row bad, eval split too large) is a
one-line `DataError` naming the `data.*` key, its value and the fix (what `tropd train` prints at start-up).
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from megatron_tropd.data.chat import build_prompt, chat_messages
from megatron_tropd.evaluation.answers import extract_math_answer
from megatron_tropd.evaluation.problem import Problem
from megatron_tropd.evaluation.scorers import math_equal, score_reasoning_gym

logger = logging.getLogger(__name__)

ScoreFn = Callable[[str], float]  # model answer text -> score in [0, 1]


class DataError(ValueError):
    """A bad prompt row; the message names the file, the line, the field, and what was expected vs found."""


@dataclass
class DataConfig:
    source: str = "reasoning_gym"  # "reasoning_gym" | "jsonl" | "parquet"
    path: str | None = None  # JSONL / Parquet file (required for those sources)
    task: str = "gsm_symbolic"  # reasoning-gym dataset name (gsm_symbolic, basic_arithmetic, chain_sum, ...)
    size: int | None = 1000  # training prompts (reasoning_gym: generated; files: cap, None = all remaining rows)
    eval_size: int = 0  # held-out prompts, disjoint from training prompts (by id and by prompt text)
    seed: int = 0  # seeds generation (reasoning_gym), the train/eval split and the sampler's shuffles
    prompt_field: str = "prompt"  # JSONL/Parquet column holding the prompt text
    answer_field: str | None = "answer"  # column holding the reference answer (None: no answer, score 0)
    system_prompt: str | None = None  # optional system message (prepended as plain text without a chat template)
    use_chat_template: bool = True  # wrap the prompt as a user message with the tokenizer's chat template if any
    max_prompt_tokens: int | None = 512  # longer prompts are bad rows (None: no limit)
    on_bad_row: str = "skip"  # "skip" (logging.warning with file:line) | "fail" (raise DataError)
    route_field: str = "source_dataset"  # row field routing a sample to a teacher (teacher.routes); reasoning-gym: task

    def __post_init__(self) -> None:
        if self.source not in ("reasoning_gym", "jsonl", "parquet"):
            raise ValueError(f"data.source must be reasoning_gym|jsonl|parquet, got {self.source!r}")
        if self.source != "reasoning_gym" and not self.path:
            raise ValueError(f"data.source={self.source} needs data.path (a .{self.source} file)")
        if self.on_bad_row not in ("skip", "fail"):
            raise ValueError(f"data.on_bad_row must be 'skip' or 'fail', got {self.on_bad_row!r}")
        if self.eval_size < 0 or (self.size is not None and self.size < 0):
            raise ValueError(f"data.size and data.eval_size must be >= 0, got {self.size}, {self.eval_size}")


@dataclass
class Prompt:
    id: int  # stable index in the dataset (train and eval ids are disjoint)
    text: str  # the text fed to the model (chat template applied)
    token_ids: list[int]
    answer: str | None
    metadata: dict = field(default_factory=dict)
    score_fn: ScoreFn | None = None  # model answer text -> score; None when there is no reference answer

    def score(self, response_text: str) -> float:
        return float(self.score_fn(response_text)) if self.score_fn is not None else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Training-time accuracy uses the benchmark scorers (one definition of a correct answer for `tropd train` and
# `tropd eval`).


def exact_match_score(reference: str) -> ScoreFn:
    """1.0 when the response's final answer (`evaluation.answers.extract_math_answer`) equals `reference` under
    the math comparison of `tropd eval` (`evaluation.scorers.math_equal`: normalised string, number, symbolic)."""
    ref = str(reference)

    def score(response: str) -> float:
        return 1.0 if math_equal(extract_math_answer(response), ref) else 0.0

    return score


def reasoning_gym_score(problem: Problem) -> ScoreFn:
    """The reward of `tropd eval`'s reasoning-gym scorer (the dataset's own `score_answer`)."""
    return lambda response: score_reasoning_gym(response, problem).reward


# ---------------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class _Row:
    where: str  # "file:line" (or "reasoning_gym:task[i]")
    prompt: str
    answer: str | None
    metadata: dict
    score_fn: ScoreFn | None


@dataclass
class _BadRows:
    """The bad rows seen while loading one source (for the error when none is usable)."""

    count: int = 0
    first: str = ""


def _bad(cfg: DataConfig, where: str, field_name: str, expected: str, found: str, seen: _BadRows | None = None) -> None:
    msg = f"{where}: bad prompt row: field {field_name!r}: expected {expected}, found {found}"
    if cfg.on_bad_row == "fail":
        raise DataError(msg + " (set data.on_bad_row=skip to skip bad rows)")
    logger.warning("%s; skipped", msg)
    if seen is not None:
        seen.count += 1
        seen.first = seen.first or msg


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _row_from_record(cfg: DataConfig, rec: Any, where: str, seen: _BadRows) -> _Row | None:
    if not isinstance(rec, dict):
        _bad(cfg, where, "<row>", "a JSON object", type(rec).__name__, seen)
        return None
    if cfg.prompt_field not in rec:
        _bad(cfg, where, cfg.prompt_field, "a non-empty string", f"missing (keys: {sorted(rec)[:8]})", seen)
        return None
    prompt = rec[cfg.prompt_field]
    if not isinstance(prompt, str) or not prompt.strip():
        _bad(cfg, where, cfg.prompt_field, "a non-empty string", _short(prompt), seen)
        return None
    answer = None
    if cfg.answer_field is not None:
        if cfg.answer_field not in rec or rec[cfg.answer_field] is None:
            _bad(cfg, where, cfg.answer_field, "a reference answer", "missing", seen)
            return None
        answer = str(rec[cfg.answer_field])
    meta = {k: v for k, v in rec.items() if k not in (cfg.prompt_field, cfg.answer_field)}
    return _Row(where, prompt, answer, meta, exact_match_score(answer) if answer is not None else None)


def _iter_jsonl(cfg: DataConfig, path: Path, seen: _BadRows) -> Iterator[_Row]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                _bad(cfg, where, "<row>", "valid JSON", f"invalid JSON ({e.msg} at column {e.colno})", seen)
                continue
            row = _row_from_record(cfg, rec, where, seen)
            if row is not None:
                yield row


def _iter_parquet(cfg: DataConfig, path: Path, seen: _BadRows) -> Iterator[_Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise DataError(f"data.path={path}: not a readable Parquet file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); check data.path and data.source") from None
    if cfg.prompt_field not in table.column_names:  # a missing column is a config error, not a bad row
        raise DataError(f"{path}: no column {cfg.prompt_field!r} (data.prompt_field); columns: {table.column_names}")
    for i, rec in enumerate(table.to_pylist()):
        row = _row_from_record(cfg, rec, f"{path}:row {i + 1}", seen)  # 1-based data row number
        if row is not None:
            yield row


def _iter_reasoning_gym(cfg: DataConfig, n: int) -> Iterator[_Row]:
    import reasoning_gym

    try:
        ds = reasoning_gym.create_dataset(cfg.task, size=n, seed=cfg.seed)
    except Exception as e:  # unknown task names raise deep inside the registry
        raise DataError(f"data.task={cfg.task!r}: reasoning_gym.create_dataset failed ({e}); check data.task "
                        f"(a reasoning-gym dataset name such as basic_arithmetic, chain_sum, gsm_symbolic)") from None
    for i in range(n):
        entry = ds[i]
        where, meta = f"reasoning_gym:{cfg.task}[{i}]", dict(entry.get("metadata") or {})
        meta.setdefault("source_dataset", cfg.task)
        problem = Problem(id=where, prompt=entry["question"], answer=entry["answer"], metadata=meta)
        yield _Row(where, entry["question"], str(entry["answer"]), meta, reasoning_gym_score(problem))


class PromptDataset:
    """Tokenized prompts: `.train` and `.eval` (held out, disjoint) lists of `Prompt`."""

    def __init__(self, cfg: DataConfig, tokenizer: Any):
        self.cfg = cfg
        want = None if cfg.size is None else cfg.size + cfg.eval_size
        bad = _BadRows()
        if cfg.source == "reasoning_gym":
            if cfg.size is None:
                raise DataError("data.size=None: set data.size for source=reasoning_gym (number of generated prompts)")
            # Generate extra so that skipped rows / duplicate questions still leave `want` distinct prompts.
            rows = _iter_reasoning_gym(cfg, int(want * 1.2) + 16)
        else:
            path = Path(cfg.path)
            if not path.is_file():
                raise DataError(f"data.path={path}: {'is a directory' if path.is_dir() else 'does not exist'} "
                                f"(data.source={cfg.source}); point data.path at a .{cfg.source} file")
            rows = _iter_jsonl(cfg, path, bad) if cfg.source == "jsonl" else _iter_parquet(cfg, path, bad)

        prompts: list[Prompt] = []
        seen: set[str] = set()
        for row in rows:
            text, ids = build_prompt(tokenizer, chat_messages(row.prompt, cfg.system_prompt), cfg.use_chat_template)
            if cfg.max_prompt_tokens is not None and len(ids) > cfg.max_prompt_tokens:
                _bad(cfg, row.where, cfg.prompt_field, f"at most {cfg.max_prompt_tokens} tokens (data.max_prompt_tokens)",
                     f"{len(ids)} tokens", bad)
                continue
            if text in seen:  # duplicates would leak between train and eval
                continue
            seen.add(text)
            meta = dict(row.metadata, source=row.where)
            prompts.append(Prompt(len(prompts), text, ids, row.answer, meta, row.score_fn))
            if want is not None and len(prompts) >= want:
                break
        if not prompts:
            where = f"data.path={cfg.path}" if cfg.source != "reasoning_gym" else f"data.task={cfg.task}"
            if bad.count:
                raise DataError(f"{where}: no usable prompts: all {bad.count} rows are bad rows (each reported above "
                                f"with file:line; the first: {bad.first}); fix the rows, or data.prompt_field="
                                f"{cfg.prompt_field!r} / data.answer_field={cfg.answer_field!r} / "
                                f"data.max_prompt_tokens={cfg.max_prompt_tokens} if they name the wrong thing")
            raise DataError(f"{where}: no usable prompts (the source is empty); point data.path at a file with rows")
        if cfg.eval_size >= len(prompts):
            raise DataError(f"data.eval_size={cfg.eval_size} leaves no training prompts ({len(prompts)} usable "
                            f"prompts from data.{'path' if cfg.source != 'reasoning_gym' else 'task'}); make "
                            f"data.eval_size smaller than {len(prompts)}")
        # Seeded split: a permutation of ids; the eval set is its tail. Ids stay the dataset indices.
        order = list(range(len(prompts)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = cfg.eval_size
        eval_ids = sorted(order[len(order) - n_eval:]) if n_eval else []
        eval_set = set(eval_ids)
        self.train = [p for p in prompts if p.id not in eval_set]
        if cfg.size is not None:
            self.train = self.train[: cfg.size]
        self.eval = [prompts[i] for i in eval_ids]

    def __len__(self) -> int:
        return len(self.train)


class PromptSampler:
    """Batches of training prompts per step: a seeded shuffle per epoch (epoch e uses Random(seed + e)), batches
    taken in order across epoch boundaries. `state_dict()` / `load_state_dict()` resume exactly."""

    def __init__(self, prompts: list[Prompt], batch_size: int, seed: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if not prompts:
            raise ValueError("PromptSampler needs at least one prompt")
        self.prompts = prompts
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.pos = 0  # next index into the current epoch's permutation
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        perm = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
        return perm

    def next_batch(self) -> list[Prompt]:
        out: list[Prompt] = []
        while len(out) < self.batch_size:
            if self.pos >= len(self._perm):
                self.epoch += 1
                self.pos = 0
                self._perm = self._permutation(self.epoch)
            take = self._perm[self.pos: self.pos + self.batch_size - len(out)]
            out.extend(self.prompts[i] for i in take)
            self.pos += len(take)
        return out

    def __iter__(self) -> Iterator[list[Prompt]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "batch_size": self.batch_size,
                "num_prompts": len(self.prompts)}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "batch_size", "num_prompts"):
            mine = self.state_dict()[k]
            if state[k] != mine:
                raise ValueError(f"PromptSampler state mismatch: {k}={state[k]} in the checkpoint, {mine} now; "
                                 "resume with the same data config and batch size")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation(self.epoch)
