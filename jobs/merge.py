"""``Merge``: verify every shard of a stage and write the merged file atomically.

On SLURM it runs as an ``afterok`` job after the array; locally it runs inline. It is a
Checkpointable like every stage, though a merge is short and restarts from scratch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import submitit

from cot.records import atomic_write_text
from hpc import shards as S


def keep_correct(rec: dict[str, Any]) -> bool:
    """``--keep correct``: only traces whose teacher answer matches the gold answer."""
    return rec.get("correct") is True


class Merge(submitit.helpers.Checkpointable):
    """Merge ``RUN_DIR/<stage>/shards`` into ``merged.jsonl`` and copy it to ``outputs``."""

    def __call__(
        self, run_dir: str, stage: str, outputs: list[str], keep: str = "all"
    ) -> dict[str, Any]:
        stage_dir = Path(run_dir) / stage
        plan = S.load_plan(stage_dir)
        counts = S.write_merged(
            stage_dir,
            plan,
            [Path(o) for o in outputs],
            keep=keep_correct if keep == "correct" else None,
        )
        counts.update(
            stage=stage, keep=keep, outputs=outputs, merged=str(stage_dir / "merged.jsonl")
        )
        atomic_write_text(stage_dir / "merge.json", json.dumps(counts, indent=1))
        return counts


def describe(counts: dict[str, Any]) -> str:
    """Human summary of a merge, with kept/total per category."""
    lines = [f"merged {counts['kept']} of {counts['total']} records -> {counts['merged']}"]
    if counts["keep"] != "all":
        for cat, (kept, total) in sorted(counts["per_category"].items()):
            lines.append(f"  {cat:<16} kept {kept:>6} of {total:>6}")
    for o in counts["outputs"]:
        lines.append(f"  copied to {o}")
    return "\n".join(lines)
