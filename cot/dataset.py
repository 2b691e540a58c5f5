"""Deterministic synthetic math dataset with worked reference solutions.

Every question comes from a small set of templated generators (plain ASCII, a handful of
phrasings per kind) so that a tiny BPE tokenizer and a tiny teacher LM can learn them. Each
record carries a canonical gold ``answer`` and a ``reference_cot`` of 2-5 short lines that ends
with ``Final Answer: <answer>``.

Category counts. The specification gives per-category quotas (arithmetic 100, percentages 80,
algebra 80, word_problems 120, fractions 60, ratios 60; 500 in all) but also fixes the train
split at exactly 377 questions and the test split at 95. The quotas are therefore read as the
category *mix*: the exact counts are the quotas scaled to the split size with the
largest-remainder method, ties broken by the order listed above (see ``category_counts``).
That gives train arithmetic 76, percentages 60, algebra 60, word_problems 91, fractions 45,
ratios 45 and test 19, 15, 15, 23, 12, 11.

Determinism. Only ``random.Random(seed)`` is used (never the global generator or ``hash()``),
the train split is generated before the test split from the same stream, and questions are
unique across both splits, so ``write_splits`` produces byte-identical files for a given seed
on a given Python version.
"""

import json
import math
import os
import random
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Final

__all__ = [
    "CATEGORY_QUOTAS",
    "RECORD_KEYS",
    "TEST_FILENAME",
    "TEST_SIZE",
    "TRAIN_FILENAME",
    "TRAIN_SIZE",
    "build_splits",
    "category_counts",
    "write_splits",
]

CATEGORY_QUOTAS: Final[Mapping[str, int]] = MappingProxyType(
    {
        "arithmetic": 100,
        "percentages": 80,
        "algebra": 80,
        "word_problems": 120,
        "fractions": 60,
        "ratios": 60,
    }
)
TRAIN_SIZE: Final = 377
TEST_SIZE: Final = 95
TRAIN_FILENAME: Final = "raw_questions.jsonl"
TEST_FILENAME: Final = "test_questions.jsonl"
RECORD_KEYS: Final = ("id", "category", "question", "answer", "reference_cot")

# Retries per question before giving up; the template spaces hold thousands of questions per
# category, so hitting this means a generator lost its variety.
_MAX_ATTEMPTS: Final = 10_000


@dataclass(frozen=True)
class _Problem:
    """A generated question with its canonical answer and worked steps (without final line)."""

    question: str
    answer: str
    steps: tuple[str, ...]


_Generator = Callable[[random.Random], _Problem]


def category_counts(total: int) -> dict[str, int]:
    """Scales ``CATEGORY_QUOTAS`` to ``total`` questions by the largest-remainder method.

    Each category first gets the floor of its exact share; the questions left over go one each
    to the largest fractional remainders, ties broken by the order of ``CATEGORY_QUOTAS``.

    Args:
        total: Number of questions in the split.

    Returns:
        Category name to question count, in ``CATEGORY_QUOTAS`` order, summing to ``total``.

    Raises:
        ValueError: If ``total`` is negative.
    """
    if total < 0:
        raise ValueError(f"total must be non-negative, got {total}")
    quota_sum = sum(CATEGORY_QUOTAS.values())
    # Fractions keep the remainders exact, so ties are real ties and not float noise.
    shares = {name: Fraction(quota * total, quota_sum) for name, quota in CATEGORY_QUOTAS.items()}
    counts = {name: math.floor(share) for name, share in shares.items()}
    leftover = total - sum(counts.values())
    order = list(CATEGORY_QUOTAS)
    by_remainder = sorted(
        order, key=lambda name: (-(shares[name] - counts[name]), order.index(name))
    )
    for name in by_remainder[:leftover]:
        counts[name] += 1
    return counts


# --------------------------------------------------------------------------- formatting


def _fmt_number(value: Fraction) -> str:
    """Formats a terminating decimal canonically: ``12``, ``37.5``, ``-0.25``.

    Raises:
        ValueError: If ``value`` has no short terminating decimal expansion.
    """
    if value.denominator == 1:
        return str(value.numerator)
    magnitude = abs(value)
    for places in range(1, 7):
        scaled = magnitude * 10**places
        if scaled.denominator == 1:
            whole, frac = divmod(scaled.numerator, 10**places)
            sign = "-" if value < 0 else ""
            # The smallest exact number of places never leaves a trailing zero.
            return f"{sign}{whole}.{frac:0{places}d}"
    raise ValueError(f"{value} is not a short terminating decimal")


def _fmt_fraction(value: Fraction) -> str:
    """Formats a fraction canonically: reduced ``a/b`` with a leading sign, or an integer."""
    return str(value)


