"""The evaluation report: accuracy with confidence intervals, pass@k, majority vote, agreement.

Prediction files are JSONL, one record per completion, streamed with ``cot.records.iter_jsonl``::

    {"id": str, "sample": int, "category": str | None, "question": str,
     "generated": str | None, "pred": str | None, "gold": str | None, "correct": bool | None,
     "gold_reduced": bool (optional), "error": str (optional)}

With K samples per question a file holds K records per ``id`` (``sample`` 0..K-1); K is read
from the records (the most records any one id has). How each record counts:

* ``gold`` None: *unscored*. Counted apart, never as wrong, and left out of every accuracy.
* ``gold`` set: *scored*. It is correct when ``correct`` is True (where ``correct`` is not a
  bool, ``answers_match(pred, gold)`` decides). ``generated`` None with ``error`` set is a
  completion the engine could not produce: scored and wrong, and counted in ``errors``.
* ``formatted``: ``follows_format(generated)``, an explicit answer marker whose answer parses.
* A teacher's generation records (``cot``, ``teacher_answer``) are read as ``generated``,
  ``pred`` when those keys are absent, so the teacher's own traces can be scored too.

A question's answer is the majority vote over its samples (:func:`majority_vote`; with K == 1,
simply its one prediction). It is what majority-vote accuracy and the agreement between two
models compare. Nothing here raises on model text: arbitrary ``generated`` and ``pred`` strings
score (as wrong where they do not parse).

report.json (``SCHEMA`` 2)
--------------------------
Top level:

* ``schema`` (int): 2.
* ``title`` (str): the report's title.
* ``student_label`` (str): how the student is named ("student + LoRA", or "base student" for a
  run without an adapter, where it is the only model).
* ``inputs`` (dict[str, str]): the prediction file of each model given: ``student``, and
  ``base``, ``teacher`` when given.
* ``interval`` (dict): ``{"method": "wilson", "level": 0.95, "z": 1.959963984540054}``.
* ``student`` (Model): always; ``base`` (Model): only with a base file; ``teacher`` (Model):
  only with a teacher file.
* ``agreement`` (dict, only with a teacher file): ``student_teacher`` (Agreement), and
  ``base_teacher`` (Agreement) when a base file is given as well.
* ``training_data`` (dict, only when passed to :func:`write_report`): the generation merge
  summary (``total``, ``kept``, ...), copied as it is.

Model:

* ``label`` (str): the model's name in the report.
* ``samples_per_question`` (int): K.
* ``overall`` (Group), ``per_category`` (dict[str, Group]): categories sorted; a record
  without a category counts under ``"all"``, and all of a question's records count under the
  category of its first record.

Group (one model, overall or one category):

* ``n`` (int): records. ``scored`` (int): records with gold. ``unscored`` (int): without.
* ``correct`` (int): scored records that are correct. ``errors`` (int): records with ``error``.
* ``formatted`` (int): records that follow the answer format.
* ``accuracy`` (float | None): correct / scored; None when nothing is scored.
* ``ci95`` ([float, float] | None): the 95% Wilson score interval of ``accuracy``.
* ``format_compliance`` (float | None): formatted / n; None when n is 0.
* ``gold_reduced`` (int): records whose gold was a worked solution reduced to its final answer
  (``gold_reduced`` true); ``gold_reduced_questions`` (int): questions with such a record.
* ``questions`` (int): distinct ids. ``scored_questions`` (int): ids with a scored record.
* ``pass@1``, ``pass@K`` (float | None): the unbiased pass@k estimator (:func:`pass_at_k`) with
  k = 1 and k = K, averaged over the scored questions. None when K == 1 or nothing is scored.
* ``majority`` (float | None): majority-vote accuracy over the scored questions;
  ``majority_correct`` (int | None): its numerator; ``majority_ties`` (int | None): questions
  whose vote was tied (broken by the lowest sample index). All None when K == 1.

Agreement (the share of questions where two models give the same answer, right or wrong):

* ``overall`` (Rate), ``per_category`` (dict[str, Rate]), categories from the first model.

Rate: ``n`` (int): questions present in both files; ``count`` (int): those where both have an
answer and ``answers_match(first, second)``; ``rate`` (float | None): count / n;
``ci95`` ([float, float] | None): its Wilson interval.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from cot.answers import answers_match, extract_final_answer
from cot.records import atomic_open, atomic_write_text, dumps, iter_jsonl

SCHEMA = 2
Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal
NO_CATEGORY = "all"
BASE_LABEL = "base student"
TEACHER_LABEL = "teacher"
# The seed's predictions.jsonl: exactly these keys, in this order.
PREDICTION_KEYS = ("question", "generated", "pred", "gold")
# One fixed colour per model, so a bar in the plot says whose it is (and tests can count them).
COLORS = {"student": "#1f77b4", "base": "#ff7f0e", "teacher": "#2ca02c"}
MODELS = ("student", "base", "teacher")

# An explicit answer marker; the last-number fallback of extract_final_answer does not count as
# following the format.
_MARKER = re.compile(r"final answer|the answer is|####|\\boxed\{|(?:^|\n)\s*\**answer\**\s*:", re.I)


def follows_format(text: str | None) -> bool:
    """True when the output states its answer with an explicit marker and the answer parses."""
    if not isinstance(text, str):
        return False
    return bool(_MARKER.search(text)) and extract_final_answer(text) is not None


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion ``successes / n``.

    Args:
        successes: Count of successes, 0..n.
        n: Trials.
        z: The normal quantile (1.96 for 95%).

    Returns:
        ``(lo, hi)`` within [0, 1], exactly 0 at 0 successes and exactly 1 at n; None for n = 0.
    """
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside 0..{n}")
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    lo = max(0.0, center - half) if successes > 0 else 0.0
    hi = min(1.0, center + half) if successes < n else 1.0
    return lo, hi


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one question: ``1 - C(n-c, k) / C(n, k)``.

    Exact integer binomials divided once, so the result is the correctly rounded float however
    large n is. A question with fewer than k samples passes when any of them is correct.

    Args:
        n: Samples of the question.
        c: Correct samples among them.
        k: The k of pass@k (>= 1).
    """
    if k < 1 or not 0 <= c <= n:
        raise ValueError(f"pass@k needs k >= 1 and 0 <= c <= n, got n={n} c={c} k={k}")
    if c == 0:
        return 0.0
    if n - c < k:  # every draw of k holds a correct sample (also when n < k)
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


class Vote(NamedTuple):
    """The outcome of a majority vote over one question's samples."""

    answer: str | None  # the winning answer as its earliest sample wrote it; None: no votes
    sample: int | None  # that sample's index
    votes: int  # samples that voted for it
    tied: bool  # another answer had as many votes (the lowest sample index broke the tie)
    members: tuple[int, ...] = ()  # the sample indices that voted for it, ascending


