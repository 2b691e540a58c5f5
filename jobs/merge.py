"""``Merge``: verify every shard of a stage and write the merged file atomically.

On SLURM it runs as an ``afterany`` job after the array (it checks every completion marker
itself and fails naming the shards that are missing); locally it runs inline. It is a
Checkpointable like every stage, though a merge is short and restarts from scratch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import submitit

from cot.records import atomic_write_text
from hpc import shards as S
from hpc.distributed import ignore_late_signals
from hpc.layout import RunLayout


def keep_correct(group: list[dict[str, Any]]) -> list[bool]:
    """``--keep correct``: only traces whose teacher answer matches the gold answer."""
    return [rec.get("correct") is True for rec in group]


class KeepMajority:
    """``--keep majority``: per question, the traces whose answer is the majority answer of its
    samples (self-consistency). Needs no gold. Answers vote as equal when ``answers_match``
    says so; a tie between the most voted answers goes to the one whose first sample comes
    first, and is counted. A question whose samples gave no answer keeps nothing.
    """

    def __init__(self) -> None:
        self.questions = self.ties = self.no_answer = self.unanimous = 0
        self.samples = self.agreeing = 0

    def __call__(self, group: list[dict[str, Any]]) -> list[bool]:
        from cot.evaluation import majority_vote

        preds = [rec.get("teacher_answer") for rec in group]
        vote = majority_vote((rec["sample"], p) for rec, p in zip(group, preds, strict=True))
        self.questions += 1
        self.samples += len(group)
        if vote.answer is None:
            self.no_answer += 1
            return [False] * len(group)
        voted = set(vote.members)  # exactly the samples that voted for the winner
        keep = [rec["sample"] in voted for rec in group]
        self.ties += vote.tied
        self.agreeing += sum(keep)
        self.unanimous += all(keep)
        return keep

    def summary(self) -> dict[str, Any]:
        """Agreement and ties over the questions voted on, for merge.json."""
        return {
            "questions": self.questions,
            "ties": self.ties,
            "no_answer": self.no_answer,
            "unanimous": self.unanimous,
            # The share of samples that gave their question's majority answer.
            "agreement": self.agreeing / self.samples if self.samples else None,
        }


class Merge(submitit.helpers.Checkpointable):
    """Merge ``RUN_DIR/<stage>/shards`` into ``merged.jsonl`` and copy it to ``outputs``."""

    def __call__(
        self, run_dir: str, stage: str, outputs: list[str], keep: str = "all"
    ) -> dict[str, Any]:
        layout = RunLayout(Path(run_dir)).stage(stage)
        stage_dir = layout.dir
        plan = S.load_plan(stage_dir)
        majority = KeepMajority() if keep == "majority" else None
        counts = S.write_merged(
            stage_dir,
            plan,
            [Path(o) for o in outputs],
            keep=keep_correct if keep == "correct" else majority,
        )
        counts.update(stage=stage, keep=keep, outputs=outputs, merged=str(layout.merged))
        if majority is not None:
            counts["majority"] = majority.summary()
        atomic_write_text(layout.merge_summary, json.dumps(counts, indent=1))
        ignore_late_signals()
        return counts