def _coef(coefficient: int, var: str) -> str:
    """Writes ``coefficient * var`` the way equations show it (``x``, not ``1x``)."""
    return var if coefficient == 1 else f"{coefficient}{var}"


def _frac(numerator: int, denominator: int) -> str:
    """Writes an unreduced fraction as it appears in a worked step."""
    return f"{numerator}/{denominator}"


# --------------------------------------------------------------------------- arithmetic

_ARITHMETIC_TEMPLATES: Final = (
    "What is {expr}?",
    "Calculate {expr}.",
    "Evaluate {expr}.",
    "Compute the value of {expr}.",
)


def _arith_add_product(rng: random.Random) -> tuple[str, int, tuple[str, ...]]:
    a, b, c = rng.randint(10, 99), rng.randint(2, 50), rng.randint(2, 9)
    product = b * c
    answer = a + product
    steps = (f"Multiply first: {b} * {c} = {product}.", f"Then add: {a} + {product} = {answer}.")
    return f"{a} + {b} * {c}", answer, steps


def _arith_product_minus(rng: random.Random) -> tuple[str, int, tuple[str, ...]]:
    a, b, c = rng.randint(2, 20), rng.randint(2, 12), rng.randint(1, 99)
    product = a * b
    answer = product - c
    steps = (
        f"Multiply first: {a} * {b} = {product}.",
        f"Then subtract: {product} - {c} = {answer}.",
    )
    return f"{a} * {b} - {c}", answer, steps


def _arith_sum_times(rng: random.Random) -> tuple[str, int, tuple[str, ...]]:
    a, b, c = rng.randint(2, 60), rng.randint(2, 60), rng.randint(2, 9)
    total = a + b
    answer = total * c
    steps = (
        f"Add inside the parentheses: {a} + {b} = {total}.",
        f"Then multiply: {total} * {c} = {answer}.",
    )
    return f"({a} + {b}) * {c}", answer, steps


def _arith_minus_product(rng: random.Random) -> tuple[str, int, tuple[str, ...]]:
    a, b, c = rng.randint(10, 99), rng.randint(2, 15), rng.randint(2, 9)
    product = b * c
    answer = a - product
    steps = (
        f"Multiply first: {b} * {c} = {product}.",
        f"Then subtract: {a} - {product} = {answer}.",
    )
    return f"{a} - {b} * {c}", answer, steps


def _arith_two_products(rng: random.Random) -> tuple[str, int, tuple[str, ...]]:
    a, b, c, d = (rng.randint(2, 15) for _ in range(4))
    first, second = a * b, c * d
    answer = first + second
    steps = (
        f"First product: {a} * {b} = {first}.",
        f"Second product: {c} * {d} = {second}.",
        f"Add them: {first} + {second} = {answer}.",
    )
    return f"{a} * {b} + {c} * {d}", answer, steps


def _arith_quotient_plus(rng: random.Random) -> tuple[str, int, tuple[str, ...]]:
    divisor, quotient, c = rng.randint(2, 12), rng.randint(2, 15), rng.randint(1, 99)
    dividend = divisor * quotient
    answer = quotient + c
    steps = (
        f"Divide first: {dividend} / {divisor} = {quotient}.",
        f"Then add: {quotient} + {c} = {answer}.",
    )
    return f"{dividend} / {divisor} + {c}", answer, steps


def _arith_difference_times(rng: random.Random) -> tuple[str, int, tuple[str, ...]]:
    a, b, c = rng.randint(2, 60), rng.randint(2, 60), rng.randint(2, 9)
    difference = a - b
    answer = difference * c
    steps = (
        f"Subtract inside the parentheses: {a} - {b} = {difference}.",
        f"Then multiply: {difference} * {c} = {answer}.",
    )
    return f"({a} - {b}) * {c}", answer, steps


def _arith_left_to_right(rng: random.Random) -> tuple[str, int, tuple[str, ...]]:
    a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99)
    total = a + b
    answer = total - c
    steps = (
        f"Work from left to right: {a} + {b} = {total}.",
        f"Then subtract: {total} - {c} = {answer}.",
    )
    return f"{a} + {b} - {c}", answer, steps


_ARITHMETIC_FORMS: Final = (
    _arith_add_product,
    _arith_product_minus,
    _arith_sum_times,
    _arith_minus_product,
    _arith_two_products,
    _arith_quotient_plus,
    _arith_difference_times,
    _arith_left_to_right,
)


def _gen_arithmetic(rng: random.Random) -> _Problem:
    """Multi-operation integer expression with operator precedence or parentheses."""
    expr, answer, steps = rng.choice(_ARITHMETIC_FORMS)(rng)
    question = rng.choice(_ARITHMETIC_TEMPLATES).format(expr=expr)
    return _Problem(question, str(answer), steps)


