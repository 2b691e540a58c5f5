"""Tests for the synthetic math dataset.

The gold answers are re-derived here from the question *text* with regexes and a tiny exact
evaluator, independently of the generator code, so a generator bug cannot hide behind itself.
"""

import ast
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from fractions import Fraction
from pathlib import Path

import pytest

from cot.answers import answers_match, extract_final_answer
from cot.dataset import (
    CATEGORY_QUOTAS,
    RECORD_KEYS,
    TEST_FILENAME,
    TEST_SIZE,
    TRAIN_FILENAME,
    TRAIN_SIZE,
    build_splits,
    category_counts,
    write_splits,
)

Record = dict[str, str]
Value = Fraction | tuple[int, int]

EXPECTED_TRAIN = {
    "arithmetic": 76,
    "percentages": 60,
    "algebra": 60,
    "word_problems": 91,
    "fractions": 45,
    "ratios": 45,
}
EXPECTED_TEST = {
    "arithmetic": 19,
    "percentages": 15,
    "algebra": 15,
    "word_problems": 23,
    "fractions": 12,
    "ratios": 11,
}


@pytest.fixture(scope="module")
def splits() -> tuple[list[Record], list[Record]]:
    return build_splits(seed=0)


@pytest.fixture(scope="module")
def all_records(splits: tuple[list[Record], list[Record]]) -> list[Record]:
    return splits[0] + splits[1]


# --------------------------------------------------------------------------- exact evaluator