def majority_vote(votes: Iterable[tuple[int, str | None]]) -> Vote:
    """The most frequent answer among ``(sample index, answer)`` pairs.

    Answers are grouped as equal by ``answers_match`` against the earliest answer of each group;
    None never votes. A tie between the top groups goes to the one whose earliest sample index
    is lowest.
    """
    groups: list[list[Any]] = []  # [answer, first sample, count, samples], first-sample order
    for sample, answer in sorted(((s, a) for s, a in votes if a is not None), key=lambda v: v[0]):
        for group in groups:
            if answers_match(answer, group[0]):
                group[2] += 1
                group[3].append(sample)
                break
        else:
            groups.append([answer, sample, 1, [sample]])
    if not groups:
        return Vote(None, None, 0, False)
    top = max(g[2] for g in groups)
    tied = [g for g in groups if g[2] == top]
    win = min(tied, key=lambda g: g[1])
    return Vote(win[0], win[1], top, len(tied) > 1, tuple(win[3]))


def _text(value: Any) -> str | None:
    """A record's text field as a string; a number becomes its text, anything else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


@dataclass
class _Sample:
    sample: int
    pred: str | None
    scored: bool
    correct: bool


@dataclass
class _Question:
    category: str
    samples: list[_Sample] = field(default_factory=list)
    reduced: bool = False
    _vote: tuple[Vote, _Sample | None] | None = None  # cached; reset by every added sample

    def vote(self) -> tuple[Vote, _Sample | None]:
        """The majority vote, and the sample that first gave the winning answer."""
        if self._vote is None:
            vote = majority_vote((s.sample, s.pred) for s in self.samples)
            first = sorted(self.samples, key=lambda s: s.sample)
            win = next(
                (s for s in first if s.sample == vote.sample and s.pred == vote.answer), None
            )
            self._vote = vote, win
        return self._vote


@dataclass
class _Counts:
    n: int = 0
    scored: int = 0
    correct: int = 0
    errors: int = 0
    formatted: int = 0
    gold_reduced: int = 0


class Scorer:
    """Scores one model's records as they stream by; :meth:`result` gives its report section.

    It keeps per question only the sample indices, predicted answers and correctness (never the
    generated text), which majority votes and agreement need.
    """

    def __init__(self, label: str = "model") -> None:
        self.label = label
        self._questions: dict[str, _Question] = {}
        self._counts: dict[str, _Counts] = {}
        self._total = _Counts()
        self._records = 0

    def add(self, rec: Mapping[str, Any]) -> None:
        """Count one prediction record."""
        self._records += 1
        qid = _text(rec.get("id"))
        if qid is None:
            qid = f"#{self._records}"  # no id: the record is a question of its own
        sample = rec.get("sample", 0)
        if not isinstance(sample, int) or isinstance(sample, bool):
            sample = 0
        category = _text(rec.get("category")) or NO_CATEGORY
        generated = _text(rec["generated"] if "generated" in rec else rec.get("cot"))
        if "pred" in rec:
            pred = _text(rec["pred"])
        elif "teacher_answer" in rec:
            pred = _text(rec["teacher_answer"])
        else:
            pred = extract_final_answer(generated) if generated is not None else None
        gold = _text(rec.get("gold"))
        error = rec.get("error") is not None
        scored = gold is not None
        if gold is None or (error and generated is None):
            correct = False
        elif isinstance(rec.get("correct"), bool):
            correct = rec["correct"]
        else:
            correct = answers_match(pred, gold)
        reduced = rec.get("gold_reduced") is True
        formatted = follows_format(generated)
        # A question's samples count under one category: the first its records name.
        q = self._questions.setdefault(qid, _Question(category))
        for c in (self._total, self._counts.setdefault(q.category, _Counts())):
            c.n += 1
            c.scored += scored
            c.correct += correct
            c.errors += error
            c.formatted += formatted
            c.gold_reduced += reduced
        q.samples.append(_Sample(sample, pred, scored, correct))
        q._vote = None
        q.reduced |= reduced

    @property
    def samples_per_question(self) -> int:
        """K: the most records any one question has (1 for an empty file)."""
        return max((len(q.samples) for q in self._questions.values()), default=1)

    def answers(self) -> dict[str, tuple[str, str | None]]:
        """Each question's ``(category, answer)``: its majority vote (K == 1: its prediction)."""
        return {qid: (q.category, q.vote()[0].answer) for qid, q in self._questions.items()}

    def result(self) -> dict[str, Any]:
        """This model's section of report.json (see the module docstring: Model)."""
        k = self.samples_per_question
        by_cat: dict[str, list[_Question]] = {}
        for q in self._questions.values():
            by_cat.setdefault(q.category, []).append(q)
        return {
            "label": self.label,
            "samples_per_question": k,
            "overall": _group(self._total, list(self._questions.values()), k),
            "per_category": {
                cat: _group(self._counts[cat], by_cat[cat], k) for cat in sorted(self._counts)
            },
        }


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _interval(num: int, den: int) -> list[float] | None:
    ci = wilson_interval(num, den)
    return None if ci is None else list(ci)