# --------------------------------------------------------------------------- percentages

_PERCENTS: Final = (5, 10, 12, 15, 20, 25, 30, 35, 40, 45, 50, 60, 75, 80, 90)
_PERCENT_OF_TEMPLATES: Final = (
    "What is {p}% of {n}?",
    "Find {p}% of {n}.",
    "Calculate {p}% of {n}.",
)
_INCREASE_TEMPLATES: Final = (
    "A price increases from {old} to {new}. What is the percentage increase?",
    "The population of a town grows from {old} to {new}. What is the percentage increase?",
)
_DECREASE_TEMPLATES: Final = (
    "A price decreases from {old} to {new}. What is the percentage decrease?",
    "The number of visitors drops from {old} to {new}. What is the percentage decrease?",
)


def _pct_of(rng: random.Random) -> _Problem:
    p, n = rng.choice(_PERCENTS), rng.randrange(20, 501, 10)
    product = p * n
    answer = _fmt_number(Fraction(product, 100))
    steps = (
        f"Multiply the percent by the number: {p} * {n} = {product}.",
        f"Divide by 100: {product} / 100 = {answer}.",
    )
    return _Problem(rng.choice(_PERCENT_OF_TEMPLATES).format(p=p, n=n), answer, steps)


def _pct_change(rng: random.Random) -> _Problem:
    # old is a multiple of 20 and p of 5, so old * p / 100 and the new value are integers.
    old, p = rng.randrange(20, 401, 20), rng.randrange(5, 80, 5)
    change = old * p // 100
    if rng.random() < 0.5:
        new = old + change
        template = rng.choice(_INCREASE_TEMPLATES)
        first = f"Find the change: {new} - {old} = {change}."
    else:
        new = old - change
        template = rng.choice(_DECREASE_TEMPLATES)
        first = f"Find the change: {old} - {new} = {change}."
    ratio = _fmt_number(Fraction(change, old))
    steps = (
        first,
        f"Divide by the original value: {change} / {old} = {ratio}.",
        f"Convert to a percent: {ratio} * 100 = {p}.",
    )
    return _Problem(template.format(old=old, new=new), str(p), steps)


def _pct_adjust(rng: random.Random) -> _Problem:
    n, p = rng.randrange(20, 501, 10), rng.choice(_PERCENTS)
    amount = Fraction(n * p, 100)
    shown = _fmt_number(amount)
    if rng.random() < 0.5:
        question = rng.choice(("What is {n} increased by {p}%?", "Increase {n} by {p}%."))
        result = _fmt_number(n + amount)
        last = f"Add it: {n} + {shown} = {result}."
    else:
        question = rng.choice(("What is {n} decreased by {p}%?", "Decrease {n} by {p}%."))
        result = _fmt_number(n - amount)
        last = f"Subtract it: {n} - {shown} = {result}."
    steps = (f"Find {p}% of {n}: {n} * {p} / 100 = {shown}.", last)
    return _Problem(question.format(n=n, p=p), result, steps)


def _pct_what_percent(rng: random.Random) -> _Problem:
    whole, p = rng.randrange(20, 401, 20), rng.randrange(5, 100, 5)
    part = whole * p // 100
    ratio = _fmt_number(Fraction(p, 100))
    template = rng.choice(
        ("What percent of {whole} is {part}?", "{part} is what percent of {whole}?")
    )
    steps = (
        f"Divide the part by the whole: {part} / {whole} = {ratio}.",
        f"Convert to a percent: {ratio} * 100 = {p}.",
    )
    return _Problem(template.format(whole=whole, part=part), str(p), steps)


def _gen_percentages(rng: random.Random) -> _Problem:
    """Percent of a number, percentage change, increase/decrease by a percent, what percent."""
    form = rng.choice((_pct_of, _pct_change, _pct_adjust, _pct_what_percent))
    return form(rng)


# --------------------------------------------------------------------------- algebra

_ALGEBRA_TEMPLATES: Final = (
    "Solve for {v}: {eq}.",
    "Find {v} if {eq}.",
    "What value of {v} satisfies {eq}?",
)
_VARIABLES: Final = ("x", "y", "n")
_SOLUTIONS: Final = tuple(value for value in range(-12, 21) if value != 0)


def _alg_plus(rng: random.Random, v: str, x: int) -> tuple[str, int, tuple[str, ...]]:
    a, b = rng.randint(2, 9), rng.randint(1, 30)
    c = a * x + b
    steps = (
        f"Subtract {b} from both sides: {a}{v} = {c} - {b} = {c - b}.",
        f"Divide both sides by {a}: {v} = {c - b} / {a} = {x}.",
    )
    return f"{a}{v} + {b} = {c}", x, steps


