"""cot.answers edges: boxes with nested braces, a box on the Final Answer line, exact ratios."""

from __future__ import annotations

import pytest

from cot.answers import answers_match, extract_final_answer


@pytest.mark.parametrize(
    ("pred", "gold", "same"),
    [
        (r"\boxed{\frac{3}{4}}", "0.75", True),  # the box's whole content, nested braces and all
        ("3/4", r"$\boxed{\dfrac{3}{4}}$.", True),
        (r"\boxed{\frac{3}{4}}", "3", False),
        (r"\boxed{{12}}", "12", False),  # "{12}" is not the number 12
        (r"\boxed{x = {5}} and more", "x = {5}", True),  # the text after the box is not in it
    ],
)
def test_a_boxed_answer_is_compared_by_its_balanced_content(
    pred: str, gold: str, same: bool
) -> None:
    assert answers_match(pred, gold) is same
    assert answers_match(gold, pred) is same


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The Final Answer line's box is that line's answer: it beats any later marker.
        ("Final Answer: \\boxed{7}\nAnswer: 8", "7"),
        ("**Final Answer:** $\\boxed{7}$\nThe answer is 8", "7"),
        # ... cleaned of markdown like any line's answer.
        ("Final Answer: \\boxed{**7**}", "7"),
    ],
)
def test_a_box_on_a_marker_line_gives_that_marker_answer(text: str, expected: str) -> None:
    assert extract_final_answer(text) == expected


def test_ratios_compare_exactly_however_large() -> None:
    """Exact, as numbers are: two ratios that one float cannot tell apart still differ."""
    assert not answers_match("12345678901234567891:2", "12345678901234567893:2")
    assert answers_match("24691357802469135782:4", "12345678901234567891:2")


@pytest.mark.parametrize(
    ("predicted", "gold"),
    [
        (r"$12.5\%$", "12.5%"),  # LaTeX's escaped percent sign is a percent sign
        (r"about half (50\%)", "About half (50%)"),  # in a text answer too
        ("Paris .", "Paris"),  # a final period, and the space before it, change no answer
        ("5 s", "5 \u017f"),  # text that compares equal casefolded, though one side parses
    ],
)
def test_formatting_around_an_answer_never_changes_it(predicted: str, gold: str) -> None:
    assert answers_match(predicted, gold)
    assert answers_match(gold, predicted)
