"""Final-answer extraction from chain-of-thought text and tolerant answer comparison.

The functions are pure and cluster-agnostic: they are used to score teacher and student
generations against gold answers, those of the synthetic dataset (see ``cot.dataset``) or of a
public set whose gold is a worked solution (``reduce_gold``).
"""

import math
import re
import sys
from bisect import bisect_right
from fractions import Fraction

__all__ = ["MAX_DIGITS", "answers_match", "extract_final_answer", "reduce_gold", "too_many_digits"]

# Python refuses to read an int of more than ``sys.get_int_max_str_digits()`` digits (4300 by
# default). Answers with more digits than this are compared as text, never parsed: a model that
# writes 5000 nines must not crash scoring. Gold answers past it are refused when read.
MAX_DIGITS = min(4000, sys.get_int_max_str_digits() or 4000)

# One alternation, so that ``finditer`` lists every marker in a single pass; at a shared start
# the earlier alternative wins, which keeps "Final Answer:" ahead of the bare "Answer:" inside it.
# ``(?:\*{1,2}\s*)?`` rather than ``\*{0,2}\s*`` after ``\s*``: two adjacent ``\s*`` would make
# "answer" followed by a long run of spaces cost quadratic backtracking. ``\boxed`` is matched
# case-sensitively, as LaTeX reads it and as ``_BOXED_RE`` unwraps it.
_MARKER_RE = re.compile(
    r"""
    (?P<final>\*{0,2}\bfinal\s+answer\s*(?:\*{1,2}\s*)?:)
    | (?P<answer>\*{0,2}\banswer\s*(?:\*{1,2}\s*)?:)
    | (?P<hashes>\#\#\#\#)
    | (?P<boxed>(?-i:\\boxed)\s*\{)
    | (?P<answer_is>\bthe\s+(?:final\s+)?answer\s+is\b\s*:?)
    """,
    re.IGNORECASE | re.VERBOSE,
)
# The markers whose presence makes a gold answer a worked solution to reduce.
_SOLUTION_MARKERS = frozenset({"final", "hashes", "boxed"})

_BOXED_RE = re.compile(r"\\boxed\s*\{")
_BRACE_RE = re.compile(r"[{}]")
# A character that survives ``_clean_line``: a line without one is blank.
_NONBLANK_RE = re.compile(r"[^\s*_]")

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
# (The same texts as ``\s*%?(?:\s*[A-Za-z].*)?`` once stripped, without its two adjacent ``\s*``
# that backtrack quadratically over a long run of spaces.)
_TAIL_RE = re.compile(r"\s*(?:%\s*)?(?:[A-Za-z].*)?", re.DOTALL)
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


class _Markers:
    """The marker matches of one text and what deciding their answers needs.

    Whatever an answer needs beyond its own marker's stretch of text (line bounds, brace
    matching, a box's cleaned content) is computed once and kept, so that deciding every marker
    in turn, from the last back, stays linear in the text's length.
    """

    def __init__(self, text: str, matches: list[re.Match[str]]) -> None:
        self.text = text
        self.matches = matches
        self._boxes = [index for index, match in enumerate(matches) if match.lastgroup == "boxed"]
        self._closes: dict[int, int] | None = None
        self._line = (0, -1)
        self._box_answers: dict[int, str] = {}

    def _close(self, opening: int) -> int | None:
        """Index of the ``}`` that closes the ``{`` at ``opening`` (a box's brace), if any."""
        if self._closes is None:
            # One pass over the braces from the first box on: a brace's partner depends only on
            # the text after it, so earlier braces cannot change it.
            closes: dict[int, int] = {}
            stack: list[int] = []
            for brace in _BRACE_RE.finditer(self.text, self.matches[self._boxes[0]].end() - 1):
                if brace.group() == "{":
                    stack.append(brace.start())
                elif stack:
                    closes[stack.pop()] = brace.start()
            self._closes = closes
        return self._closes.get(opening)

    def _line_of(self, index: int) -> tuple[int, int]:
        """Start and end (its newline, or the text's end) of the line holding ``index``."""
        start, end = self._line
        if not start <= index <= end:
            start = self.text.rfind("\n", 0, index) + 1
            end = self.text.find("\n", index)
            if end < 0:
                end = len(self.text)
            self._line = (start, end)
        return start, end

    def _box_answer(self, box: int, close: int) -> str:
        """The cleaned content of the box ``matches[box]``, which closes at ``close``."""
        if box not in self._box_answers:
            self._box_answers[box] = _clean_line(self.text[self.matches[box].end() : close])
        return self._box_answers[box]

    def answer(self, index: int) -> str | None:
        r"""The answer that ``matches[index]`` yields, or None when it is not complete.

        A closed ``\boxed{`` yields its stripped content. Any other marker yields the rest of its
        line, or the next non-blank line when that rest is blank, cleaned of markdown; when that
        line holds a ``\boxed{...}`` closed on it, the first such box's content instead.
        """
        text, match = self.text, self.matches[index]
        end = match.end()
        if match.lastgroup == "boxed":
            close = self._close(end - 1)
            if close is not None:
                return text[end:close].strip() or None
            # An unclosed box still carries the answer up to the end of its line.

        start, line_end = end, self._line_of(end)[1]
        if _NONBLANK_RE.search(text, end, line_end) is None:
            # "Final Answer:" alone on its line is commonly followed by the answer below it.
            found = _NONBLANK_RE.search(text, line_end)
            if found is None:
                return None
            start = text.rfind("\n", line_end, found.start()) + 1
            line_end = text.find("\n", found.start())
            line_end = len(text) if line_end < 0 else line_end

        # The first box after this marker: no marker lies on the blank stretch before ``start``.
        position = bisect_right(self._boxes, index)
        if position < len(self._boxes):
            box = self._boxes[position]
            if self.matches[box].end() <= line_end:
                close = self._close(self.matches[box].end() - 1)
                if close is not None and close < line_end:
                    return self._box_answer(box, close) or None
        # The stretch holds a character that cleaning keeps: the answer is never empty here.
        return _clean_line(_clean_line(text[start:line_end])) or None


