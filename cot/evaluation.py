"""Scoring and the report: accuracy overall and per category, format compliance, counts.

Predictions are streamed from the merged JSONL, so scoring a large test set needs no memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cot.records import atomic_open, atomic_write_text, iter_jsonl

# An explicit answer marker; the last-number fallback of extract_final_answer does not count as
# following the format.
_MARKER = re.compile(r"final answer|the answer is|####|\\boxed\{|(?:^|\n)\s*\**answer\**\s*:", re.I)


def follows_format(text: str) -> bool:
    """True when the output states its answer with an explicit marker and the answer parses."""
    from cot.answers import extract_final_answer

    return bool(_MARKER.search(text or "")) and extract_final_answer(text) is not None


def score(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy and format compliance, overall and per category."""
    cats: dict[str, dict[str, int]] = {}
    total = {"n": 0, "correct": 0, "formatted": 0}
    for rec in records:
        c = cats.setdefault(
            str(rec.get("category") or "all"), {"n": 0, "correct": 0, "formatted": 0}
        )
        fmt = follows_format(rec.get("generated", ""))
        for d in (c, total):
            d["n"] += 1
            d["correct"] += bool(rec.get("correct"))
            d["formatted"] += fmt

    def rates(d: dict[str, int]) -> dict[str, Any]:
        n = max(1, d["n"])
        return {**d, "accuracy": d["correct"] / n, "format_compliance": d["formatted"] / n}

    return {"overall": rates(total), "per_category": {k: rates(v) for k, v in sorted(cats.items())}}


def score_file(path: str | Path) -> dict[str, Any]:
    """Score a merged predictions file."""
    return score(rec for _, rec in iter_jsonl(path))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _cell(text: str) -> str:
    """A category as one Markdown table cell: a pipe or a line break would split the row."""
    return " ".join(text.replace("|", "\\|").split())


def render_markdown(scores: dict[str, Any], base: dict[str, Any] | None, title: str) -> str:
    """The report as Markdown: overall line, per-category table, and the base comparison."""
    o = scores["overall"]
    lines = [
        f"# {title}",
        "",
        f"- accuracy: **{_pct(o['accuracy'])}** ({o['correct']}/{o['n']})",
        f"- format compliance (explicit final answer): **{_pct(o['format_compliance'])}** "
        f"({o['formatted']}/{o['n']})",
    ]
    if base:
        b = base["overall"]
        lines += [
            f"- base student: accuracy {_pct(b['accuracy'])}, "
            f"format compliance {_pct(b['format_compliance'])}",
            f"- difference: accuracy {100 * (o['accuracy'] - b['accuracy']):+.1f} points, "
            f"format {100 * (o['format_compliance'] - b['format_compliance']):+.1f} points",
        ]
    lines += ["", "| category | n | accuracy | format |" + (" base acc | Δ acc |" if base else "")]
    lines.append("|---|---:|---:|---:|" + ("---:|---:|" if base else ""))
    for cat, r in scores["per_category"].items():
        row = (
            f"| {_cell(cat)} | {r['n']} | {_pct(r['accuracy'])} | {_pct(r['format_compliance'])} |"
        )
        if base:
            br = base["per_category"].get(cat, {"accuracy": 0.0})
            row += f" {_pct(br['accuracy'])} | {100 * (r['accuracy'] - br['accuracy']):+.1f} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def plot(scores: dict[str, Any], base: dict[str, Any] | None, path: Path) -> None:
    """accuracy_by_category.png (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(scores["per_category"])
    xs = range(len(cats))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.4 if base else 0.8
    ax.bar(
        [x - (width / 2 if base else 0) for x in xs],
        [scores["per_category"][c]["accuracy"] for c in cats],
        width,
        label="student + LoRA",
    )
    if base:
        ax.bar(
            [x + width / 2 for x in xs],
            [base["per_category"].get(c, {"accuracy": 0})["accuracy"] for c in cats],
            width,
            label="base student",
        )
        ax.legend()
    # Categories are user text: "$\frac{$" is not mathtext to render (it would raise).
    ax.set_xticks(list(xs), [" ".join(c.split()) for c in cats], rotation=20, parse_math=False)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy by category")
    fig.tight_layout()
    try:
        with atomic_open(path, "wb") as fh:
            fig.savefig(fh, dpi=100, format="png")
    finally:
        plt.close(fig)


def write_report(
    out_dir: str | Path,
    predictions: str | Path,
    base_predictions: str | Path | None = None,
    title: str = "cot-hpc evaluation report",
) -> dict[str, Any]:
    """Write report.json, report.md and accuracy_by_category.png; returns the report dict."""
    out = Path(out_dir)
    scores = score_file(predictions)
    base = score_file(base_predictions) if base_predictions else None
    report = {"predictions": str(predictions), "student": scores}
    if base:
        report["base_predictions"] = str(base_predictions)
        report["base"] = base
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    atomic_write_text(out / "report.md", render_markdown(scores, base, title))
    plot(scores, base, out / "accuracy_by_category.png")
    return report