def _evaluate(expr: str, names: Mapping[str, Fraction] | None = None) -> Fraction:
    """Evaluates + - * / and parentheses exactly; anything else is rejected."""
    bound = names or {}

    def visit(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return visit(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            # repr of a float literal is its shortest decimal, so "0.15" stays exactly 3/20.
            return Fraction(repr(node.value))
        if isinstance(node, ast.Name) and node.id in bound:
            return bound[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -visit(node.operand)
        if isinstance(node, ast.BinOp):
            left, right = visit(node.left), visit(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            if isinstance(node.op, ast.Div):
                return left / right
        raise ValueError(f"unsupported expression: {expr!r}")

    return visit(ast.parse(expr.strip(), mode="eval"))


def test_evaluator_is_exact_and_safe() -> None:
    assert _evaluate("47 + 38 * 2") == 123
    assert _evaluate("(5 - 12) * 3") == -21
    assert _evaluate("2/3 + 1/4") == Fraction(11, 12)
    assert _evaluate("0.15 * 100") == 15
    with pytest.raises(ValueError, match="unsupported"):
        _evaluate("__import__('os')")
    with pytest.raises(ValueError, match="unsupported"):
        _evaluate("2 ** 3")


def _solve_linear(equation: str, var: str) -> Fraction:
    """Solves a linear equation in ``var`` given as text such as ``4(x + 3) = 28``."""
    lhs_text, rhs_text = equation.split("=")
    # Implicit multiplication ("3x", "4(") becomes explicit for the evaluator.
    lhs_text, rhs_text = (re.sub(r"(\d)\s*([a-z(])", r"\1*\2", s) for s in (lhs_text, rhs_text))

    def residual(value: Fraction) -> Fraction:
        env = {var: value}
        return _evaluate(lhs_text, env) - _evaluate(rhs_text, env)

    at0, at1, at2 = residual(Fraction(0)), residual(Fraction(1)), residual(Fraction(2))
    slope = at1 - at0
    assert slope != 0, f"no unique solution: {equation}"
    assert at2 - at1 == slope, f"not a linear equation: {equation}"
    return -at0 / slope


# --------------------------------------------------------------------------- question parsers

Solver = Callable[[re.Match[str]], Value]


def _num(match: re.Match[str], group: int | str) -> Fraction:
    return Fraction(match[group])


def _brute_force(predicate: Callable[[int], bool]) -> Fraction:
    """The unique whole number 0..500 satisfying ``predicate``."""
    hits = [value for value in range(501) if predicate(value)]
    assert len(hits) == 1, hits
    return Fraction(hits[0])


def _ratio(first: int, second: int) -> tuple[int, int]:
    divisor = math.gcd(first, second)
    return first // divisor, second // divisor


def _percent_change(m: re.Match[str]) -> Fraction:
    old, new = _num(m, 2), _num(m, 3)
    rising = m[1] in ("increases", "grows")
    assert rising == (m[4] == "increase") == (new > old), m.group(0)
    return abs(new - old) / old * 100


def _percent_adjust(direction: str, n: Fraction, p: Fraction) -> Fraction:
    sign = 1 if direction.lower().startswith("increase") else -1
    return n * (1 + sign * p / 100)


def _split_ratio(m: re.Match[str]) -> Fraction:
    total, p, q = int(m[1]), int(m[2]), int(m[3])
    # Find the two parts by search: a * q == b * p and a + b == total.
    parts = [(a, total - a) for a in range(total + 1) if a * q == (total - a) * p]
    assert len(parts) == 1
    first, second = parts[0]
    return Fraction(max(first, second) if m[4] == "larger" else min(first, second))


def _scale_ratio(m: re.Match[str]) -> Fraction:
    p, q, known = int(m["p"]), int(m["q"]), int(m["known"])
    return _brute_force(lambda other: known * q == other * p)


SQ = r"square (?:meters|centimeters)"
UNIT = r"(?:m|cm)"
LINEAR = r"(?:meters|centimeters)"
PARSERS: dict[str, list[tuple[str, str, Solver]]] = {
    "arithmetic": [
        (
            "expression",
            r"(?:What is|Calculate|Evaluate|Compute the value of) ([-+*/() \d]+)[?.]",
            lambda m: _evaluate(m[1]),
        ),
    ],
    "percentages": [
        (
            "percent_of",
            r"(?:What is|Find|Calculate) (\d+)% of (\d+)[?.]",
            lambda m: _num(m, 1) * _num(m, 2) / 100,
        ),
        (
            "percent_change",
            r"(?:A price|The population of a town|The number of visitors) "
            r"(increases|grows|decreases|drops) from (\d+) to (\d+)\. "
            r"What is the percentage (increase|decrease)\?",
            _percent_change,
        ),
        (
            "adjust_question",
            r"What is (\d+) (increased|decreased) by (\d+)%\?",
            lambda m: _percent_adjust(m[2], _num(m, 1), _num(m, 3)),
        ),
        (
            "adjust_command",
            r"(Increase|Decrease) (\d+) by (\d+)%\.",
            lambda m: _percent_adjust(m[1], _num(m, 2), _num(m, 3)),
        ),
        (
            "what_percent",
            r"What percent of (?P<whole>\d+) is (?P<part>\d+)\?"
            r"|(?P<part2>\d+) is what percent of (?P<whole2>\d+)\?",
            lambda m: Fraction(m["part"] or m["part2"]) / Fraction(m["whole"] or m["whole2"]) * 100,
        ),
    ],
    "algebra": [
        (
            "linear",
            r"(?:Solve for (?P<v1>[a-z]): |Find (?P<v2>[a-z]) if |What value of (?P<v3>[a-z]) "
            r"satisfies )(?P<eq>[-+*/()= \da-z]+)[?.]",
            lambda m: _solve_linear(m["eq"], m["v1"] or m["v2"] or m["v3"]),
        ),
    ],
    "word_problems": [
        (
            "speed",
            r"A (\w+) travels (\d+) km in (\d+) hours\. What is the average speed in km/h\?",
            lambda m: _num(m, 2) / _num(m, 3),
        ),
        (
            "speed",
            r"A (\w+) travels at (\d+) km/h for (\d+) hours\. "
            r"How far does the \1 travel in kilometers\?",
            lambda m: _num(m, 2) * _num(m, 3),
        ),
        (
            "speed",
            r"A (\w+) travels (\d+) km at (\d+) km/h\. How many hours does the trip take\?",
            lambda m: _num(m, 2) / _num(m, 3),
        ),
        (
            "area",
            rf"A rectangle is (\d+) ({UNIT}) long and (\d+) \2 wide\. What is its area in {SQ}\?",
            lambda m: _num(m, 1) * _num(m, 3),
        ),
        (
            "area",
            rf"A rectangle is (\d+) ({UNIT}) long and (\d+) \2 wide\. "
            rf"What is its perimeter in {LINEAR}\?",
            lambda m: 2 * _num(m, 1) + 2 * _num(m, 3),
        ),
        (
            "area",
            rf"A square has sides of (\d+) {UNIT}\. What is its area in {SQ}\?",
            lambda m: _num(m, 1) ** 2,
        ),
        (
            "area",
            rf"A triangle has a base of (\d+) ({UNIT}) and a height of (\d+) \2\. "
            rf"What is its area in {SQ}\?",
            lambda m: _num(m, 1) * _num(m, 3) / 2,
        ),
        (
            "area",
            rf"A rectangle has an area of (\d+) {SQ} and a width of (\d+) {UNIT}\. "
            rf"What is its length in {LINEAR}\?",
            lambda m: _num(m, 1) / _num(m, 2),
        ),
        (
            "price",
            r"(\w+) buys (\d+) ([a-z]+) at \$(\d+) each\. How much does \1 spend in dollars\?",
            lambda m: _num(m, 2) * _num(m, 4),
        ),
        (
            "price",
            r"A (\w+) costs \$(\d+) and is on sale for (\d+)% off\. "
            r"What is the sale price in dollars\?",
            lambda m: _num(m, 2) * (100 - _num(m, 3)) / 100,
        ),
        (
            "price",
            r"(\w+) buys (\d+) ([a-z]+) at \$(\d+) each and (\d+) ([a-z]+) at \$(\d+) each\. "
            r"How much does \1 spend in dollars\?",
            lambda m: _num(m, 2) * _num(m, 4) + _num(m, 5) * _num(m, 7),
        ),
        (
            "price",
            r"(\d+) ([a-z]+) cost \$(\d+)\. How much does one ([a-z]+) cost in dollars\?",
            lambda m: _num(m, 3) / _num(m, 1),
        ),
        (
            "price",
            r"(\w+) buys (\d+) ([a-z]+) at \$(\d+) each and pays with a \$(\d+) bill\. "
            r"How much change does \1 get in dollars\?",
            lambda m: _num(m, 5) - _num(m, 2) * _num(m, 4),
        ),
        (
            "age",
            r"(\w+) is (\d+) times as old as (\w+)\. \3 is (\d+) years old\. How old is \1\?",
            lambda m: _num(m, 2) * _num(m, 4),
        ),
        (
            "age",
            r"(\w+) is (\d+) years old\. How old will \1 be in (\d+) years\?",
            lambda m: _num(m, 2) + _num(m, 3),
        ),
        (
            "age",
            r"(\w+) is (\d+) years old\. How old was \1 (\d+) years ago\?",
            lambda m: _num(m, 2) - _num(m, 3),
        ),
        (
            "age",
            r"(\w+) is (\d+) years older than (\w+)\. The sum of their ages is (\d+)\. "
            r"How old is \3\?",
            lambda m: _brute_force(lambda b: b + (b + int(m[2])) == int(m[4])),
        ),
        (
            "age",
            r"(\w+) is (\d+) times as old as (\w+)\. \1 is (\d+) years older than \3\. "
            r"How old is \3\?",
            lambda m: _brute_force(lambda b: int(m[2]) * b - b == int(m[4])),
        ),
    ],
    "fractions": [
        (
            "operation",
            r"(?:What is|Calculate) (\d+/\d+ [-+*] \d+/\d+)[?.]",
            lambda m: _evaluate(m[1]),
        ),
        (
            "of",
            r"What is (\d+)/(\d+) of (\d+)/(\d+)\?",
            lambda m: Fraction(int(m[1]), int(m[2])) * Fraction(int(m[3]), int(m[4])),
        ),
        (
            "divide",
            r"(?:What is (\d+)/(\d+) divided by (\d+)/(\d+)\?|Divide (\d+)/(\d+) by (\d+)/(\d+)\.)",
            lambda m: _evaluate(
                "({}/{}) / ({}/{})".format(*[g for g in m.groups() if g is not None])
            ),
        ),
        (
            "simplify",
            r"(?:Simplify (\d+/\d+)\.|Write (\d+/\d+) in lowest terms\.)",
            lambda m: _evaluate(m[1] or m[2]),
        ),
    ],
    "ratios": [
        (
            "simplify",
            r"(?:Simplify the ratio|Write the ratio) (\d+):(\d+)(?: in simplest form)?\.",
            lambda m: _ratio(int(m[1]), int(m[2])),
        ),
        (
            "simplify",
            r"A (?:class|basket|garden|shelter|box) has (\d+) ([a-z ]+) and (\d+) ([a-z ]+)\. "
            r"What is the ratio of \2 to \4 in simplest form\?",
            lambda m: _ratio(int(m[1]), int(m[3])),
        ),
        (
            "split",
            r"(?:Split|Divide) (\d+) in the ratio (\d+):(\d+)\. "
            r"What is the (larger|smaller) part\?",
            _split_ratio,
        ),
        (
            "scale",
            r"The ratio of ([a-z ]+) to ([a-z ]+) is (?P<p>\d+):(?P<q>\d+)\. "
            r"If there are (?P<known>\d+) \1, how many \2 are there\?",
            _scale_ratio,
        ),
        (
            "scale",
            r"A recipe uses flour and sugar in the ratio (?P<p>\d+):(?P<q>\d+)\. "
            r"If (?P<known>\d+) cups of flour are used, how many cups of sugar are needed\?",
            _scale_ratio,
        ),
    ],
}


def _recompute(category: str, question: str) -> tuple[str, Value]:
    """Finds the single template matching ``question`` and solves it from its text."""
    hits = [
        (kind, solver, match)
        for kind, pattern, solver in PARSERS[category]
        if (match := re.fullmatch(pattern, question)) is not None
    ]
    assert len(hits) == 1, f"{len(hits)} templates match {question!r}"
    kind, solver, match = hits[0]
    return kind, solver(match)


def _parse_answer(answer: str) -> Value:
    if ":" in answer:
        first, second = answer.split(":")
        return int(first), int(second)
    return Fraction(answer)


# --------------------------------------------------------------------------- tests


def test_category_counts_resolution() -> None:
    assert sum(CATEGORY_QUOTAS.values()) == 500
    assert category_counts(TRAIN_SIZE) == EXPECTED_TRAIN
    assert category_counts(TEST_SIZE) == EXPECTED_TEST
    assert list(category_counts(TRAIN_SIZE)) == list(CATEGORY_QUOTAS)
    assert category_counts(500) == dict(CATEGORY_QUOTAS)
    assert category_counts(0) == dict.fromkeys(CATEGORY_QUOTAS, 0)
    for total in range(60):
        assert sum(category_counts(total).values()) == total
    with pytest.raises(ValueError, match="non-negative"):
        category_counts(-1)


def test_split_sizes_and_category_counts(splits: tuple[list[Record], list[Record]]) -> None:
    train, test = splits
    assert (TRAIN_SIZE, TEST_SIZE) == (377, 95)
    assert len(train) == TRAIN_SIZE
    assert len(test) == TEST_SIZE
    assert Counter(r["category"] for r in train) == EXPECTED_TRAIN
    assert Counter(r["category"] for r in test) == EXPECTED_TEST


def test_write_splits_is_byte_identical_per_seed(tmp_path: Path) -> None:
    first = write_splits(tmp_path / "a", seed=0)
    second = write_splits(tmp_path / "b", seed=0)
    other = write_splits(tmp_path / "c", seed=1)
    assert [p.name for p in first] == [TRAIN_FILENAME, TEST_FILENAME]
    assert [p.name for p in first] == ["raw_questions.jsonl", "test_questions.jsonl"]
    for path_a, path_b, path_c in zip(first, second, other, strict=True):
        assert path_a.read_bytes() == path_b.read_bytes()
        assert path_a.read_bytes() != path_c.read_bytes()
    # Only the two outputs remain: the temporary files were renamed into place.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        [TRAIN_FILENAME, TEST_FILENAME]
    )


def test_written_files_round_trip(
    tmp_path: Path, splits: tuple[list[Record], list[Record]]
) -> None:
    train_path, test_path = write_splits(tmp_path, seed=0)
    for path, records in ((train_path, splits[0]), (test_path, splits[1])):
        text = path.read_text(encoding="utf-8")
        assert text.endswith("\n")
        lines = text.splitlines()
        assert [json.loads(line) for line in lines] == records
        for line in lines:
            assert list(json.loads(line)) == list(RECORD_KEYS)


def test_write_splits_overwrites_existing_files(tmp_path: Path) -> None:
    (tmp_path / TRAIN_FILENAME).write_text("stale\n", encoding="utf-8")
    train_path, _ = write_splits(tmp_path, seed=0)
    assert not train_path.read_text(encoding="utf-8").startswith("stale")


def test_build_splits_is_deterministic() -> None:
    assert build_splits(seed=3) == build_splits(seed=3)
    assert build_splits(seed=3) != build_splits(seed=4)


def test_no_duplicate_questions(splits: tuple[list[Record], list[Record]]) -> None:
    train, test = splits
    train_questions = [r["question"] for r in train]
    test_questions = [r["question"] for r in test]
    assert len(set(train_questions)) == len(train_questions)
    assert len(set(test_questions)) == len(test_questions)
    assert not set(train_questions) & set(test_questions)


def test_ids_are_unique_and_stable(splits: tuple[list[Record], list[Record]]) -> None:
    train, test = splits
    ids = [r["id"] for r in train + test]
    assert len(set(ids)) == len(ids)
    for split, records in (("train", train), ("test", test)):
        for record in records:
            assert re.fullmatch(rf"{split}-{record['category']}-\d{{4}}", record["id"])
    assert [r["id"] for r in build_splits(seed=0)[0]] == [r["id"] for r in train]


def test_record_fields_and_types(all_records: list[Record]) -> None:
    for record in all_records:
        assert list(record) == list(RECORD_KEYS)
        for key in RECORD_KEYS:
            assert isinstance(record[key], str), (key, record)
            assert record[key], (key, record)
        assert record["category"] in CATEGORY_QUOTAS
        for key in RECORD_KEYS:
            assert record[key].isascii(), record[key]
        assert "\n" not in record["question"]


def test_reference_cot_shape(all_records: list[Record]) -> None:
    for record in all_records:
        lines = record["reference_cot"].split("\n")
        assert 2 <= len(lines) <= 5, record
        assert lines[-1] == f"Final Answer: {record['answer']}"
        assert record["reference_cot"].endswith(f"Final Answer: {record['answer']}")
        for step in lines[:-1]:
            assert step, record
            assert step.strip() == step, record
            assert re.search(r"\d", step), step  # every step works with real numbers
            # No step may contain a marker that extract_final_answer would pick first.
            assert "answer" not in step.lower(), step
            assert "####" not in step, step
            assert "boxed" not in step, step
        extracted = extract_final_answer(record["reference_cot"])
        assert extracted == record["answer"]
        assert answers_match(extracted, record["answer"])


_NUMERIC_SIDE = re.compile(r"-?[\d.]+(?:\s*[-+*/]\s*\(?-?[\d.]+\)?)*|\d+ / \(\d+/\d+\)")


def test_reference_cot_arithmetic_is_correct(all_records: list[Record]) -> None:
    """Every ``<numbers> = <numbers>`` link in a worked step must hold exactly."""
    checked_records = 0
    for record in all_records:
        checked_here = 0
        for step in record["reference_cot"].split("\n")[:-1]:
            for clause in re.split(r":|,| and ", step.rstrip(".")):
                sides = [side.strip() for side in clause.split("=")]
                for left, right in itertools.pairwise(sides):
                    if _NUMERIC_SIDE.fullmatch(left) and _NUMERIC_SIDE.fullmatch(right):
                        assert _evaluate(left) == _evaluate(right), (step, record["question"])
                        checked_here += 1
        assert checked_here >= 1, record
        checked_records += 1
    assert checked_records == TRAIN_SIZE + TEST_SIZE


_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d*[1-9])?")
_INTEGER = re.compile(r"-?(?:0|[1-9]\d*)")
_FRACTION = re.compile(r"-?[1-9]\d*/[1-9]\d*")
_RATIO = re.compile(r"[1-9]\d*:[1-9]\d*")


def test_canonical_answer_formats(all_records: list[Record]) -> None:
    for record in all_records:
        answer, category = record["answer"], record["category"]
        if category in ("arithmetic", "algebra"):
            assert _INTEGER.fullmatch(answer), record
        elif category in ("percentages", "word_problems"):
            assert _NUMBER.fullmatch(answer), record
        elif category == "fractions":
            assert _INTEGER.fullmatch(answer) or _FRACTION.fullmatch(answer), record
            if "/" in answer:
                numerator, denominator = (int(part) for part in answer.split("/"))
                assert math.gcd(numerator, denominator) == 1, record
                assert denominator > 1, record
        else:
            assert _INTEGER.fullmatch(answer) or _RATIO.fullmatch(answer), record
            if ":" in answer:
                first, second = (int(part) for part in answer.split(":"))
                assert math.gcd(first, second) == 1, record
        assert answer != "-0"


def test_answer_type_follows_question(all_records: list[Record]) -> None:
    for record in all_records:
        if record["category"] != "ratios":
            assert ":" not in record["answer"]
            continue
        asks_ratio = (
            "simplest form" in record["question"] or "Simplify the ratio" in record["question"]
        )
        assert (":" in record["answer"]) == asks_ratio, record


@pytest.mark.parametrize("seed", [0, 1])
def test_gold_answers_are_right(seed: int) -> None:
    """Every question in both splits is re-solved from its text and must match its gold."""
    train, test = build_splits(seed=seed)
    kinds: Counter[tuple[str, str]] = Counter()
    checked = 0
    for record in train + test:
        kind, expected = _recompute(record["category"], record["question"])
        gold = _parse_answer(record["answer"])
        assert type(gold) is type(expected), record
        assert gold == expected, (record["question"], record["answer"], expected)
        kinds[(record["category"], kind)] += 1
        checked += 1
    assert checked == len(train) + len(test) == TRAIN_SIZE + TEST_SIZE
    word_kinds = {kind for category, kind in kinds if category == "word_problems"}
    assert word_kinds == {"speed", "area", "price", "age"}
    for category in CATEGORY_QUOTAS:
        covered = {kind for cat, kind in kinds if cat == category}
        assert covered == {kind for kind, _, _ in PARSERS[category]}, category