def _group(c: _Counts, questions: list[_Question], k: int) -> dict[str, Any]:
    scored_qs = [q for q in questions if any(s.scored for s in q.samples)]
    out: dict[str, Any] = {
        "n": c.n,
        "scored": c.scored,
        "unscored": c.n - c.scored,
        "correct": c.correct,
        "errors": c.errors,
        "formatted": c.formatted,
        "accuracy": _ratio(c.correct, c.scored),
        "ci95": _interval(c.correct, c.scored),
        "format_compliance": _ratio(c.formatted, c.n),
        "gold_reduced": c.gold_reduced,
        "gold_reduced_questions": sum(q.reduced for q in questions),
        "questions": len(questions),
        "scored_questions": len(scored_qs),
        "pass@1": None,
        "pass@K": None,
        "majority": None,
        "majority_correct": None,
        "majority_ties": None,
    }
    if k > 1:
        p1 = pk = 0.0
        majority = 0
        for q in scored_qs:
            scored = [s for s in q.samples if s.scored]
            n, right = len(scored), sum(s.correct for s in scored)
            p1 += pass_at_k(n, right, 1)
            pk += pass_at_k(n, right, k)
            # The winning answer is right when the sample that first gave it is.
            win = q.vote()[1]
            majority += win is not None and win.scored and win.correct
        out.update(
            {
                "pass@1": p1 / len(scored_qs) if scored_qs else None,
                "pass@K": pk / len(scored_qs) if scored_qs else None,
                "majority": _ratio(majority, len(scored_qs)),
                "majority_correct": majority,
                "majority_ties": sum(q.vote()[0].tied for q in questions),
            }
        )
    return out