def _alg_minus(rng: random.Random, v: str, x: int) -> tuple[str, int, tuple[str, ...]]:
    a, b = rng.randint(2, 9), rng.randint(1, 30)
    c = a * x - b
    steps = (
        f"Add {b} to both sides: {a}{v} = {c} + {b} = {c + b}.",
        f"Divide both sides by {a}: {v} = {c + b} / {a} = {x}.",
    )
    return f"{a}{v} - {b} = {c}", x, steps


def _alg_parentheses(rng: random.Random, v: str, x: int) -> tuple[str, int, tuple[str, ...]]:
    a, b = rng.randint(2, 9), rng.randint(1, 15)
    c = a * (x + b)
    steps = (
        f"Divide both sides by {a}: {v} + {b} = {c} / {a} = {x + b}.",
        f"Subtract {b} from both sides: {v} = {x + b} - {b} = {x}.",
    )
    return f"{a}({v} + {b}) = {c}", x, steps


def _alg_both_sides(rng: random.Random, v: str, x: int) -> tuple[str, int, tuple[str, ...]]:
    a = rng.randint(4, 9)
    c = rng.randint(1, a - 2)  # keeps a - c >= 2 so the division step is a real step
    b = rng.randint(1, 30)
    d = (a - c) * x + b
    rhs = _coef(c, v) if d == 0 else f"{_coef(c, v)} {'+' if d > 0 else '-'} {abs(d)}"
    k = a - c
    steps = (
        f"Subtract {_coef(c, v)} from both sides: {k}{v} + {b} = {d}.",
        f"Subtract {b} from both sides: {k}{v} = {d} - {b} = {d - b}.",
        f"Divide both sides by {k}: {v} = {d - b} / {k} = {x}.",
    )
    return f"{a}{v} + {b} = {rhs}", x, steps


def _alg_divided(rng: random.Random, v: str, x: int) -> tuple[str, int, tuple[str, ...]]:
    # The solution must be a multiple of a, so x is used as the quotient here.
    a, b = rng.randint(2, 9), rng.randint(1, 20)
    c = x + b
    steps = (
        f"Subtract {b} from both sides: {v}/{a} = {c} - {b} = {x}.",
        f"Multiply both sides by {a}: {v} = {x} * {a} = {x * a}.",
    )
    return f"{v}/{a} + {b} = {c}", x * a, steps


def _gen_algebra(rng: random.Random) -> _Problem:
    """Linear equation in one variable with an integer solution."""
    v, x = rng.choice(_VARIABLES), rng.choice(_SOLUTIONS)
    form = rng.choice((_alg_plus, _alg_minus, _alg_parentheses, _alg_both_sides, _alg_divided))
    eq, answer, steps = form(rng, v, x)
    question = rng.choice(_ALGEBRA_TEMPLATES).format(v=v, eq=eq)
    return _Problem(question, str(answer), steps)


# --------------------------------------------------------------------------- word problems

_NAMES: Final = (
    "Anna", "Ben", "Carlos", "Dana", "Eli", "Fatima", "Grace", "Hiro",
    "Ivan", "Jade", "Kofi", "Liam", "Mia", "Noah", "Omar", "Priya",
)  # fmt: skip
_VEHICLES: Final = (("car", 40, 90), ("train", 60, 120), ("bus", 30, 70), ("cyclist", 10, 25))
_UNITS: Final = (("m", "meters"), ("cm", "centimeters"))
_ITEMS: Final = (
    ("pen", "pens", 1, 5),
    ("notebook", "notebooks", 2, 8),
    ("apple", "apples", 1, 3),
    ("book", "books", 5, 20),
    ("ticket", "tickets", 5, 25),
    ("mug", "mugs", 3, 12),
    ("ball", "balls", 2, 10),
    ("sandwich", "sandwiches", 3, 9),
)
_SALE_ITEMS: Final = ("jacket", "lamp", "bike", "chair", "watch", "backpack", "helmet", "book")


def _speed(rng: random.Random) -> _Problem:
    vehicle, low, high = rng.choice(_VEHICLES)
    speed = rng.randrange(low, high + 1, 5)
    form = rng.randrange(3)
    if form == 0:
        hours = rng.randint(2, 8)
        distance = speed * hours
        question = (
            f"A {vehicle} travels {distance} km in {hours} hours. "
            "What is the average speed in km/h?"
        )
        return _Problem(
            question,
            str(speed),
            (f"Speed = distance / time = {distance} / {hours} = {speed}.",),
        )
    if form == 1:
        hours = rng.randint(2, 8)
        distance = speed * hours
        question = (
            f"A {vehicle} travels at {speed} km/h for {hours} hours. "
            f"How far does the {vehicle} travel in kilometers?"
        )
        return _Problem(
            question,
            str(distance),
            (f"Distance = speed * time = {speed} * {hours} = {distance}.",),
        )
    half_hours = rng.randint(2, 16)
    if speed * half_hours % 2:
        half_hours += 1  # keeps the distance a whole number of km
    distance = speed * half_hours // 2
    hours_text = _fmt_number(Fraction(half_hours, 2))
    question = (
        f"A {vehicle} travels {distance} km at {speed} km/h. How many hours does the trip take?"
    )
    return _Problem(
        question,
        hours_text,
        (f"Time = distance / speed = {distance} / {speed} = {hours_text}.",),
    )


