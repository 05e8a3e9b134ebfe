"""Scorers: response text + problem -> Score. One per answer type: math, multiple choice, code, reasoning-gym.

Math: extract the answer (last `\\boxed{...}` with nested braces, else a "final answer"/"answer:"/"####" line,
else the last number), normalise LaTeX and surface forms (\\dfrac -> \\frac, \\frac12, \\sqrt2, \\text{..},
units, $ signs, percent, thousands commas), then compare: exact string, numeric (rel. 1e-6, percent read as x or
x/100), then symbolic equivalence with math-verify (sympy fallback), each with a timeout.
"""
from __future__ import annotations

import re
import signal
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

from megatron_tropd.evaluation.answers import extract_math_answer
from megatron_tropd.evaluation.problem import Problem
from megatron_tropd.evaluation.sandbox import SandboxLimits, run_python


@dataclass
class Score:
    correct: bool
    extracted: str | None  # what the scorer read from the response (None: nothing found)
    detail: str = ""  # why (sandbox status, "no answer found", ...)
    reward: float = 0.0  # 1.0/0.0, or a reasoning-gym partial score


# -------------------------------------------------------------------------------------------- math normalisation

_UNITS = (
    r"cm|mm|km|m|meters?|metres?|centimeters?|kilometers?|inch(?:es)?|in|feet|foot|ft|yards?|miles?|mph|"
    r"seconds?|sec|s|minutes?|min|hours?|hrs?|h|days?|weeks?|months?|years?|"
    r"dollars?|cents?|euros?|pounds?|units?|degrees?|deg|kg|g|grams?|kilograms?|lbs?|liters?|litres?|l|ml|"
    r"square|sq|cubic|cu|people|students?|apples?|points?|percent"
)


def normalize_math(s: str) -> tuple[str, bool]:
    """Canonical string for comparison, and whether it carried a percent sign."""
    s = s.strip()
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s).strip()
    s = s.strip("$").strip()
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox|mathbf|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "").replace("\\;", "")
    s = s.replace("\\ ", " ").replace("~", " ")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac{1}2
    s = re.sub(r"\\sqrt\s*(\d+)", r"\\sqrt{\1}", s)  # \sqrt2
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "").replace("£", "").replace("€", "")
    percent = bool(re.search(r"\\?%\s*$|\s*percent\s*$", s))
    s = re.sub(r"\\?%|\bpercent\b", "", s).strip()
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    s = re.sub(r"(?<=\d)\s*(?:\^?\{?[23]\}?)?\s*(?:" + _UNITS + r")(?:\^?\{?[23]\}?)?\s*\.?$", "", s)  # "5 cm"
    s = re.sub(r"(?<=\d),(?=\d{3}(?:\D|$))", "", s)  # 1,000 -> 1000 (not "1,2" tuples)
    s = s.rstrip(".").strip()
    s = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)  # .5 -> 0.5
    s = re.sub(r"\s+", " ", s)
    return s, percent


