"""``Report``: score the merged predictions into RUN_DIR/results (report.md, .json, .png)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import submitit

from hpc.layout import RunLayout


class Report(submitit.helpers.Checkpointable):
    """Write the evaluation report of the models scored in this run folder.

    ``models`` maps ``student`` (and ``base``, ``teacher`` where scored) to the stage folder
    whose merged predictions hold that model's scores. Without ``base`` and with no adapter the
    student *is* the base student, and is labelled so.
    """

    def __call__(
        self, run_dir: str, models: dict[str, str], student_label: str = "student + LoRA"
    ) -> dict[str, Any]:
        from cot.evaluation import write_report

        run = RunLayout(Path(run_dir))

        def merged(role: str) -> Path | None:
            return run.stage(models[role]).merged if role in models else None

        generated = run.stage("generate").merge_summary
        report = write_report(
            run.results,
            run.stage(models["student"]).merged,
            base=merged("base"),
            teacher=merged("teacher"),
            student_label=student_label,
            training_data=json.loads(generated.read_text()) if generated.exists() else None,
        )
        report["report_md"] = str(run.report_md)
        return report
