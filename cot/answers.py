"""Final-answer extraction from chain-of-thought text and tolerant answer comparison.

Both functions are pure and cluster-agnostic: they are used to score teacher and student
generations against the gold answers of the synthetic dataset (see ``cot.dataset``).
"""

import math
import re
import sys
from fractions import Fraction

__all__ = ["MAX_DIGITS", "answers_match", "extract_final_answer", "too_many_digits"]

# Python refuses to read an int of more than ``sys.get_int_max_str_digits()`` digits (4300 by
# default). Answers with more digits than this are compared as text, never parsed: a model that
# writes 5000 nines must not crash scoring. Gold answers past it are refused when read.
MAX_DIGITS = min(4000, sys.get_int_max_str_digits() or 4000)

# One alternation so that ``search`` returns the leftmost marker; at a shared start position
# the earlier alternative wins, which keeps "Final Answer:" ahead of the bare "Answer:" inside it.
_MARKER_RE = re.compile(
    r"""
    (?P<final>\*{0,2}\bfinal\s+answer\s*\*{0,2}\s*:)
    | (?P<answer>\*{0,2}\banswer\s*\*{0,2}\s*:)
    | (?P<hashes>\#\#\#\#)
    | (?P<boxed>\\boxed\s*\{)
    | (?P<answer_is>\bthe\s+(?:final\s+)?answer\s+is\b\s*:?)
    """,
    re.IGNORECASE | re.VERBOSE,
)

_BOXED_RE = re.compile(r"\\boxed\s*\{")

# Lookbehind keeps the minus of "10-3" and digits glued to words ("x2", "3.14.15") out.
_NUMBER_TOKEN_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")

# Unsigned magnitude: thousands-grouped or plain integer part, optional decimals, or ".5".
_MAGNITUDE = r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
_MIXED_RE = re.compile(r"(?P<sign>-)?(?P<whole>\d+)\s+(?P<num>\d+)\s*/\s*(?P<den>\d+)")
_FRACTION_RE = re.compile(rf"(?P<sign>-)?(?P<num>{_MAGNITUDE})\s*/\s*(?P<den>{_MAGNITUDE})")
_RATIO_RE = re.compile(rf"-?{_MAGNITUDE}(?:\s*:\s*-?{_MAGNITUDE})+")
_PLAIN_RE = re.compile(rf"(?P<sign>-)?(?P<num>{_MAGNITUDE})")
# What may follow a number: an optional percent sign, then nothing or a word ("km/h", "years
# old", "apples"). Anything else ("12 + 3") means the text is not a plain numeric answer.
_TAIL_RE = re.compile(r"\s*%?(?:\s*[A-Za-z].*)?", re.DOTALL)
_ASSIGNMENT_RE = re.compile(r"^[A-Za-z]\w*\s*=\s*(?=-?\.?\d)")
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")

_Value = Fraction | tuple[int, ...]


def _balanced_content(text: str, start: int) -> str | None:
    """Returns the text from ``start`` up to the brace closing an already opened ``{``.

    Args:
        text: The full text.
        start: Index just after the opening brace.

    Returns:
        The enclosed content, or None when the braces never balance.
    """
    depth = 1
    for index in range(start, len(text)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:index]
    return None


def _unwrap_boxed(text: str) -> str:
    r"""Replaces ``text`` by the content of its first ``\boxed{...}`` if it has one."""
    match = _BOXED_RE.search(text)
    if match is None:
        return text
    content = _balanced_content(text, match.end())
    return text if content is None else content


def _clean_line(text: str) -> str:
    """Strips whitespace and markdown bold/italic markers around an extracted answer."""
    return text.strip().strip("*_").strip()


def extract_final_answer(text: str) -> str | None:
    r"""Extracts the final answer from a chain-of-thought completion.

    The leftmost marker wins: ``Final Answer:`` (also bold, e.g. ``**Final Answer:**``),
    ``Answer:``, ``####``, ``\boxed{...}`` and ``The answer is``. The answer is the rest of the
    marker's line (or the next non-blank line when that rest is empty); for ``\boxed`` it is
    the balanced box content. Without any marker the last number in the text is used.

    Args:
        text: The generated text.

    Returns:
        The extracted answer string, or None when nothing usable is found.
    """
    marker = _MARKER_RE.search(text)
    if marker is None:
        numbers = _NUMBER_TOKEN_RE.findall(text)
        return numbers[-1] if numbers else None

    if marker.lastgroup == "boxed":
        content = _balanced_content(text, marker.end())
        if content is not None:
            return content.strip() or None
        # An unclosed box still carries the answer up to the end of its line.

    lines = text[marker.end() :].split("\n")
    answer = _clean_line(lines[0])
    if not answer:
        # "Final Answer:" alone on its line is commonly followed by the answer below it.
        answer = next((_clean_line(line) for line in lines[1:] if _clean_line(line)), "")
    answer = _clean_line(_unwrap_boxed(answer))
    return answer or None