def _area(rng: random.Random) -> _Problem:
    unit, unit_name = rng.choice(_UNITS)
    square_unit = f"square {unit_name}"
    form = rng.randrange(5)
    if form == 0:
        length = rng.randint(5, 30)
        width = rng.randint(2, length - 1)
        area = length * width
        question = (
            f"A rectangle is {length} {unit} long and {width} {unit} wide. "
            f"What is its area in {square_unit}?"
        )
        steps: tuple[str, ...] = (f"Area = length * width = {length} * {width} = {area}.",)
        return _Problem(question, str(area), steps)
    if form == 1:
        length = rng.randint(5, 30)
        width = rng.randint(2, length - 1)
        half = length + width
        question = (
            f"A rectangle is {length} {unit} long and {width} {unit} wide. "
            f"What is its perimeter in {unit_name}?"
        )
        steps = (
            f"Add the length and the width: {length} + {width} = {half}.",
            f"Perimeter = 2 * {half} = {2 * half}.",
        )
        return _Problem(question, str(2 * half), steps)
    if form == 2:
        side = rng.randint(2, 30)
        question = f"A square has sides of {side} {unit}. What is its area in {square_unit}?"
        steps = (f"Area = side * side = {side} * {side} = {side * side}.",)
        return _Problem(question, str(side * side), steps)
    if form == 3:
        base, height = rng.randint(3, 30), rng.randint(2, 20)
        product = base * height
        area_text = _fmt_number(Fraction(product, 2))
        question = (
            f"A triangle has a base of {base} {unit} and a height of {height} {unit}. "
            f"What is its area in {square_unit}?"
        )
        steps = (
            f"Multiply the base by the height: {base} * {height} = {product}.",
            f"Divide by 2: {product} / 2 = {area_text}.",
        )
        return _Problem(question, area_text, steps)
    width = rng.randint(2, 15)
    length = rng.randint(width + 1, 30)
    area = length * width
    question = (
        f"A rectangle has an area of {area} {square_unit} and a width of {width} {unit}. "
        f"What is its length in {unit_name}?"
    )
    steps = (f"Length = area / width = {area} / {width} = {length}.",)
    return _Problem(question, str(length), steps)


def _price(rng: random.Random) -> _Problem:
    name = rng.choice(_NAMES)
    item, plural, low, high = rng.choice(_ITEMS)
    form = rng.randrange(5)
    if form == 0:
        count, price = rng.randint(2, 12), rng.randint(low, high)
        cost = count * price
        question = (
            f"{name} buys {count} {plural} at ${price} each. How much does {name} spend in dollars?"
        )
        steps: tuple[str, ...] = (f"Cost = number * price = {count} * {price} = {cost}.",)
        return _Problem(question, str(cost), steps)
    if form == 1:
        sale_item = rng.choice(_SALE_ITEMS)
        # A multiple of 20 times a multiple of 5 over 100 keeps the discount whole.
        price, percent = rng.randrange(20, 301, 20), rng.choice((10, 15, 20, 25, 30, 40, 50))
        discount = price * percent // 100
        question = (
            f"A {sale_item} costs ${price} and is on sale for {percent}% off. "
            "What is the sale price in dollars?"
        )
        steps = (
            f"Discount: {price} * {percent} / 100 = {discount}.",
            f"Sale price: {price} - {discount} = {price - discount}.",
        )
        return _Problem(question, str(price - discount), steps)
    if form == 2:
        other = rng.choice([entry for entry in _ITEMS if entry[0] != item])
        first_count, first_price = rng.randint(2, 9), rng.randint(low, high)
        second_count, second_price = rng.randint(2, 9), rng.randint(other[2], other[3])
        first_cost, second_cost = first_count * first_price, second_count * second_price
        total = first_cost + second_cost
        question = (
            f"{name} buys {first_count} {plural} at ${first_price} each and {second_count} "
            f"{other[1]} at ${second_price} each. How much does {name} spend in dollars?"
        )
        steps = (
            f"Cost of the {plural}: {first_count} * {first_price} = {first_cost}.",
            f"Cost of the {other[1]}: {second_count} * {second_price} = {second_cost}.",
            f"Total: {first_cost} + {second_cost} = {total}.",
        )
        return _Problem(question, str(total), steps)
    if form == 3:
        count, price = rng.randint(2, 12), rng.randint(low, high)
        total = count * price
        question = f"{count} {plural} cost ${total}. How much does one {item} cost in dollars?"
        steps = (f"Price of one = total / number = {total} / {count} = {price}.",)
        return _Problem(question, str(price), steps)
    count, price = rng.randint(2, 6), rng.randint(low, high)
    cost = count * price
    bill = rng.choice([note for note in (20, 50, 100, 200) if note > cost])
    question = (
        f"{name} buys {count} {plural} at ${price} each and pays with a ${bill} bill. "
        f"How much change does {name} get in dollars?"
    )
    steps = (f"Cost: {count} * {price} = {cost}.", f"Change: {bill} - {cost} = {bill - cost}.")
    return _Problem(question, str(bill - cost), steps)