def _choose_answer(text: str, matches: list[re.Match[str]]) -> str | None:
    """Applies ``extract_final_answer``'s rule to the marker ``matches`` of ``text``."""
    if not matches:
        numbers = _NUMBER_TOKEN_RE.findall(text)
        return numbers[-1] if numbers else None
    markers = _Markers(text, matches)
    finals = [index for index, match in enumerate(matches) if match.lastgroup == "final"]
    others = [index for index, match in enumerate(matches) if match.lastgroup != "final"]
    for group in (finals, others):
        for index in reversed(group):
            answer = markers.answer(index)
            if answer:
                return answer
    return None


def extract_final_answer(text: str) -> str | None:
    r"""Extracts the final answer from a chain-of-thought completion.

    Teachers restate and correct themselves, so the last explicit answer counts:

    1. The last complete ``Final Answer:`` marker wins over every other marker, wherever they
       are ("Step: Answer: the sum\nFinal Answer: 36" gives ``36``; "The answer is 12
       because... Final Answer: 13" gives ``13``). Bold forms (``**Final Answer:**``,
       ``**Final Answer**:``) count, and so does ``Final Answer:`` alone on its line with the
       answer on the next non-blank line.
    2. Only when no ``Final Answer:`` marker is complete do the other markers count
       (``Answer:``, ``####``, ``\boxed{...}``, ``The answer is``, ``The final answer is``):
       then the last complete one wins.
    3. Without any marker the last number in the text is used. A text with markers of which
       none is complete gives None, not a number.

    A marker is complete when it yields a non-empty answer. A closed ``\boxed{...}`` yields
    its balanced content; an unclosed ``\boxed{`` yields the rest of its line. Every other
    marker yields the rest of its line, or the next non-blank line when nothing follows it on
    its own, with markdown bold/italic around it removed and a ``\boxed{...}`` in it unwrapped
    (so "Final Answer: 9 and \boxed{8}" gives ``8``). A marker followed only by blank text,
    or by a line whose box is empty, is not complete. Extraction is linear in the text length.

    Args:
        text: The generated text.

    Returns:
        The extracted answer string, or None when nothing usable is found.
    """
    return _choose_answer(text, list(_MARKER_RE.finditer(text)))


def reduce_gold(gold: str) -> tuple[str, bool]:
    r"""Reduces a gold answer given as a worked solution to its final answer.

    Public math sets ship worked solutions as gold: GSM8K ends with a line ``#### 18``, others
    end with a ``Final Answer:`` line or hold a ``\boxed{...}``. A gold holding a ``####``, a
    ``Final Answer:`` or a ``\boxed{`` marker is reduced by ``extract_final_answer``'s rule
    (for GSM8K the text after the last ``####``). Any other gold is a plain answer ("18",
    "3/4", "x = 5", "Paris", "1,000") and is returned stripped, as is a gold whose reduction
    is empty.

    Args:
        gold: The gold answer as the data set gives it.

    Returns:
        ``(answer, True)`` when the gold was reduced, else ``(gold.strip(), False)``.
    """
    matches = list(_MARKER_RE.finditer(gold))
    if any(match.lastgroup in _SOLUTION_MARKERS for match in matches):
        answer = _choose_answer(gold, matches)
        if answer:
            return answer, True
    return gold.strip(), False


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
