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
        from cot.records import atomic_write_text

        run = RunLayout(Path(run_dir))
        # The student's scores must be there (a missing file fails the report, naming it); a
        # comparison that failed leaves its row out and says so, never the student's report.
        missing = {
            role: run.stage(stage).merged
            for role, stage in models.items()
            if role != "student" and not run.stage(stage).merged.exists()
        }

        def merged(role: str) -> Path | None:
            if role not in models or role in missing:
                return None
            return run.stage(models[role]).merged

        generated = run.stage("generate").merge_summary
        report = write_report(
            run.results,
            run.stage(models["student"]).merged,
            base=merged("base"),
            teacher=merged("teacher"),
            student_label=student_label,
            training_data=json.loads(generated.read_text()) if generated.exists() else None,
        )
        if missing:
            report["not_scored"] = {role: str(path) for role, path in missing.items()}
            atomic_write_text(run.report_json, json.dumps(report, indent=1))
            notes = "".join(
                f"- {role}: not scored ({path} does not exist: its stage did not finish)\n"
                for role, path in missing.items()
            )
            atomic_write_text(run.report_md, run.report_md.read_text(encoding="utf-8") + notes)
        report["report_md"] = str(run.report_md)
        return report