def _normalise(text: str) -> str:
    """Removes formatting that never changes an answer's value (``$``, bold, final period)."""
    text = _unwrap_boxed(text.replace("\u2212", "-"))
    text = _LATEX_FRAC_RE.sub(r"\1/\2", text).replace("\\%", "%").replace("$", "")
    text = _clean_line(text)
    text = text.rstrip(".").rstrip()
    return _ASSIGNMENT_RE.sub("", text)


def _reduce_ratio(parts: list[Fraction]) -> tuple[int, ...]:
    """Scales ratio parts to coprime integers so that ``6:8`` and ``3:4`` compare equal."""
    scale = math.lcm(*(part.denominator for part in parts))
    integers = [int(part * scale) for part in parts]
    divisor = math.gcd(*integers)
    if divisor == 0:
        return tuple(integers)
    return tuple(value // divisor for value in integers)


def _magnitude(text: str) -> Fraction:
    """Parses an unsigned decimal string exactly (thousands commas allowed)."""
    return Fraction(text.replace(",", ""))


def _signed(text: str) -> Fraction:
    """Parses an optionally negative decimal string exactly."""
    text = text.strip()
    if text.startswith("-"):
        return -_magnitude(text[1:])
    return _magnitude(text)


def _parse_value(text: str) -> _Value | None:
    """Parses a normalised answer into an exact number or a reduced ratio.

    Args:
        text: Answer text after ``_normalise``.

    Returns:
        A Fraction for numbers (integers, decimals, fractions, mixed numbers, percentages),
        a tuple of coprime integers for ratios, or None when the text is not numeric.
    """
    # Order matters: "2 1/2" must not read as 2 followed by junk, nor "3/4" as 3.
    match = _MIXED_RE.match(text)
    if match is not None and _TAIL_RE.fullmatch(text, match.end()):
        den = int(match["den"])
        if den == 0:
            return None
        value = int(match["whole"]) + Fraction(int(match["num"]), den)
        return -value if match["sign"] else value

    match = _FRACTION_RE.match(text)
    if match is not None and _TAIL_RE.fullmatch(text, match.end()):
        den_value = _magnitude(match["den"])
        if den_value == 0:
            return None
        value = _magnitude(match["num"]) / den_value
        return -value if match["sign"] else value

    match = _RATIO_RE.match(text)
    if match is not None and _TAIL_RE.fullmatch(text, match.end()):
        return _reduce_ratio([_signed(part) for part in match.group(0).split(":")])

    match = _PLAIN_RE.match(text)
    if match is not None and _TAIL_RE.fullmatch(text, match.end()):
        value = _magnitude(match["num"])
        return -value if match["sign"] else value
    return None


def too_many_digits(text: str) -> bool:
    """Whether ``text`` holds more digits than an answer may be parsed with (``MAX_DIGITS``)."""
    return len(text) > MAX_DIGITS and sum(map(str.isdigit, text)) > MAX_DIGITS


def _value_of(text: str) -> _Value | None:
    """``_parse_value``, or None for text with more digits than int() may read."""
    if too_many_digits(text):
        return None
    try:
        return _parse_value(text)
    except (ValueError, ZeroDivisionError, OverflowError):  # never let model output crash scoring
        return None


def _canonical_text(text: str) -> str:
    """Case- and whitespace-insensitive form used when an answer is not numeric."""
    return " ".join(text.split()).casefold()


def answers_match(pred: str | None, gold: str) -> bool:
    """Decides whether a predicted answer equals the gold answer.

    Numbers are compared exactly as fractions after removing ``$``, thousands commas, a
    trailing period, ``x =`` prefixes, ``%`` and trailing units or words; fractions, mixed
    numbers and decimals are interchangeable. Ratios compare in lowest terms and never equal a
    plain number. Non-numeric answers fall back to a case-insensitive, whitespace-normalised
    string comparison.

    Args:
        pred: The extracted prediction, possibly None.
        gold: The gold answer.

    Returns:
        True when both answers denote the same value.
    """
    if pred is None:
        return False
    pred_text = _normalise(pred)
    if not pred_text:
        return False
    gold_text = _normalise(gold)

    pred_value = _value_of(pred_text)
    gold_value = _value_of(gold_text)
    if pred_value is not None and gold_value is not None:
        # Both sides numeric: types must agree so a ratio never equals a plain number.
        if isinstance(pred_value, Fraction) != isinstance(gold_value, Fraction):
            return False
        return pred_value == gold_value
    return _canonical_text(pred_text) == _canonical_text(gold_text)