def score(records: Iterable[Mapping[str, Any]], label: str = "model") -> dict[str, Any]:
    """Score records into one model's report section (see the module docstring: Model)."""
    scorer = Scorer(label)
    for rec in records:
        scorer.add(rec)
    return scorer.result()


def score_file(path: str | Path, label: str = "model") -> dict[str, Any]:
    """Score a prediction file, streamed (RecordError names a missing file or a bad line)."""
    return _read(path, label).result()


def _read(path: str | Path, label: str) -> Scorer:
    scorer = Scorer(label)
    for _, rec in iter_jsonl(path):
        scorer.add(rec)
    return scorer


def _rate(count: int, n: int) -> dict[str, Any]:
    return {"n": n, "count": count, "rate": _ratio(count, n), "ci95": _interval(count, n)}


def agreement(
    first: Mapping[str, tuple[str, str | None]], second: Mapping[str, tuple[str, str | None]]
) -> dict[str, Any]:
    """How often two models give the same answer to the same question, right or wrong.

    Args:
        first: ``Scorer.answers()`` of one model; its categories are used.
        second: ``Scorer.answers()`` of the other.

    Returns:
        ``{"overall": Rate, "per_category": {category: Rate}}`` over the questions in both.
    """
    total = [0, 0]
    cats: dict[str, list[int]] = {}
    for qid, (cat, a) in first.items():
        if qid not in second:
            continue
        b = second[qid][1]
        same = a is not None and b is not None and answers_match(a, b)
        for t in (total, cats.setdefault(cat, [0, 0])):
            t[0] += same
            t[1] += 1
    return {
        "overall": _rate(*total),
        "per_category": {cat: _rate(*cats[cat]) for cat in sorted(cats)},
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def vote_text(vote: Mapping[str, Any]) -> str:
    """A ``--keep majority`` merge's votes (``merge.json``'s ``majority``) in one sentence."""
    return (
        f"majority vote over {vote['questions']} questions: {_pct(vote['agreement'])} of "
        f"samples agree with their majority, {vote['unanimous']} unanimous, {vote['ties']} "
        f"ties, {vote['no_answer']} without any answer"
    )


def _ci(ci: list[float] | None) -> str:
    return "" if ci is None else f" [{_pct(ci[0])}, {_pct(ci[1])}]"


def _points(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{100 * (a - b):+.1f}"


def _cell(text: str) -> str:
    """User text as one Markdown table cell: a pipe or a line break would split the row."""
    return " ".join(text.replace("|", "\\|").split())


def accuracy_text(g: Mapping[str, Any]) -> str:
    """A group's accuracy as ``3.2% [1.1%, 8.9%] (3/95)``: rate, 95% interval, counts."""
    if g["accuracy"] is None:
        return f"n/a (0/{g['scored']})"
    return f"{_pct(g['accuracy'])}{_ci(g['ci95'])} ({g['correct']}/{g['scored']})"


def _rate_text(r: Mapping[str, Any]) -> str:
    if r["rate"] is None:
        return "n/a (no question in both)"
    return f"{_pct(r['rate'])}{_ci(r['ci95'])} ({r['count']}/{r['n']} questions)"


def _models(report: Mapping[str, Any]) -> list[str]:
    return [m for m in MODELS if m in report]


def _headline(m: Mapping[str, Any]) -> list[str]:
    o = m["overall"]
    line = (
        f"- **{m['label']}**: accuracy **{accuracy_text(o)}**, format compliance "
        f"{_pct(o['format_compliance'])} ({o['formatted']}/{o['n']})"
    )
    if o["unscored"]:
        line += f", unscored (no gold) {o['unscored']}"
    if o["errors"]:
        line += f", engine errors {o['errors']}"
    lines = [line]
    k = m["samples_per_question"]
    if k > 1:
        lines.append(
            f"  - {k} samples per question, {o['scored_questions']} scored questions: "
            f"pass@1 {_pct(o['pass@1'])}, pass@{k} {_pct(o['pass@K'])}, majority vote "
            f"{_pct(o['majority'])} ({o['majority_correct']}/{o['scored_questions']}), "
            f"tied votes {o['majority_ties']} (broken by the lowest sample index)"
        )
    return lines


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md: a headline per model, agreement, reduced golds, then the per-category table."""
    models = _models(report)
    s = report["student"]
    lines = [f"# {report.get('title', 'cot-hpc evaluation report')}", ""]
    for name in models:
        lines += _headline(report[name])
    if "base" in report:
        so, bo = s["overall"], report["base"]["overall"]
        lines.append(
            f"- difference vs {report['base']['label']}: accuracy "
            f"{_points(so['accuracy'], bo['accuracy'])} points, format compliance "
            f"{_points(so['format_compliance'], bo['format_compliance'])} points"
        )
    ag = report.get("agreement", {})
    if "student_teacher" in ag:
        lines.append(
            f"- **student–teacher agreement** (same answer, right or wrong): "
            f"{_rate_text(ag['student_teacher']['overall'])}"
        )
    if "base_teacher" in ag:
        lines.append(f"- base–teacher agreement: {_rate_text(ag['base_teacher']['overall'])}")
    so = s["overall"]
    lines.append(
        f"- gold answers reduced from a worked solution to their final answer: "
        f"{so['gold_reduced_questions']} of {so['questions']} questions "
        f"({so['gold_reduced']} of {so['n']} records)"
    )
    td = report.get("training_data")
    if isinstance(td, Mapping) and "kept" in td and "total" in td:
        lines.append(
            f"- training data: {td['kept']} of {td['total']} teacher traces kept "
            f"(--keep {td.get('keep', 'all')})"
        )
        per_cat = td.get("per_category")
        if isinstance(per_cat, Mapping) and per_cat:
            kept = ", ".join(
                f"{_cell(str(c))} {k}/{t}"
                for c, (k, t) in sorted(per_cat.items())  # [kept, total] per category
            )
            lines.append(f"  - kept per category: {kept}")
        vote = td.get("majority")
        if isinstance(vote, Mapping) and vote.get("agreement") is not None:
            lines.append(f"  - {vote_text(vote)}")
    lines += ["", *_table(report, models)]
    return "\n".join(lines) + "\n"


def _table(report: Mapping[str, Any], models: list[str]) -> list[str]:
    cats = sorted({c for m in models for c in report[m]["per_category"]})
    head = ["category"]
    align = ["---"]
    for name in models:
        label = _cell(report[name]["label"])
        cols = ["n", "accuracy [95% CI]", "format"]
        if report[name]["samples_per_question"] > 1:
            cols.append("majority")
        head += [f"{label} {c}" for c in cols]
        align += ["---:"] * len(cols)
    base, ag = "base" in report, report.get("agreement", {}).get("student_teacher")
    if base:
        head.append("Δ acc (points)")
        align.append("---:")
    if ag:
        head.append("student–teacher agreement")
        align.append("---:")
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for cat in cats:
        cells = [_cell(cat)]
        for name in models:
            g = report[name]["per_category"].get(cat)
            k = report[name]["samples_per_question"]
            if g is None:
                cells += ["–"] * (4 if k > 1 else 3)
                continue
            cells += [str(g["n"]), accuracy_text(g), _pct(g["format_compliance"])]
            if k > 1:
                cells.append(_pct(g["majority"]))
        if base:
            sg = report["student"]["per_category"].get(cat, {})
            bg = report["base"]["per_category"].get(cat, {})
            cells.append(_points(sg.get("accuracy"), bg.get("accuracy")))
        if ag:
            r = ag["per_category"].get(cat)
            cells.append("–" if r is None else f"{_pct(r['rate'])} ({r['count']}/{r['n']})")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def plot(report: Mapping[str, Any], path: str | Path) -> None:
    """accuracy_by_category.png: a bar group per category, a bar per model (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = _models(report)
    cats = sorted({c for m in models for c in report[m]["per_category"]})
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(8, 4))
    try:
        for i, name in enumerate(models):
            per = report[name]["per_category"]
            groups = [per.get(c) or {} for c in cats]
            heights = [g.get("accuracy") or 0.0 for g in groups]
            # Whiskers: the 95% Wilson interval (none where nothing is scored).
            cis = [g.get("ci95") or [h, h] for h, g in zip(heights, groups, strict=True)]
            lo = [h - ci[0] for h, ci in zip(heights, cis, strict=True)]
            hi = [ci[1] - h for h, ci in zip(heights, cis, strict=True)]
            xs = [x - 0.4 + width * (i + 0.5) for x in range(len(cats))]
            ax.bar(xs, heights, width, label=report[name]["label"], color=COLORS[name])
            if cats:
                ax.errorbar(xs, heights, yerr=[lo, hi], fmt="none", ecolor="black", capsize=3)
        # Categories are user text: "$\frac{$" is not mathtext to render (it would raise).
        labels = [" ".join(c.split()) for c in cats]
        ax.set_xticks(list(range(len(cats))), labels, rotation=20, parse_math=False)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (95% Wilson interval)")
        ax.set_title("Accuracy by category")
        # Beside the axes, so that no bar hides under it.
        legend = ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        for text in legend.get_texts():
            text.set_parse_math(False)
        fig.tight_layout()
        with atomic_open(path, "wb") as fh:
            fig.savefig(fh, dpi=100, format="png")
    finally:
        plt.close(fig)


def write_report(
    out_dir: str | Path,
    student: str | Path,
    base: str | Path | None = None,
    teacher: str | Path | None = None,
    *,
    title: str = "cot-hpc evaluation report",
    student_label: str = "student + LoRA",
    training_data: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Score the prediction files and write the report into ``out_dir``, each file atomically.

    Writes report.md, report.json (schema in the module docstring), accuracy_by_category.png,
    and predictions.jsonl (the student's records with exactly the keys ``question``,
    ``generated``, ``pred``, ``gold``, one line per record in file order).

    Args:
        out_dir: The results folder.
        student: The student's predictions (the only model of a run without an adapter; then
            pass ``student_label="base student"``).
        base: The base student's predictions (without the adapter), for the comparison.
        teacher: The teacher's predictions on the same test questions, for the agreement.
        title: The report's first heading.
        student_label: The student's name in the report.
        training_data: The generation merge summary, copied into report.json.

    Returns:
        The report dict written to report.json.

    Raises:
        RecordError: a prediction file is missing or has a malformed line.
    """
    out = Path(out_dir)
    inputs = {"student": student, "base": base, "teacher": teacher}
    labels = {"base": BASE_LABEL, "teacher": TEACHER_LABEL}
    # The others first: predictions.jsonl is committed only once every input has been read.
    scorers = {
        name: _read(p, labels[name])
        for name, p in inputs.items()
        if name != "student" and p is not None
    }
    s = Scorer(student_label)
    with atomic_open(out / "predictions.jsonl") as fh:
        for _, rec in iter_jsonl(student):
            s.add(rec)
            fh.write(dumps({k: rec.get(k) for k in PREDICTION_KEYS}) + "\n")
    scorers["student"] = s
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "title": title,
        "student_label": student_label,
        "inputs": {name: str(p) for name, p in inputs.items() if p is not None},
        "interval": {"method": "wilson", "level": 0.95, "z": Z95},
    }
    for name in MODELS:
        if name in scorers:
            report[name] = scorers[name].result()
    if "teacher" in scorers:
        t = scorers["teacher"].answers()
        report["agreement"] = {"student_teacher": agreement(s.answers(), t)}
        if "base" in scorers:
            report["agreement"]["base_teacher"] = agreement(scorers["base"].answers(), t)
    if training_data is not None:
        report["training_data"] = dict(training_data)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, allow_nan=False))
    atomic_write_text(out / "report.md", render_markdown(report))
    plot(report, out / "accuracy_by_category.png")
    return report