def _age(rng: random.Random) -> _Problem:
    older, younger = rng.sample(_NAMES, 2)
    form = rng.randrange(5)
    if form == 0:
        times, age = rng.randint(2, 5), rng.randint(2, 15)
        question = (
            f"{older} is {times} times as old as {younger}. {younger} is {age} years old. "
            f"How old is {older}?"
        )
        steps: tuple[str, ...] = (
            f"Multiply {younger}'s age by {times}: {age} * {times} = {age * times}.",
        )
        return _Problem(question, str(age * times), steps)
    if form == 1:
        age, years = rng.randint(5, 60), rng.randint(2, 20)
        question = f"{older} is {age} years old. How old will {older} be in {years} years?"
        steps = (f"Add {years} years: {age} + {years} = {age + years}.",)
        return _Problem(question, str(age + years), steps)
    if form == 2:
        age = rng.randint(10, 60)
        years = rng.randint(2, age - 1)
        question = f"{older} is {age} years old. How old was {older} {years} years ago?"
        steps = (f"Subtract {years} years: {age} - {years} = {age - years}.",)
        return _Problem(question, str(age - years), steps)
    if form == 3:
        age, gap = rng.randint(3, 40), rng.randint(2, 30)
        total = 2 * age + gap
        question = (
            f"{older} is {gap} years older than {younger}. The sum of their ages is {total}. "
            f"How old is {younger}?"
        )
        steps = (
            f"Remove the difference: {total} - {gap} = {total - gap}.",
            f"Split it equally: {total - gap} / 2 = {age}.",
        )
        return _Problem(question, str(age), steps)
    times, age = rng.randint(2, 5), rng.randint(2, 15)
    gap = (times - 1) * age
    question = (
        f"{older} is {times} times as old as {younger}. {older} is {gap} years older than "
        f"{younger}. How old is {younger}?"
    )
    steps = (
        f"The gap is {times} - 1 = {times - 1} times {younger}'s age.",
        f"{younger}'s age = {gap} / {times - 1} = {age}.",
    )
    return _Problem(question, str(age), steps)


def _gen_word_problem(rng: random.Random) -> _Problem:
    """Speed/distance/time, area, price or age story problem with a clean numeric answer."""
    return rng.choice((_speed, _area, _price, _age))(rng)


# --------------------------------------------------------------------------- fractions


def _proper_fraction(rng: random.Random) -> tuple[int, int]:
    """Draws a proper fraction in lowest terms with denominator 2..12."""
    while True:
        denominator = rng.randint(2, 12)
        numerator = rng.randint(1, denominator - 1)
        if math.gcd(numerator, denominator) == 1:
            return numerator, denominator


def _simplify_step(numerator: int, denominator: int) -> tuple[str, ...]:
    """The closing 'Simplify' step, present only when the fraction actually changes."""
    value = Fraction(numerator, denominator)
    if value.numerator == numerator and value.denominator == denominator:
        return ()
    return (f"Simplify: {_frac(numerator, denominator)} = {_fmt_fraction(value)}.",)


def _frac_add_sub(rng: random.Random) -> _Problem:
    (a, b), (c, d) = _proper_fraction(rng), _proper_fraction(rng)
    while (a, b) == (c, d):
        c, d = _proper_fraction(rng)  # equal operands would make subtraction trivially 0
    op = rng.choice("+-")
    common = math.lcm(b, d)
    left, right = a * common // b, c * common // d
    result = left + right if op == "+" else left - right
    verb = "Add" if op == "+" else "Subtract"
    steps = (
        f"Use the common denominator {common}: {_frac(a, b)} = {_frac(left, common)} and "
        f"{_frac(c, d)} = {_frac(right, common)}.",
        f"{verb} the numerators: {_frac(left, common)} {op} {_frac(right, common)} = "
        f"{_frac(result, common)}.",
        *_simplify_step(result, common),
    )
    template = rng.choice(("What is {x} {op} {y}?", "Calculate {x} {op} {y}."))
    question = template.format(x=_frac(a, b), op=op, y=_frac(c, d))
    return _Problem(question, _fmt_fraction(Fraction(result, common)), steps)


