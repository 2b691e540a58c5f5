"""cot.answers: extraction cases that pin the line bounds and the next-non-blank-line rule."""

from __future__ import annotations

import pytest

from cot.answers import extract_final_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A marker's answer is the rest of its own line, even when the marker stops one character
        # before the newline and a later (incomplete) marker on the next line was decided first.
        ("Answer:5\nAnswer:", "5"),
        ("Final Answer:7\nFinal Answer:", "7"),
        ("Answer:5\nAnswer: \\boxed{}", "5"),
    ],
)
def test_a_marker_answer_stops_at_its_own_line_end(text: str, expected: str) -> None:
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # "Final Answer:" alone on its line gives the next non-blank line, and only that line:
        # the blank lines (markdown only) before it are not part of the answer.
        ("Final Answer:\n*\n*\n*\n5", "5"),
        ("Final Answer:\n* _ *\n\n_\n42\nmore", "42"),
        ("Answer:\n_\n_\n_\nx = 3", "x = 3"),
    ],
)
def test_an_answer_below_its_marker_skips_the_blank_lines(text: str, expected: str) -> None:
    assert extract_final_answer(text) == expected
