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


def keep_correct(rec: dict[str, Any]) -> bool:
    """``--keep correct``: only traces whose teacher answer matches the gold answer."""
    return rec.get("correct") is True


class Merge(submitit.helpers.Checkpointable):
    """Merge ``RUN_DIR/<stage>/shards`` into ``merged.jsonl`` and copy it to ``outputs``."""

    def __call__(
        self, run_dir: str, stage: str, outputs: list[str], keep: str = "all"
    ) -> dict[str, Any]:
        layout = RunLayout(Path(run_dir)).stage(stage)
        stage_dir = layout.dir
        plan = S.load_plan(stage_dir)
        counts = S.write_merged(
            stage_dir,
            plan,
            [Path(o) for o in outputs],
            keep=keep_correct if keep == "correct" else None,
        )
        counts.update(stage=stage, keep=keep, outputs=outputs, merged=str(layout.merged))
        atomic_write_text(layout.merge_summary, json.dumps(counts, indent=1))
        ignore_late_signals()
        return counts
