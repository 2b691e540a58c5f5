"""Unit tests of cot/evaluation.py: scoring and the report files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cot.evaluation import render_markdown, score, write_report

# Categories a question file may hold: mathtext ($...$), a Markdown table's pipe, a newline.
ODD = ["$\\frac{$", "a | b", "two\nlines", "$x$ and $", "é ≠ ε"]


def _predictions(path: Path, cats: list[str]) -> Path:
    recs = [
        {"id": str(i), "category": c, "generated": "Final Answer: 1", "correct": i % 2 == 0}
        for i, c in enumerate(cats)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


@pytest.mark.parametrize("with_base", [False, True])
def test_any_category_text_gives_a_plot_and_one_table_row_each(
    tmp_path: Path, with_base: bool
) -> None:
    preds = _predictions(tmp_path / "p.jsonl", ODD)
    base = _predictions(tmp_path / "b.jsonl", ODD) if with_base else None
    report = write_report(tmp_path / "out", preds, base)
    png = (tmp_path / "out" / "accuracy_by_category.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert set(report["student"]["per_category"]) == set(ODD)
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(ODD)  # the header, then one row per category
    cells = {len(r.replace("\\|", "").split("|")) for r in rows}
    assert len(cells) == 1, rows  # no category adds or removes a column
    assert not list((tmp_path / "out").glob("*.tmp*"))


def test_markdown_escapes_only_what_would_break_the_table() -> None:
    scores = score([{"category": "a | b", "generated": "", "correct": True}])
    md = render_markdown(scores, None, "t")
    assert "| a \\| b | 1 | 100.0% |" in md
