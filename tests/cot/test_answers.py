"""Tests for final-answer extraction and answer comparison."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cot.answers
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
        # The two cases: an explicit Final Answer line beats every earlier marker.
        ("Step: Answer: the sum\nFinal Answer: 36", "36"),
        ("The answer is 12 because... Final Answer: 13", "13"),
        # Changed (the first marker used to win): "5", "8".
        ("Answer: 5\nFinal Answer: 6", "6"),
        (r"\boxed{8} then Final Answer: 9", "9"),
        ("Final Answer: 6\nAnswer: 5", "6"),  # a Final Answer line also beats later markers
        ("Final Answer: 9\nThe answer is 10\n#### 11", "9"),
        ("Final Answer: 12\nWait, recheck.\n**Final Answer:** 13", "13"),  # the last one
        ("The answer is 3.\nFinal Answer:\n\n  **7**\nso 8", "7"),  # answer on the next line
        (r"\boxed{1} Final Answer: \boxed{2}", "2"),  # a box in the Final line is unwrapped
        (r"Final Answer: 9 and \boxed{8}", "8"),
        ("final answer: 4\nFINAL ANSWER: 5", "5"),
    ],
)
def test_last_final_answer_line_wins(text: str, expected: str) -> None:
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Without a Final Answer line the last marker wins. Changed: these were "3", "4",
        # "11." and "11. Answer: 12" while the first marker won.
        ("#### 3\nThe answer is 4", "4"),
        ("The answer is 4\n#### 3", "3"),
        ("I think 10. The answer is 11.\nAnswer: 12", "12"),
        ("The answer is 11. Answer: 12", "12"),
        (r"Answer: 7 \boxed{8}", "8"),
        (r"\boxed{8} Answer: 7", "7"),
        ("Answer: 1\nAnswer: 2\nAnswer: 3", "3"),
    ],
)
def test_last_marker_wins_without_final_answer_line(text: str, expected: str) -> None:
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A marker that yields nothing is not complete: the last complete one wins.
        ("The answer is 5.\nAnswer:", "5."),
        ("#### 4\n\\boxed{}", "4"),
        ("Answer: 4\n####   \n\n", "4"),
        ("Answer: 4\nThe answer is", "4"),
        ("Answer: 4\n\\boxed{ }", "4"),
        # ... for a Final Answer line too: an empty last one leaves the one before it.
        ("Final Answer: 12\nFinal Answer:", "12"),
        ("Final Answer: 12\nFinal Answer: \\boxed{}", "12"),
        # Only empty Final Answer markers: as if there were none.
        ("\\boxed{12}\nFinal Answer:", "12"),
        # An unclosed box is complete: it yields the rest of its line.
        ("Answer: 3\n\\boxed{12\nnext", "12"),
        ("Final Answer: 3\n\\boxed{12\nnext", "3"),
    ],
)
def test_last_complete_marker_wins(text: str, expected: str) -> None:
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
    [
        "",
        "   ",
        "no numbers here",
        "Final Answer:",
        "Final Answer:   \n  \n",
        r"\boxed{}",
        "####",
        # Markers but none complete: no fallback to the last number (as before).
        "We got 12.\nFinal Answer:",
        "12 then #### \\boxed{}\nAnswer: **",
    ],
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


# --------------------------------------------------------------------------- gold reduction

_GSM8K_GOLD = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)


def test_reduce_gold_gsm8k_solution() -> None:
    assert cot.answers.reduce_gold(_GSM8K_GOLD) == ("72", True)
    assert cot.answers.reduce_gold(_GSM8K_GOLD + "\n") == ("72", True)
    assert answers_match("72", cot.answers.reduce_gold(_GSM8K_GOLD)[0])
    # Thousands commas are kept as written; matching reads them.
    assert cot.answers.reduce_gold("So 500 + 500 = <<500+500=1000>>1000.\n#### 1,000") == (
        "1,000",
        True,
    )


def test_reduce_gold_boxed_solution() -> None:
    gold = r"Half of it: $\boxed{\frac{1}{2}}$."
    assert cot.answers.reduce_gold(r"\boxed{\frac{1}{2}}") == (r"\frac{1}{2}", True)
    assert cot.answers.reduce_gold(gold) == (r"\frac{1}{2}", True)
    assert answers_match("1/2", cot.answers.reduce_gold(gold)[0])
    assert answers_match("0.5", cot.answers.reduce_gold(r"\boxed{\frac{1}{2}}")[0])


@pytest.mark.parametrize(
    ("gold", "expected"),
    [
        ("Work it out.\nFinal Answer: 18", "18"),
        ("Steps.\n**Final Answer:**\n\n3/4\n", "3/4"),
        ("Final Answer: 5\nFinal Answer: 6", "6"),
        # The same rule as predictions: a Final Answer line beats ####.
        ("Final Answer: 7\n#### 8", "7"),
        ("#### 8\n#### 9", "9"),  # the last ####
    ],
)
def test_reduce_gold_final_answer_and_hashes(gold: str, expected: str) -> None:
    assert cot.answers.reduce_gold(gold) == (expected, True)


@pytest.mark.parametrize(
    "gold",
    [
        "18",
        "3/4",
        "x = 5",
        "Paris",
        "1,000",
        "-7",
        "2:3",
        "New York",
        "Answer: 5",  # only ####, Final Answer: and \boxed{ trigger a reduction
        "The answer is 5",
        "1 + 2 = 3",
    ],
)
def test_reduce_gold_keeps_plain_answers(gold: str) -> None:
    assert cot.answers.reduce_gold(gold) == (gold, False)
    assert cot.answers.reduce_gold(f"  {gold}\n") == (gold, False)


@pytest.mark.parametrize("gold", ["####", "#### ", "Final Answer:", r"\boxed{}", "  ####  \n"])
def test_reduce_gold_that_reduces_to_nothing_stays(gold: str) -> None:
    assert cot.answers.reduce_gold(gold) == (gold.strip(), False)


def test_reduce_gold_is_public() -> None:
    assert "reduce_gold" in cot.answers.__all__
