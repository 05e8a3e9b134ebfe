"""The one answer extractor: the final answer of a response, used by training-time accuracy (`data`) and by the
benchmark scorers (`evaluation.scorers`). Last `\\boxed{...}` (nested braces kept), else the last "final answer is X" /
"Answer: X" / "#### X", else the last number; None when nothing is found.
"""
from __future__ import annotations

import re


def _braced(text: str, i: int) -> tuple[str, int] | None:
    """Content of the brace group opening at text[i] == '{' (nested braces allowed) and the index after it."""
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{" and (j == 0 or text[j - 1] != "\\"):
            depth += 1
        elif text[j] == "}" and text[j - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j], j + 1
    return None  # unbalanced: the response was cut off inside the box


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} (nested braces), or `\\boxed 5`; None if absent."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*", text):
        j = m.end()
        if j < len(text) and text[j] == "{":
            got = _braced(text, j)
            if got is not None:
                best = got[0]
        else:
            tok = re.match(r"[^\s$]+", text[j:])
            if tok:
                best = tok.group(0)
    return best.strip() if best is not None else None


_FINAL = re.compile(
    r"(?:final answer|the answer)\s*(?:is|:|=)?\s*[:=]?\s*(.+)|^\s*answer\s*[:=]\s*(.+)|####\s*(.+)",
    re.IGNORECASE | re.MULTILINE,
)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def extract_math_answer(text: str) -> str | None:
    """\\boxed{} first, then the last "final answer is X" / "Answer: X" / "#### X", then the last number."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    matches = list(_FINAL.finditer(text))
    if matches:
        ans = next(g for g in matches[-1].groups() if g is not None).strip()
        ans = re.sub(r"^\$+|\$+$", "", ans.strip().rstrip(".").strip()).strip()
        return ans.rstrip(".").strip() or None
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None
