"""One benchmark problem: what a scorer reads (answer, choices, tests) and what a prompt is built from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Problem:
    id: str
    prompt: str | None = None
    messages: list[dict] | None = None
    answer: Any = None
    choices: list[str] | None = None
    tests: Any = None
    entry_point: str | None = None
    code_prompt: str | None = None
    metadata: dict = field(default_factory=dict)
    scorer: str | None = None