def _frac_multiply(rng: random.Random) -> _Problem:
    (a, b), (c, d) = _proper_fraction(rng), _proper_fraction(rng)
    numerator, denominator = a * c, b * d
    steps = (
        f"Multiply the numerators: {a} * {c} = {numerator}.",
        f"Multiply the denominators: {b} * {d} = {denominator}.",
        *_simplify_step(numerator, denominator),
    )
    template = rng.choice(("What is {x} * {y}?", "Calculate {x} * {y}.", "What is {x} of {y}?"))
    question = template.format(x=_frac(a, b), y=_frac(c, d))
    return _Problem(question, _fmt_fraction(Fraction(numerator, denominator)), steps)


def _frac_divide(rng: random.Random) -> _Problem:
    (a, b), (c, d) = _proper_fraction(rng), _proper_fraction(rng)
    numerator, denominator = a * d, b * c
    steps = (
        f"Flip the divisor: 1 / ({_frac(c, d)}) = {_frac(d, c)}.",
        f"Multiply: {a} * {d} = {numerator} and {b} * {c} = {denominator}.",
        *_simplify_step(numerator, denominator),
    )
    template = rng.choice(("What is {x} divided by {y}?", "Divide {x} by {y}."))
    question = template.format(x=_frac(a, b), y=_frac(c, d))
    return _Problem(question, _fmt_fraction(Fraction(numerator, denominator)), steps)


def _frac_simplify(rng: random.Random) -> _Problem:
    while True:
        top, bottom = rng.randint(1, 15), rng.randint(2, 15)
        if top != bottom and math.gcd(top, bottom) == 1:
            break
    factor = rng.randint(2, 9)
    numerator, denominator = top * factor, bottom * factor
    steps = (
        f"The greatest common divisor of {numerator} and {denominator} is {factor}.",
        f"Divide both: {numerator} / {factor} = {top} and {denominator} / {factor} = {bottom}.",
    )
    template = rng.choice(("Simplify {x}.", "Write {x} in lowest terms."))
    question = template.format(x=_frac(numerator, denominator))
    return _Problem(question, _fmt_fraction(Fraction(top, bottom)), steps)


def _gen_fractions(rng: random.Random) -> _Problem:
    """Add, subtract, multiply, divide or simplify fractions; answer reduced ``a/b``."""
    return rng.choice((_frac_add_sub, _frac_multiply, _frac_divide, _frac_simplify))(rng)


# --------------------------------------------------------------------------- ratios

_GROUPS: Final = (
    ("class", "boys", "girls"),
    ("basket", "apples", "oranges"),
    ("garden", "roses", "tulips"),
    ("shelter", "cats", "dogs"),
    ("box", "red balls", "blue balls"),
)
_PAIRS: Final = (
    ("cats", "dogs"),
    ("boys", "girls"),
    ("red marbles", "blue marbles"),
    ("adults", "children"),
)


def _coprime_pair(rng: random.Random) -> tuple[int, int]:
    """Draws two distinct coprime integers in 1..12 (a ratio already in lowest terms)."""
    while True:
        first, second = rng.randint(1, 12), rng.randint(1, 12)
        if first != second and math.gcd(first, second) == 1:
            return first, second


def _ratio_simplify(rng: random.Random) -> _Problem:
    (p, q), factor = _coprime_pair(rng), rng.randint(2, 12)
    a, b = p * factor, q * factor
    steps = (
        f"The greatest common divisor of {a} and {b} is {factor}.",
        f"Divide both: {a} / {factor} = {p} and {b} / {factor} = {q}.",
    )
    if rng.random() < 0.6:
        template = rng.choice(
            ("Simplify the ratio {a}:{b}.", "Write the ratio {a}:{b} in simplest form.")
        )
        question = template.format(a=a, b=b)
    else:
        place, first, second = rng.choice(_GROUPS)
        question = (
            f"A {place} has {a} {first} and {b} {second}. "
            f"What is the ratio of {first} to {second} in simplest form?"
        )
    return _Problem(question, f"{p}:{q}", steps)


