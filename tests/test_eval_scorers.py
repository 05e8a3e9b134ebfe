"""Scorers on tricky answers: fractions, LaTeX, units, $, percentages, commas, choice letters, reasoning-gym."""
import pytest

from megatron_tropd.evaluation.answers import extract_boxed
from megatron_tropd.evaluation.benchmarks import Problem
from megatron_tropd.evaluation.scorers import (
    extract_choice, extract_math_answer, get_scorer, gold_letter, math_equal, score_choice, score_math,
    score_reasoning_gym, sympy_equal,
)


@pytest.mark.parametrize("response,gold", [
    (r"so the result is \boxed{\frac{1}{2}}.", "0.5"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{1/2}", r"\dfrac{1}{2}"),
    (r"The answer is \boxed{\dfrac12}", "1/2"),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt2}"),
    ("Final answer: 5 cm", "5"),
    (r"The final answer is \$5.", "5"),
    (r"\boxed{\$5}", "5"),
    (r"\boxed{50\%}", "50"),
    (r"\boxed{50\%}", "0.5"),
    ("#### 1,000", "1000"),
    (r"\boxed{1{,}000}", "1000"),
    ("We get 12 apples, so 42.", "42"),
    (r"\boxed{x = 3}", "3"),
    (r"\boxed{90^\circ}", "90"),
    (r"\boxed{\text{5 meters}}", "5"),
    (r"\boxed{x^2+2x+1}", "(x+1)^2"),
    (r"\boxed{\left( 1, 2 \right)}", "(1,2)"),
    (r"outer \boxed{\frac{\frac{1}{2}}{2}} end", r"\frac{1}{4}"),
    (r"\boxed{.25}", "1/4"),
])
def test_math_equivalent_answers_are_correct(response, gold):
    # a generous timeout: symbolic checks must not fail just because the machine is busy
    assert math_equal(extract_math_answer(response), gold, timeout_s=60), (response, gold)


def test_score_math_reports_extraction():
    s = score_math(r"so \boxed{\frac{1}{2}}", Problem(id="p", prompt="q", answer="0.5"))
    assert s.correct and s.extracted == r"\frac{1}{2}" and s.reward == 1.0
    s = score_math("I give up", Problem(id="p", prompt="q", answer="0.5"))
    assert not s.correct and s.extracted is None and s.detail == "no answer found"


@pytest.mark.parametrize("response,gold", [
    (r"\boxed{3}", "4"),
    (r"\boxed{\frac{1}{3}}", "0.33"),
    (r"\boxed{50\%}", "5"),
    ("no number at all", "1"),
    (r"\boxed{1,2}", "12"),  # a pair, not a thousands separator
    (r"\boxed{2\sqrt{2}}", r"\sqrt{2}"),
    (r"\boxed{-1/2}", "1/2"),
])
def test_math_wrong_answers_are_wrong(response, gold):
    assert not score_math(response, Problem(id="p", prompt="q", answer=gold)).correct


def test_extraction_rules():
    assert extract_boxed(r"a \boxed{1} then \boxed{\frac{a}{b^{2}}} end") == r"\frac{a}{b^{2}}"
    assert extract_boxed(r"\boxed 7 and") == "7"
    assert extract_boxed(r"cut off \boxed{\frac{1}{2") is None
    assert extract_math_answer("The final answer is $\\frac{3}{4}$.") == r"\frac{3}{4}"
    assert extract_math_answer("steps 1, 2, 3 and finally 17") == "17"
    assert extract_math_answer("nothing here") is None


def test_sympy_fallback_equivalence():
    assert sympy_equal(r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}")
    assert sympy_equal("2*(x+1)", "2*x+2")
    assert not sympy_equal("3", "4")
    assert not sympy_equal("((", "1")  # unparsable -> wrong, no exception


@pytest.mark.parametrize("text,letter", [
    ("The answer is (B).", "B"),
    ("Answer: b", "B"),
    ("I think \\boxed{C}", "C"),
    ("(A) looks right but (D) is better", "D"),
    ("This is a tricky one. Answer: c", "C"),
    ("**Answer: (A)**", "A"),
    ("The correct option is D.", "D"),
])
def test_choice_letter_extraction(text, letter):
    assert extract_choice(text) == letter


def test_choice_scoring_with_letter_index_and_text_answers():
    choices = ["red", "green", "blue", "black"]
    assert score_choice("Answer: (C)", Problem(id="a", prompt="q", choices=choices, answer="C")).correct
    assert score_choice("Answer: c", Problem(id="a", prompt="q", choices=choices, answer=2)).correct
    assert score_choice("Answer: C", Problem(id="a", prompt="q", choices=choices, answer="blue")).correct
    assert not score_choice("Answer: B", Problem(id="a", prompt="q", choices=choices, answer="(c)")).correct
    assert not score_choice("I don't know", Problem(id="a", prompt="q", choices=choices, answer="C")).correct
    with pytest.raises(ValueError, match="neither a letter"):
        gold_letter(Problem(id="a", prompt="q", choices=choices, answer="purple"))


def test_reasoning_gym_adapter_uses_its_scorer():
    import reasoning_gym

    e = reasoning_gym.create_dataset("basic_arithmetic", size=1, seed=3)[0]
    p = Problem(id="0", prompt=e["question"], answer=e["answer"], metadata=dict(e["metadata"]))
    assert score_reasoning_gym(f"thinking...<answer>{e['answer']}</answer>", p).correct
    assert score_reasoning_gym(f"so \\boxed{{{e['answer']}}}", p).correct
    assert not score_reasoning_gym("<answer>not a number</answer>", p).correct
    with pytest.raises(ValueError, match="source_dataset"):
        score_reasoning_gym("x", Problem(id="1", prompt="q", answer="1"))


def test_unknown_scorer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown scorer 'mathz'"):
        get_scorer("mathz")
