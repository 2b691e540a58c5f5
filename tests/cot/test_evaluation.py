"""Unit tests of cot/evaluation.py: every number of the report, and the files it writes.

Expected values are computed by hand (in the comments), not with the code under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cot.evaluation import (
    COLORS,
    PREDICTION_KEYS,
    Scorer,
    Vote,
    agreement,
    majority_vote,
    pass_at_k,
    render_markdown,
    score,
    score_file,
    wilson_interval,
    write_report,
)
from cot.records import RecordError

# Categories a question file may hold: mathtext ($...$), a Markdown table's pipe, a newline.
ODD = ["$\\frac{$", "a | b", "two\nlines", "$x$ and $", "é ≠ ε"]


def rec(
    qid: str,
    pred: str | None,
    gold: str | None,
    *,
    sample: int = 0,
    category: str | None = "c",
    correct: bool | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One prediction record; ``correct`` defaults to exact string equality with the gold."""
    if gold is not None and correct is None:
        correct = pred == gold
    generated = f"Reasoning.\nFinal Answer: {pred}" if pred is not None else "I am not sure."
    return {
        "id": qid,
        "sample": sample,
        "category": category,
        "question": f"question {qid}?",
        "generated": generated,
        "pred": pred,
        "gold": gold,
        "correct": correct,
        **extra,
    }


def write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def md_lines(out: Path) -> list[str]:
    return (out / "report.md").read_text(encoding="utf-8").splitlines()


# --- Wilson interval ---------------------------------------------------------------------------


def test_wilson_interval_matches_hand_computed_values() -> None:
    # 3/95: p = .031579, z²/n = .040436; centre .049784 ± .038987 (solved by hand).
    lo, hi = wilson_interval(3, 95)  # type: ignore[misc]
    assert lo == pytest.approx(0.010797, abs=1e-6)
    assert hi == pytest.approx(0.088771, abs=1e-6)
    # 0/10: the upper end is (z²/n) / (1 + z²/n) = .384146 / 1.384146.
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.277533, abs=1e-6))
    # 10/10 mirrors it, and the ends are exactly 0 and 1, not 0.9999999.
    assert wilson_interval(10, 10) == (pytest.approx(0.722467, abs=1e-6), 1.0)
    assert wilson_interval(0, 0) is None


@pytest.mark.parametrize("bad", [-1, 11])
def test_wilson_interval_refuses_an_impossible_count(bad: int) -> None:
    with pytest.raises(ValueError):
        wilson_interval(bad, 10)