def _ratio_split(rng: random.Random) -> _Problem:
    (p, q), factor = _coprime_pair(rng), rng.randint(2, 15)
    parts = p + q
    total = parts * factor
    which = rng.choice(("larger", "smaller"))
    share = max(p, q) if which == "larger" else min(p, q)
    verb = rng.choice(("Split", "Divide"))
    question = f"{verb} {total} in the ratio {p}:{q}. What is the {which} part?"
    steps = (
        f"Total parts: {p} + {q} = {parts}.",
        f"One part: {total} / {parts} = {factor}.",
        f"The {which} part: {share} * {factor} = {share * factor}.",
    )
    return _Problem(question, str(share * factor), steps)


def _ratio_scale(rng: random.Random) -> _Problem:
    (p, q), factor = _coprime_pair(rng), rng.randint(2, 10)
    known = p * factor
    if rng.random() < 0.7:
        first, second = rng.choice(_PAIRS)
        question = (
            f"The ratio of {first} to {second} is {p}:{q}. "
            f"If there are {known} {first}, how many {second} are there?"
        )
    else:
        second = "cups of sugar"
        question = (
            f"A recipe uses flour and sugar in the ratio {p}:{q}. If {known} cups of flour "
            "are used, how many cups of sugar are needed?"
        )
    steps = (
        f"One part: {known} / {p} = {factor}.",
        f"Number of {second}: {q} * {factor} = {q * factor}.",
    )
    return _Problem(question, str(q * factor), steps)


def _gen_ratios(rng: random.Random) -> _Problem:
    """Simplify a ratio (answer ``a:b``) or use one to find a quantity (answer a number)."""
    return rng.choice((_ratio_simplify, _ratio_split, _ratio_scale))(rng)


# --------------------------------------------------------------------------- assembly

_GENERATORS: Final[Mapping[str, _Generator]] = MappingProxyType(
    {
        "arithmetic": _gen_arithmetic,
        "percentages": _gen_percentages,
        "algebra": _gen_algebra,
        "word_problems": _gen_word_problem,
        "fractions": _gen_fractions,
        "ratios": _gen_ratios,
    }
)


def _unique_problem(generator: _Generator, rng: random.Random, seen: set[str]) -> _Problem:
    """Draws problems until one has a question not yet used in either split."""
    for _ in range(_MAX_ATTEMPTS):
        problem = generator(rng)
        if problem.question not in seen:
            seen.add(problem.question)
            return problem
    raise RuntimeError(f"no unique question after {_MAX_ATTEMPTS} attempts")


def _generate_split(
    split: str, total: int, rng: random.Random, seen: set[str]
) -> list[dict[str, str]]:
    """Generates one split with exact category counts, shuffled so categories interleave."""
    records: list[dict[str, str]] = []
    for category, count in category_counts(total).items():
        generator = _GENERATORS[category]
        for index in range(count):
            problem = _unique_problem(generator, rng, seen)
            cot = "\n".join((*problem.steps, f"Final Answer: {problem.answer}"))
            records.append(
                {
                    "id": f"{split}-{category}-{index:04d}",
                    "category": category,
                    "question": problem.question,
                    "answer": problem.answer,
                    "reference_cot": cot,
                }
            )
    rng.shuffle(records)
    return records


def build_splits(seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Builds the train and test splits deterministically from ``seed``.

    Args:
        seed: Seed of the private ``random.Random`` stream.

    Returns:
        ``(train, test)`` lists of records with keys ``RECORD_KEYS`` in that order; no
        question repeats within or across the splits.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    train = _generate_split("train", TRAIN_SIZE, rng, seen)
    test = _generate_split("test", TEST_SIZE, rng, seen)
    return train, test


def _atomic_write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` so readers see either the old or the complete new file.

    Args:
        path: Destination file; its directory must exist.
        text: Content, written as UTF-8.
    """
    # The temp file lives in the destination directory so os.replace stays an atomic rename.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; data files should stay readable like any other output.
        os.chmod(tmp_name, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _to_jsonl(records: Sequence[dict[str, str]]) -> str:
    """Serialises records as JSON lines with the fixed key order of ``RECORD_KEYS``."""
    lines = (
        json.dumps({key: record[key] for key in RECORD_KEYS}, ensure_ascii=False)
        for record in records
    )
    return "".join(f"{line}\n" for line in lines)


def write_splits(out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Builds the splits and writes them atomically as JSON lines.

    Args:
        out_dir: Directory for ``raw_questions.jsonl`` (train) and ``test_questions.jsonl``
            (test); created if missing.
        seed: Dataset seed, see ``build_splits``.

    Returns:
        Paths of the train and test files.
    """
    train, test = build_splits(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, test_path = out_dir / TRAIN_FILENAME, out_dir / TEST_FILENAME
    _atomic_write_text(train_path, _to_jsonl(train))
    _atomic_write_text(test_path, _to_jsonl(test))
    return train_path, test_path