def _as_number(s: str) -> float | None:
    """Plain numbers, a/b, and \\frac{a}{b} with numeric parts; None otherwise."""
    s = s.replace(" ", "")
    m = re.fullmatch(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s)
    try:
        if m:
            sign = -1 if m.group(1) else 1
            return sign * float(Fraction(m.group(2)) / Fraction(m.group(3)))
        if re.fullmatch(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\d+/\d+", s):
            return float(Fraction(s))
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


class _Timeout(Exception):
    pass


def _with_alarm(fn: Callable[[], bool], seconds: int) -> bool:
    """Run fn with a SIGALRM timeout in the main thread (elsewhere without one); False on timeout/error."""
    if threading.current_thread() is not threading.main_thread():
        try:
            return bool(fn())
        except Exception:
            return False

    def _raise(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        return bool(fn())
    except Exception:  # _Timeout, parse errors, sympy errors
        return False
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _math_verify_equal(pred: str, gold: str, timeout_s: int) -> bool | None:
    """math-verify equivalence; None when the library is not installed."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    main = threading.current_thread() is threading.main_thread()
    t = timeout_s if main else None  # math-verify's own timeout uses SIGALRM (main thread only)
    try:
        g = parse(f"${gold}$", parsing_timeout=t)
        p = parse(f"${pred}$", parsing_timeout=t)
        return bool(g and p and verify(g, p, timeout_seconds=t))
    except Exception:
        return False


def _latex_to_sympy_text(s: str) -> str:
    for _ in range(5):  # innermost first, a few nesting levels
        s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    s = s.replace("\\pi", "pi").replace("\\cdot", "*").replace("\\times", "*").replace("^", "**")
    return s.replace("{", "(").replace("}", ")")


def sympy_equal(pred: str, gold: str, timeout_s: int = 5) -> bool:
    """Fallback equivalence without math-verify: simplify(pred - gold) == 0 on a light LaTeX translation."""
    import sympy

    def check() -> bool:
        a = sympy.sympify(_latex_to_sympy_text(pred))
        b = sympy.sympify(_latex_to_sympy_text(gold))
        return sympy.simplify(a - b) == 0

    return _with_alarm(check, timeout_s)


def math_equal(pred: str | None, gold: str, timeout_s: int = 5) -> bool:
    """Whether an extracted answer equals the reference (strings normalised first; see module docstring)."""
    if pred is None:
        return False
    p, p_pct = normalize_math(pred)
    g, g_pct = normalize_math(str(gold))
    if not p:
        return False
    if p == g:
        return True
    pn, gn = _as_number(p), _as_number(g)
    if pn is not None and gn is not None:
        # "50%" matches both 50 and 0.5 (references write percentages either way)
        cands = [pn] + ([pn / 100] if p_pct and not g_pct else []) + ([pn * 100] if g_pct and not p_pct else [])
        return any(_close(c, gn) for c in cands)
    verdict = _math_verify_equal(p, g, timeout_s)
    if verdict is None:
        verdict = sympy_equal(p, g, timeout_s)
    return verdict


def score_math(response: str, problem: Problem) -> Score:
    if problem.answer is None:
        raise ValueError(f"problem {problem.id!r} has no 'answer' field; the math scorer needs one")
    pred = extract_math_answer(response)
    ok = math_equal(pred, str(problem.answer))
    return Score(ok, pred, "" if pred is not None else "no answer found", float(ok))


# ---------------------------------------------------------------------------------------------- multiple choice

def extract_choice(text: str, n_choices: int = 10) -> str | None:
    """The chosen letter: "answer is (B)", "Answer: b", \\boxed{C}, else the last standalone "(B)" / "B." / "B"."""
    letters = "ABCDEFGHIJ"[:n_choices]
    cls = f"[{letters}{letters.lower()}]"
    patterns = [
        rf"answer\s*(?:is|:|=)\s*[:\s]*\(?\**({cls})\**\)?(?![A-Za-z])",
        rf"\\boxed\{{\s*(?:\\text\{{)?\(?({cls})\)?",
    ]
    for pat in patterns:
        found = re.findall(pat, text, flags=re.IGNORECASE)
        if found:
            return found[-1].upper()
    found = re.findall(rf"\(([{letters}])\)|(?<![A-Za-z])([{letters}])(?:[.):]|$)(?![A-Za-z])", text.strip())
    if found:
        return "".join(found[-1]).upper()
    return None


def gold_letter(problem: Problem) -> str:
    """The reference as a letter: "B", "(b)", an index 1, or the text of one of `choices`."""
    ans = problem.answer
    if isinstance(ans, int) and not isinstance(ans, bool):
        if problem.choices and not 0 <= ans < len(problem.choices):
            raise ValueError(f"problem {problem.id!r}: answer index {ans} outside {len(problem.choices)} choices")
        return "ABCDEFGHIJ"[ans]
    s = str(ans).strip()
    m = re.fullmatch(r"\(?([A-Ja-j])\)?\.?", s)
    if m:
        return m.group(1).upper()
    if problem.choices and s in problem.choices:
        return "ABCDEFGHIJ"[problem.choices.index(s)]
    raise ValueError(
        f"problem {problem.id!r}: multiple-choice answer {ans!r} is neither a letter, an index, nor one of its choices"
    )


def score_choice(response: str, problem: Problem) -> Score:
    gold = gold_letter(problem)
    pred = extract_choice(response, n_choices=max(4, len(problem.choices or [])))
    ok = pred == gold
    return Score(ok, pred, "" if pred is not None else "no choice letter found", float(ok))


# ------------------------------------------------------------------------------------------------------- code

_FENCE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(response: str) -> str:
    """The last fenced code block (an unterminated one counts), else the whole response."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def build_program(response: str, problem: Problem) -> str:
    """HumanEval style: prompt + completion (or the fenced solution) + tests + check(entry_point)."""
    code = extract_code(response)
    prefix = problem.code_prompt or ""
    if problem.entry_point and re.search(rf"def\s+{re.escape(problem.entry_point)}\s*\(", code):
        body = prefix + "\n\n" + code  # a full redefinition overrides the prompt's stub (keeps its imports)
    else:
        body = prefix + code  # a raw continuation of the function body
    tests = problem.tests if isinstance(problem.tests, str) else ""
    check = f"\ncheck({problem.entry_point})\n" if problem.entry_point and "def check(" in tests else "\n"
    return body + "\n\n" + tests + check


class CodeScorer:
    """Runs the solution against the problem's tests in the sandbox.

    `tests` is either Python test code (asserts, or HumanEval's `def check(candidate)` + `entry_point`) or a list
    of {"input": stdin, "output": expected stdout} cases (stdout compared after stripping trailing whitespace).
    """

    def __init__(self, limits: SandboxLimits | None = None):
        self.limits = limits or SandboxLimits()

    def __call__(self, response: str, problem: Problem) -> Score:
        if problem.tests is None:
            raise ValueError(f"problem {problem.id!r} has no 'tests'; the code scorer needs them")
        if isinstance(problem.tests, list):
            code = (problem.code_prompt or "") + extract_code(response)
            for i, case in enumerate(problem.tests):
                r = run_python(code, self.limits, stdin=str(case.get("input", "")))
                if not r.passed:
                    return Score(False, code, f"case {i}: {r.status} {r.detail}")
                if r.stdout.rstrip() != str(case.get("output", "")).rstrip():
                    return Score(False, code, f"case {i}: wrong output")
            return Score(True, code, "passed", 1.0)
        program = build_program(response, problem)
        r = run_python(program, self.limits)
        return Score(r.passed, program, f"{r.status} {r.detail}".strip(), float(r.passed))


# ------------------------------------------------------------------------------------------------ reasoning-gym

def score_reasoning_gym(response: str, problem: Problem) -> Score:
    """reasoning-gym's own `score_answer` for the row's dataset (metadata.source_dataset); correct iff 1.0.

    The answer is read from <answer>...</answer> (reasoning-gym's convention), else \\boxed{} / "final answer",
    else the whole stripped response.
    """
    import reasoning_gym
    from reasoning_gym.utils import extract_answer

    meta = problem.metadata or {}
    name = meta.get("source_dataset")
    if not name:
        raise ValueError(f"problem {problem.id!r}: reasoning_gym scorer needs metadata.source_dataset")
    ans = extract_answer(response)  # reasoning-gym's own <answer> tag first
    if ans is None:
        ans = extract_math_answer(response) or response.strip()
    entry = {"question": problem.prompt, "answer": problem.answer, "metadata": meta}
    try:
        reward = float(reasoning_gym.get_score_answer_fn(name)(ans, entry))
    except Exception as e:  # a scorer crash on odd model output is a wrong answer, not a harness failure
        return Score(False, ans, f"scorer error: {type(e).__name__}: {e}")
    return Score(reward >= 1.0 - 1e-9, ans, "", reward)


# ----------------------------------------------------------------------------------------------------- registry

def check_problem(problem: Problem, scorer: str) -> None:
    """Raise ValueError before any generation if the problem lacks what its scorer reads."""
    key = canonical_scorer(scorer)
    if key in ("math", "reasoning_gym") and problem.answer is None:
        raise ValueError(f"problem {problem.id!r}: the {key} scorer needs an 'answer'")
    if key == "reasoning_gym" and not (problem.metadata or {}).get("source_dataset"):
        raise ValueError(f"problem {problem.id!r}: the reasoning_gym scorer needs metadata.source_dataset")
    if key == "choice":
        gold_letter(problem)
    if key == "code" and problem.tests is None:
        raise ValueError(f"problem {problem.id!r}: the code scorer needs 'tests'")


SCORERS = ("math", "choice", "code", "reasoning_gym")
SCORER_ALIASES = {"mc": "choice", "multiple_choice": "choice", "rg": "reasoning_gym", "humaneval": "code"}


def canonical_scorer(name: str) -> str:
    """The scorer a name or alias stands for ("mc" -> "choice")."""
    return SCORER_ALIASES.get(name, name)


def get_scorer(name: str, sandbox_limits: SandboxLimits | None = None) -> Callable[[str, Any], Score]:
    key = canonical_scorer(name)
    if key == "math":
        return score_math
    if key == "choice":
        return score_choice
    if key == "code":
        return CodeScorer(sandbox_limits)
    if key == "reasoning_gym":
        return score_reasoning_gym
    raise ValueError(f"unknown scorer {name!r}; choose one of {SCORERS} (aliases: {sorted(SCORER_ALIASES)})")
