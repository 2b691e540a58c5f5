"""Tests for final-answer extraction and answer comparison."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cot.answers import answers_match, extract_final_answer

# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Final Answer: 42", "42"),
        ("final answer: 42", "42"),
        ("FINAL ANSWER:   -7  ", "-7"),
        ("**Final Answer:** 42", "42"),
        ("**Final Answer**: 42", "42"),
        ("**Final Answer: 3/4**", "3/4"),
        ("Answer: 17", "17"),
        ("**Answer:** 2:3", "2:3"),
        ("#### 1,234", "1,234"),
        ("####72", "72"),
        (r"\boxed{12}", "12"),
        (r"so \boxed{\frac{3}{4}} is it", r"\frac{3}{4}"),
        (r"\boxed{ {a}+{b} }", "{a}+{b}"),
        ("The answer is 12.", "12."),
        ("the answer is: 60 km/h", "60 km/h"),
        ("The final answer is **9**", "9"),
    ],
)
def test_extract_each_marker(text: str, expected: str) -> None:
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Earlier plain "Answer:" beats a later "Final Answer:".
        ("Answer: 5\nFinal Answer: 6", "5"),
        # "Final Answer:" starts before the "Answer:" it contains.
        ("Final Answer: 6\nAnswer: 5", "6"),
        ("#### 3\nThe answer is 4", "3"),
        ("The answer is 4\n#### 3", "4"),
        (r"\boxed{8} then Final Answer: 9", "8"),
        (r"Final Answer: 9 and \boxed{8}", "8"),
        ("I think 10. The answer is 11.\nAnswer: 12", "11."),
        # The rest of the winning marker's line is taken as is, later markers included.
        ("The answer is 11. Answer: 12", "11. Answer: 12"),
    ],
)
def test_first_marker_wins(text: str, expected: str) -> None:
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Final Answer:\n42", "42"),
        ("**Final Answer:**\n\n  **42**  \nmore text 7", "42"),
        ("Answer:   \n3:4", "3:4"),
        ("Final Answer:\n\\boxed{5}", "5"),
    ],
)
def test_answer_on_next_line(text: str, expected: str) -> None:
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("First 12 then 15 apples", "15"),
        ("The result drops to -4 degrees", "-4"),
        ("We get 2.5 hours", "2.5"),
        ("Three quarters is 3/4", "3/4"),
        ("That is 1,250 dollars total", "1,250"),
        ("10-3 leaves 7", "7"),
        ("x2 then 5", "5"),
    ],
)
def test_fallback_last_number(text: str, expected: str) -> None:
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "   ", "no numbers here", "Final Answer:", "Final Answer:   \n  \n", r"\boxed{}", "####"],
)
def test_extract_returns_none(text: str) -> None:
    assert extract_final_answer(text) is None


def test_unbalanced_box_takes_rest_of_line() -> None:
    assert extract_final_answer("\\boxed{12\nnext") == "12"


def test_realistic_cot_texts() -> None:
    cot = (
        "The train goes 180 km in 3 hours.\n"
        "Speed = distance / time = 180 / 3 = 60.\n"
        "Final Answer: 60"
    )
    assert extract_final_answer(cot) == "60"
    assert answers_match(extract_final_answer(cot), "60")

    markdown = (
        "Let's think step by step.\n"
        "1. Discount: 40 * 25 / 100 = 10.\n"
        "2. Sale price: 40 - 10 = 30.\n\n"
        "**Final Answer:** $30.00\n"
    )
    assert answers_match(extract_final_answer(markdown), "30")

    gsm = "Natalia sold 48 clips in April and 24 in May.\n48 + 24 = 72\n#### 72"
    assert extract_final_answer(gsm) == "72"

    latex = r"We simplify 6/8 to get $\boxed{\frac{3}{4}}$. So that's it, 100% sure."
    assert answers_match(extract_final_answer(latex), "3/4")

    rambling = "Step 1: 12 * 3 = 36\nStep 2: 36 + 4 = 40\nSo the total is 40 apples"
    assert answers_match(extract_final_answer(rambling), "40")

    truncated = "Multiply first: 38 * 2 = 76.\nThen add: 47 + 76 ="
    assert extract_final_answer(truncated) == "76"
    assert not answers_match(extract_final_answer(truncated), "123")


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("$12", "12"),
        ("$ 12", "12"),
        ("1,234", "1234"),
        ("$1,234,567.50", "1234567.5"),
        ("42.", "42"),
        ("60 km/h", "60"),
        ("15 years old", "15"),
        ("7 apples", "7"),
        ("7apples", "7"),
        ("x = 5", "5"),
        ("y=-3", "-3"),
        ("25%", "25"),
        ("25 %", "25"),
        ("12.0", "12"),
        ("4.50", "4.5"),
        ("0.250", "1/4"),
        ("-7", "-7"),
        ("-0.5", "-1/2"),
        ("3/4", "0.75"),
        ("1/2", "2/4"),
        ("2 1/2", "2.5"),
        ("2 1/2 cups", "5/2"),
        ("-1/2", "-0.5"),
        ("-2 1/2", "-2.5"),
        ("6:8", "3:4"),
        ("3 : 4", "3:4"),
        ("1.5:2", "3:4"),
        ("7:1", "7:1"),
        ("**42**", "42"),
        (r"\boxed{42}", "42"),
        (r"\frac{6}{8}", "3/4"),
        ("\u221212", "-12"),
        ("  12  ", "12"),
    ],
)
def test_numeric_normalisations_match(pred: str, gold: str) -> None:
    assert answers_match(pred, gold)


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("100", "10"),
        ("10", "100"),
        ("1", "10"),
        ("10", "1"),
        ("12", "123"),
        ("0.75", "3:4"),
        ("3:4", "0.75"),
        ("3:4", "4:3"),
        ("-5", "5"),
        ("5", "-5"),
        ("1/2", "2"),
        ("2.5", "25"),
        ("12.01", "12"),
        ("1,234", "1.234"),
        ("12 + 3", "15"),
        ("15 or 16", "16"),
    ],
)
def test_different_values_do_not_match(pred: str, gold: str) -> None:
    assert not answers_match(pred, gold)


@pytest.mark.parametrize("pred", [None, "", "   ", "$", "**", "."])
def test_empty_prediction_never_matches(pred: str | None) -> None:
    assert not answers_match(pred, "12")
    assert not answers_match(pred, "")


def test_division_by_zero_is_not_numeric() -> None:
    assert not answers_match("1/0", "0")
    assert answers_match("1/0", "1/0")


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("Paris", "paris", True),
        ("  New   York ", "new york", True),
        ("New York", "York", False),
        ("blue", "blueberry", False),
        ("x^2 + 1", "X^2  +  1", True),
        ("yes", "12", False),
    ],
)
def test_string_fallback(pred: str, gold: str, expected: bool) -> None:
    assert answers_match(pred, gold) is expected


def test_extract_then_match_round_trip() -> None:
    for gold in ["12", "-3", "37.5", "3/4", "-1/12", "2:3"]:
        assert answers_match(extract_final_answer(f"Work.\nFinal Answer: {gold}"), gold)


# --------------------------------------------------------------------------- never raises

_HUGE = "9" * 5000


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        (_HUGE, "1", False),
        ("1", _HUGE, False),
        (_HUGE, _HUGE, True),  # compared as text, past what int() may read
        (f"{_HUGE}/7", "1", False),
        ("1." + _HUGE, "2", False),
        (f"{_HUGE}:3", "1:3", False),
        (",".join(["999"] * 1500), "1", False),  # 4500 digits in thousands groups
        (f"\\boxed{{{_HUGE}}}", _HUGE, True),
    ],
)
def test_numbers_longer_than_int_can_read_never_crash_scoring(
    pred: str, gold: str, expected: bool
) -> None:
    assert answers_match(pred, gold) is expected
    assert extract_final_answer(f"Final Answer: {pred}") is not None


# Text made of what answers are made of, so that the numeric parsers are reached often.
_ANSWERISH = st.text(alphabet="0123456789 ,./:-%$\\{}boxedfrac*xX=\n\u2212", max_size=60)
_LONG_DIGITS = st.integers(4200, 4500).map(lambda n: "7" * n)
_ANY = st.one_of(st.text(max_size=200), _ANSWERISH, _LONG_DIGITS)


@settings(max_examples=400, deadline=None, database=None)
@given(pred=st.one_of(st.none(), _ANY), gold=_ANY)
def test_answers_match_never_raises_on_arbitrary_text(pred: str | None, gold: str) -> None:
    assert answers_match(pred, gold) in (True, False)
    if pred is not None:  # a match is symmetric in its two texts
        assert answers_match(pred, gold) == answers_match(gold, pred) or not pred.strip()


@settings(max_examples=300, deadline=None, database=None)
@given(text=_ANY)
def test_extract_final_answer_never_raises_and_its_answer_matches_itself(text: str) -> None:
    answer = extract_final_answer(text)
    assert answer is None or isinstance(answer, str)
    if answer is not None and answers_match(answer, answer) is False:
        # Only an answer that normalises to nothing may fail to match itself.
        assert not answer.replace("$", "").strip(" *_.")


# ---------------------------------------------------- edges that mutation testing found untested

_BIG = "1" + "0" * 3999  # exactly MAX_DIGITS digits: still read as a number


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("50\\%", "50", True),  # LaTeX's escaped percent
        ("2 1/1", "3", True),  # a mixed number whose fraction is whole
        ("3/1", "3", True),
        ("0:0", "0 : 0", True),  # a ratio of zeros: gcd 0 must not divide
        ("Choice X.", "choice x", True),  # only the final period goes, not a final letter
        ("\\boxed{12", "12", False),  # an unclosed box is not unwrapped, and never raises
        (_BIG, f"{10**3999:,}", True),  # 4000 digits, grouped or not: compared as numbers
    ],
)
def test_normalisation_edges(pred: str, gold: str, expected: bool) -> None:
    assert answers_match(pred, gold) is expected