# --- pass@k ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 1, 0.25),  # 1 - C(3,1)/C(4,1) = 1 - 3/4
        (4, 1, 4, 1.0),  # every draw of 4 holds the correct one
        (4, 0, 1, 0.0),
        (4, 0, 4, 0.0),
        (4, 2, 2, 5 / 6),  # 1 - C(2,2)/C(4,2) = 1 - 1/6
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (1000, 1, 500, 0.5),  # 1 - C(999,500)/C(1000,500) = 1 - 500/1000; huge binomials
        (2, 1, 4, 1.0),  # fewer samples than k, one correct: passes
    ],
)
def test_pass_at_k_hand_values(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_refuses_nonsense() -> None:
    for args in [(4, 5, 1), (4, -1, 1), (4, 1, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(*args)


# --- majority vote -----------------------------------------------------------------------------


def test_majority_vote_without_a_tie_groups_equal_answers() -> None:
    # "1/2", "0.50" and "$0.5$" are one answer for answers_match: three votes against one.
    vote = majority_vote([(3, "7"), (0, "1/2"), (1, "0.50"), (2, "$0.5$")])
    assert vote == Vote("1/2", 0, 3, False, (0, 1, 2))


def test_majority_vote_tie_goes_to_the_lowest_sample_index() -> None:
    # File order puts "9" first, but "4" was sample 0.
    assert majority_vote([(2, "9"), (3, "4"), (1, "9"), (0, "4")]) == Vote("4", 0, 2, True, (0, 3))


def test_none_never_votes() -> None:
    assert majority_vote([(0, None), (1, None), (2, "3")]) == Vote("3", 2, 1, False, (2,))
    assert majority_vote([(0, None), (1, None)]) == Vote(None, None, 0, False)
    assert majority_vote([]) == Vote(None, None, 0, False)


# --- scoring -----------------------------------------------------------------------------------


def k4_records() -> list[dict[str, Any]]:
    """Four questions, four samples each, in shuffled sample order."""
    return [
        # q1, gold 7: c = 1; votes 3,7,3,5 -> "3" (2 votes), wrong, no tie.
        rec("q1", "3", "7", sample=2),
        rec("q1", "3", "7", sample=0),
        rec("q1", "7", "7", sample=1),
        rec("q1", "5", "7", sample=3),
        # q2, gold 2: c = 0; votes 4,9 (two None) -> tie, "4" (sample 0), wrong.
        rec("q2", "9", "2", sample=2),
        rec("q2", None, "2", sample=1),
        rec("q2", "4", "2", sample=0),
        rec("q2", None, "2", sample=3),
        # q3, gold 1: c = 2; votes 2,1,2,1 -> tie, "2" (sample 0) wins, wrong.
        rec("q3", "2", "1", sample=0),
        rec("q3", "1", "1", sample=1),
        rec("q3", "2", "1", sample=2),
        rec("q3", "1", "1", sample=3),
        # q4, gold 0.5: c = 2; "1/2" and "0.50" are one answer -> 2 votes, correct.
        rec("q4", "1/2", "0.5", sample=0, correct=True),
        rec("q4", "3", "0.5", sample=1),
        rec("q4", "0.50", "0.5", sample=2, correct=True),
        rec("q4", "x", "0.5", sample=3),
    ]


def test_k_samples_give_pass_at_1_pass_at_k_and_majority() -> None:
    s = score(k4_records(), "student")
    o = s["overall"]
    assert s["samples_per_question"] == 4
    assert (o["n"], o["scored"], o["correct"], o["questions"]) == (16, 16, 5, 4)
    assert o["accuracy"] == 5 / 16
    assert o["pass@1"] == pytest.approx((1 / 4 + 0 + 2 / 4 + 2 / 4) / 4)  # 0.3125
    assert o["pass@K"] == pytest.approx((1 + 0 + 1 + 1) / 4)  # 0.75
    assert (o["majority"], o["majority_correct"], o["majority_ties"]) == (0.25, 1, 2)


def test_one_sample_per_question_has_no_pass_at_k_nor_majority(tmp_path: Path) -> None:
    s = score([rec("a", "1", "1"), rec("b", "2", "3")])
    assert s["samples_per_question"] == 1
    assert all(s["overall"][k] is None for k in ("pass@1", "pass@K", "majority", "majority_ties"))
    write_report(tmp_path, write(tmp_path / "p.jsonl", [rec("a", "1", "1")]))
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "pass@" not in text and "majority" not in text


def test_unscored_records_are_counted_apart_never_as_wrong(tmp_path: Path) -> None:
    recs = [rec("a", "1", "1"), rec("b", "2", "3"), rec("c", "5", None), rec("d", None, None)]
    o = score(recs)["overall"]
    assert (o["n"], o["scored"], o["unscored"], o["correct"]) == (4, 2, 2, 1)
    assert o["accuracy"] == 0.5  # 1/2, not 1/4
    assert o["ci95"] == list(wilson_interval(1, 2))  # type: ignore[arg-type]
    assert o["format_compliance"] == 0.75  # over all records: a, b, c state one; d does not
    assert score_file(write(tmp_path / "p.jsonl", recs))["overall"] == o
    nothing = score([rec("a", "1", None)])["overall"]
    assert (nothing["accuracy"], nothing["ci95"], nothing["scored"]) == (None, None, 0)


def test_an_engine_error_is_scored_wrong_and_counted() -> None:
    failed = {**rec("a", None, "3", correct=None), "generated": None, "error": "timeout"}
    failed.pop("correct")
    unscored = {**rec("b", None, None), "generated": None, "error": "context length"}
    o = score([failed, unscored, rec("c", "3", "3")])["overall"]
    assert (o["n"], o["scored"], o["correct"], o["errors"], o["formatted"]) == (3, 2, 1, 2, 1)
    assert o["accuracy"] == 0.5


def test_the_correct_flag_is_recomputed_only_where_it_is_missing() -> None:
    recs = [rec("a", "1/2", "0.5", correct=None), rec("b", "1", "1", correct=False)]
    recs[0]["correct"] = None  # answers_match decides: 1/2 == 0.5
    assert score(recs)["overall"]["correct"] == 1


def test_reduced_golds_are_counted_by_record_and_question(tmp_path: Path) -> None:
    recs = [
        rec("a", "18", "18", sample=0, gold_reduced=True),
        rec("a", "18", "18", sample=1, gold_reduced=True),
        rec("b", "2", "2", sample=0, gold_reduced=False),
        rec("b", "2", "2", sample=1),
    ]
    o = write_report(tmp_path, write(tmp_path / "p.jsonl", recs))["student"]["overall"]
    assert (o["gold_reduced"], o["gold_reduced_questions"]) == (2, 1)
    line = "- gold answers reduced from a worked solution to their final answer: "
    assert line + "1 of 2 questions (2 of 4 records)" in md_lines(tmp_path)


def test_per_category_numbers() -> None:
    recs = [
        rec("a", "1", "1", category="algebra"),
        rec("b", "2", "3", category="algebra"),
        rec("c", "4", "4", category="algebra"),
        rec("d", "5", "5", category="ratios"),
        rec("e", "6", None, category="ratios"),
        rec("f", "7", "8", category=None),
    ]
    s = score(recs)
    assert list(s["per_category"]) == ["algebra", "all", "ratios"]  # sorted; None is "all"
    alg, rat, rest = (s["per_category"][c] for c in ("algebra", "ratios", "all"))
    assert (alg["n"], alg["scored"], alg["correct"], alg["accuracy"]) == (3, 3, 2, 2 / 3)
    assert alg["ci95"] == pytest.approx([0.207660, 0.938508], abs=1e-6)  # 2/3, as 3/95 above
    assert (rat["n"], rat["scored"], rat["unscored"], rat["accuracy"]) == (2, 1, 1, 1.0)
    assert (rest["n"], rest["correct"], rest["accuracy"]) == (1, 0, 0.0)
    assert s["overall"]["correct"] == sum(g["correct"] for g in s["per_category"].values())


def test_the_samples_of_a_question_count_under_its_first_category() -> None:
    s = score([rec("a", "1", "1", category="x"), rec("a", "2", "1", sample=1, category="y")])
    assert list(s["per_category"]) == ["x"]
    assert (s["per_category"]["x"]["n"], s["per_category"]["x"]["questions"]) == (2, 1)


# --- agreement ---------------------------------------------------------------------------------


def test_agreement_counts_equal_answers_even_when_both_are_wrong() -> None:
    student = {
        "a": ("x", "5"),
        "b": ("x", "1/2"),
        "c": ("y", "3"),
        "d": ("y", None),
        "e": ("y", "9"),
    }
    teacher = {
        "a": ("x", "5"),
        "b": ("x", "0.5"),
        "c": ("y", "4"),
        "d": ("y", None),
        "f": ("y", "1"),
    }
    ag = agreement(student, teacher)
    # In both: a, b, c, d (e, f in one only). Same: a ("5"), b (1/2 = 0.5); d has no answer.
    assert ag["overall"] == {
        "n": 4,
        "count": 2,
        "rate": 0.5,
        "ci95": list(wilson_interval(2, 4)),  # type: ignore[arg-type]
    }
    assert ag["per_category"]["x"]["count"] == 2 and ag["per_category"]["x"]["n"] == 2
    assert ag["per_category"]["y"]["count"] == 0 and ag["per_category"]["y"]["n"] == 2


def test_student_teacher_agreement_in_the_report(tmp_path: Path) -> None:
    # Gold 7; student and teacher both say 3 on q1 (both wrong: it still agrees), differ on q2.
    student = write(tmp_path / "s.jsonl", [rec("q1", "3", "7"), rec("q2", "7", "7")])
    teacher = write(tmp_path / "t.jsonl", [rec("q1", "3", "7"), rec("q2", "6", "7")])
    report = write_report(tmp_path / "out", student, teacher=teacher)
    st_ = report["agreement"]["student_teacher"]["overall"]
    assert (st_["n"], st_["count"], st_["rate"]) == (2, 1, 0.5)
    assert "base_teacher" not in report["agreement"]
    lo, hi = wilson_interval(1, 2)  # type: ignore[misc]
    assert (
        "- **student–teacher agreement** (same answer, right or wrong): "
        f"50.0% [{100 * lo:.1f}%, {100 * hi:.1f}%] (1/2 questions)"
    ) in md_lines(tmp_path / "out")


def test_with_k_samples_agreement_compares_majority_answers() -> None:
    s, t = Scorer(), Scorer()
    for r in [
        rec("q", "2", "1", sample=0),
        rec("q", "5", "1", sample=1),
        rec("q", "5", "1", sample=2),
    ]:
        s.add(r)
    t.add(rec("q", "5", "1"))
    assert s.answers() == {"q": ("c", "5")}
    assert agreement(s.answers(), t.answers())["overall"]["count"] == 1


def test_teacher_generation_records_are_read_too() -> None:
    teacher_rec = {
        "id": "a",
        "sample": 0,
        "question": "q",
        "cot": "so\nFinal Answer: 4",
        "teacher_answer": "4",
        "gold": "4",
        "correct": True,
    }
    s = Scorer("teacher")
    s.add(teacher_rec)
    assert s.result()["overall"]["formatted"] == 1
    assert s.answers() == {"a": ("all", "4")}


# --- the report files --------------------------------------------------------------------------


def three_models(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Student, base and teacher on the same 8 questions in 2 categories; every accuracy > 0."""
    golds = {f"q{i}": str(i) for i in range(8)}
    cat = {q: ("algebra" if i < 4 else "a | b") for i, q in enumerate(golds)}
    right = {"student": {0, 1, 2, 4, 5, 6}, "base": {0, 4, 5}, "teacher": {0, 1, 2, 3, 4, 5, 6, 7}}
    paths = []
    for name, ok in right.items():
        recs = [
            rec(q, g if i in ok else "99", g, category=cat[q])
            for i, (q, g) in enumerate(golds.items())
        ]
        paths.append(write(tmp_path / f"{name}.jsonl", recs))
    return paths[0], paths[1], paths[2]


def test_report_json_is_the_returned_dict_with_the_documented_keys(tmp_path: Path) -> None:
    s, b, t = three_models(tmp_path)
    report = write_report(tmp_path / "out", s, b, t)
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    assert set(report) == {
        "schema",
        "title",
        "student_label",
        "inputs",
        "interval",
        "student",
        "base",
        "teacher",
        "agreement",
    }
    assert report["schema"] == 2
    assert report["inputs"] == {"student": str(s), "base": str(b), "teacher": str(t)}
    assert report["student_label"] == report["student"]["label"] == "student + LoRA"
    assert set(report["agreement"]) == {"student_teacher", "base_teacher"}
    o = report["student"]["overall"]
    # Read by hpc/stages/report.py and other code.
    assert {k: o[k] for k in ("accuracy", "format_compliance", "n", "correct", "formatted")} == {
        "accuracy": 6 / 8,
        "format_compliance": 1.0,
        "n": 8,
        "correct": 6,
        "formatted": 8,
    }
    group_keys = {
        *("n", "scored", "unscored", "correct", "errors", "formatted", "accuracy", "ci95"),
        *("format_compliance", "gold_reduced", "gold_reduced_questions", "questions"),
        *("scored_questions", "pass@1", "pass@K", "majority", "majority_correct"),
        "majority_ties",
    }
    for name in ("student", "base", "teacher"):
        assert set(report[name]) == {"label", "samples_per_question", "overall", "per_category"}
        assert set(report[name]["overall"]) == group_keys
        assert all(set(g) == group_keys for g in report[name]["per_category"].values())


def test_markdown_headlines_difference_and_table(tmp_path: Path) -> None:
    s, b, t = three_models(tmp_path)
    write_report(tmp_path / "out", s, b, t)
    lines = md_lines(tmp_path / "out")
    assert lines[0] == "# cot-hpc evaluation report"
    # Wilson by hand: 6/8 .669 ± .260; 3/8 .416 ± .279; 8/8 .838 ± .162.
    assert (
        "- **student + LoRA**: accuracy **75.0% [40.9%, 92.9%] (6/8)**, "
        "format compliance 100.0% (8/8)"
    ) in lines
    assert any(
        x.startswith("- **base student**: accuracy **37.5% [13.7%, 69.4%] (3/8)**") for x in lines
    )
    assert any(
        x.startswith("- **teacher**: accuracy **100.0% [67.6%, 100.0%] (8/8)**") for x in lines
    )
    assert (
        "- difference vs base student: accuracy +37.5 points, format compliance +0.0 points"
        in lines
    )
    # student and teacher give the same answer on the 6 the student gets right: 6/8.
    assert any(
        x.startswith("- **student–teacher agreement** (same answer, right or wrong): 75.0%")
        for x in lines
    )
    # base and teacher: the 3 the base gets right.
    assert any(x.startswith("- base–teacher agreement: 37.5%") for x in lines)
    table = [x for x in lines if x.startswith("|")]
    assert len(table) == 2 + 2  # header, alignment, one row per category
    assert table[0].startswith("| category | student + LoRA n | student + LoRA accuracy [95% CI]")
    assert table[0].endswith("| Δ acc (points) | student–teacher agreement |")
    # "a | b": student 3/4 (q4, q5, q6), base 2/4 (q4, q5), teacher 4/4; agreement 3/4.
    row = next(x for x in table if x.startswith("| a \\| b |"))
    cells = [c.strip() for c in row.replace("\\|", "¦").strip("|").split("|")]
    assert cells[0] == "a ¦ b"
    assert cells[1:4] == ["4", "75.0% [30.1%, 95.4%] (3/4)", "100.0%"]
    assert cells[-2:] == ["+25.0", "75.0% (3/4)"]


def test_k_samples_in_the_markdown(tmp_path: Path) -> None:
    write_report(tmp_path, write(tmp_path / "p.jsonl", k4_records()))
    lines = md_lines(tmp_path)
    assert (
        "  - 4 samples per question, 4 scored questions: pass@1 31.2%, pass@4 75.0%, "
        "majority vote 25.0% (1/4), tied votes 2 (broken by the lowest sample index)"
    ) in lines
    assert "student + LoRA majority" in next(x for x in lines if x.startswith("| category"))


def test_unscored_and_errors_in_the_headline(tmp_path: Path) -> None:
    failed = {**rec("b", None, "3"), "generated": None, "error": "timeout", "correct": False}
    recs = [rec("a", "3", "3"), failed, rec("c", "1", None)]
    write_report(tmp_path, write(tmp_path / "p.jsonl", recs))
    headline = md_lines(tmp_path)[2]
    assert headline.startswith("- **student + LoRA**: accuracy **50.0% [9.5%, 90.5%] (1/2)**")
    assert headline.endswith(", unscored (no gold) 1, engine errors 1")


def test_a_single_model_report_has_no_base_or_teacher_sections(tmp_path: Path) -> None:
    preds = write(tmp_path / "p.jsonl", [rec("a", "1", "1"), rec("b", "2", "3")])
    report = write_report(tmp_path / "out", preds, student_label="base student")
    assert "base" not in report and "teacher" not in report and "agreement" not in report
    assert report["inputs"] == {"student": str(preds)}
    text = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert text.count("- **") == 1 and "- **base student**: accuracy **50.0%" in text
    assert "difference" not in text and "agreement" not in text and "Δ" not in text


def test_the_generation_merge_kept_counts_reach_the_report(tmp_path: Path) -> None:
    preds = write(tmp_path / "p.jsonl", [rec("a", "1", "1")])
    merge = {
        "total": 16, "kept": 8, "keep": "majority",
        "per_category": {"algebra": [5, 8], "word": [3, 8]},
        "majority": {"questions": 4, "ties": 1, "no_answer": 1, "unanimous": 1, "agreement": 0.5},
    }  # fmt: skip
    report = write_report(tmp_path / "out", preds, training_data=merge)
    assert report["training_data"] == merge
    lines = md_lines(tmp_path / "out")
    assert "- training data: 8 of 16 teacher traces kept (--keep majority)" in lines
    assert "  - kept per category: algebra 5/8, word 3/8" in lines
    assert (
        "  - majority vote over 4 questions: 50.0% of samples agree with their majority, "
        "1 unanimous, 1 ties, 1 without any answer"
    ) in lines


def test_predictions_jsonl_has_the_seed_keys_one_line_per_record_in_order(tmp_path: Path) -> None:
    failed = {**rec("b", None, "3"), "generated": None, "error": "timeout"}
    recs = [rec("z", "1", "1", sample=1), rec("z", "2", "1", sample=0), failed, rec("c", "é", None)]
    write_report(tmp_path / "out", write(tmp_path / "p.jsonl", recs))
    lines = (tmp_path / "out" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(recs)
    got = [json.loads(x) for x in lines]
    assert all(
        list(g) == list(PREDICTION_KEYS) == ["question", "generated", "pred", "gold"] for g in got
    )
    assert got == [{k: r[k] for k in PREDICTION_KEYS} for r in recs]


def count_bars(png: Path) -> tuple[tuple[int, int], dict[str, int]]:
    """The image size, and per model the bars of its colour along a row just above the x axis."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    dark = (img < 60).all(axis=2).sum(axis=1)
    axis_row = int(np.nonzero(dark > img.shape[1] * 0.4)[0].max())  # the bottom spine
    row = img[axis_row - 2]
    bars = {}
    for name, colour in COLORS.items():
        rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
        hit = (np.abs(row - rgb) <= 3).all(axis=1).astype(int)
        bars[name] = int((np.diff(np.concatenate([[0], hit])) == 1).sum())  # runs of the colour
    return (img.shape[1], img.shape[0]), bars


def test_png_size_and_one_bar_per_model_and_category(tmp_path: Path) -> None:
    s, b, t = three_models(tmp_path)
    write_report(tmp_path / "three", s, b, t)
    size, bars = count_bars(tmp_path / "three" / "accuracy_by_category.png")
    assert size == (800, 400)
    assert bars == {"student": 2, "base": 2, "teacher": 2}
    write_report(tmp_path / "one", s, student_label="base student")
    size, bars = count_bars(tmp_path / "one" / "accuracy_by_category.png")
    assert size == (800, 400)
    assert bars == {"student": 2, "base": 0, "teacher": 0}


@pytest.mark.parametrize("with_others", [False, True])
def test_any_category_text_gives_a_plot_and_one_table_row_each(
    tmp_path: Path, with_others: bool
) -> None:
    recs = [rec(str(i), "1", "1" if i % 2 == 0 else "2", category=c) for i, c in enumerate(ODD)]
    preds = write(tmp_path / "p.jsonl", recs)
    others = (preds, preds) if with_others else (None, None)
    report = write_report(tmp_path / "out", preds, *others)
    png = (tmp_path / "out" / "accuracy_by_category.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert set(report["student"]["per_category"]) == set(ODD)
    rows = [x for x in md_lines(tmp_path / "out") if x.startswith("| ") and "---" not in x]
    assert len(rows) == 1 + len(ODD)  # the header, then one row per category
    cells = {len(r.replace("\\|", "").split("|")) for r in rows}
    assert len(cells) == 1, rows  # no category adds or removes a column
    assert not list((tmp_path / "out").glob("*.tmp*"))


def test_markdown_escapes_only_what_would_break_the_table() -> None:
    report = {"student": score([rec("a", "1", "1", category="a | b\nc")], "s | t")}
    md = render_markdown(report)
    assert "| a \\| b c | 1 | 100.0% [20.7%, 100.0%] (1/1) | 100.0% |" in md
    assert "| category | s \\| t n |" in md


def test_a_missing_input_leaves_the_previous_report_as_it_was(tmp_path: Path) -> None:
    preds = write(tmp_path / "p.jsonl", [rec("a", "1", "1")])
    write_report(tmp_path / "out", preds)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(RecordError, match=r"missing\.jsonl"):
        write_report(tmp_path / "out", write(tmp_path / "q.jsonl", []), tmp_path / "missing.jsonl")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_an_empty_file_gives_a_report_of_nothing(tmp_path: Path) -> None:
    report = write_report(tmp_path, write(tmp_path / "p.jsonl", []))
    o = report["student"]["overall"]
    assert (o["n"], o["accuracy"], o["ci95"], o["format_compliance"]) == (0, None, None, None)
    assert "accuracy **n/a (0/0)**" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_the_module_imports_without_torch_or_matplotlib() -> None:
    code = (
        "import sys, cot.evaluation; "
        "assert not {'torch', 'transformers', 'matplotlib'} & set(sys.modules), sys.modules.keys()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- never raises on model text ----------------------------------------------------------------

TRICKY = [
    "9" * 5000,
    "Final Answer: " + "9" * 5000,
    "\\boxed{",
    "\\boxed{\\frac{1}{0}}",
    "Final Answer: 1/0",
    "#### 1:0:0",
    "Answer: 0.5%",
    "The answer is $-\u22121$",
    "",
    "\x00",
]
texts = st.one_of(st.none(), st.text(max_size=80), st.sampled_from(TRICKY))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "id": st.sampled_from(["a", "b", "c"]),
                "sample": st.integers(0, 3),
                "category": st.one_of(st.none(), st.text(max_size=10)),
                "generated": texts,
                "pred": texts,
                "gold": texts,
                "correct": st.one_of(st.none(), st.booleans()),
            }
        ),
        max_size=12,
    )
)
def test_scoring_never_raises_on_arbitrary_model_text(records: list[dict[str, Any]]) -> None:
    s = Scorer("student")
    for r in records:
        s.add(r)
    result = s.result()
    groups = [result["overall"], *result["per_category"].values()]
    for g in groups:
        assert 0 <= g["correct"] <= g["scored"] <= g["n"]
        assert g["formatted"] <= g["n"]
        if g["accuracy"] is not None:
            lo, hi = g["ci95"]
            assert 0 <= lo <= g["accuracy"] <= hi <= 1
        for key in ("pass@1", "pass@K", "majority"):
            assert g[key] is None or 0 <= g[key] <= 1
    assert result["overall"]["n"] == len(records)
    report = {
        "student": result,
        "agreement": {"student_teacher": agreement(s.answers(), s.answers())},
    }
    render_markdown(report)
