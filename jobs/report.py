"""``Report``: score the merged predictions into RUN_DIR/results (report.md, .json, .png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import submitit

from hpc.layout import RunLayout


class Report(submitit.helpers.Checkpointable):
    """Write the evaluation report; with ``compare_base`` also score the base student."""

    def __call__(self, run_dir: str, compare_base: bool = False) -> dict[str, Any]:
        from cot.evaluation import write_report

        run = RunLayout(Path(run_dir))
        base = run.stage("evaluate_base").merged if compare_base else None
        report = write_report(run.results, run.stage("evaluate").merged, base)
        report["report_md"] = str(run.report_md)
        return report
