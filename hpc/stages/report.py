"""The ``report`` stage: score the merged predictions into ``RUN_DIR/results``.

A short step: a dependent job on a cluster, in the launcher where the backend allows it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpc import runs
from hpc.backends import Backend, Call, DoneHandle, Handle, failure_text
from hpc.config import EvaluateConfig
from hpc.errors import StageFailed
from hpc.layout import RunLayout
from hpc.stages.base import Stage

log = logging.getLogger(__name__)


class ReportStage(Stage):
    """Write report.md, report.json and the accuracy plot from the evaluate merges.

    Args:
        always: write it even when it exists and nothing upstream changed (``evaluate``).
    """

    name = "report"
    after = ("evaluate", "evaluate_base", "evaluate_teacher")

    def __init__(self, cfg: EvaluateConfig, *, always: bool = False):
        super().__init__(RunLayout(Path(cfg.run_dir)))
        self.cfg, self.always = cfg, always

    def outputs(self) -> list[Path]:
        return [self.layout.report_md, self.layout.report_json]

    def is_complete(self) -> bool:
        return self.layout.report_json.exists()

    def submit(self, backend: Backend, after: Sequence[Handle]) -> Handle:
        from jobs.report import Report

        upstream = any(h.dependency or h.new for h in after)
        if not self.always and not upstream and self.is_complete():
            log.info("report: already written")
            done = json.loads(self.layout.report_json.read_text())
            return DoneHandle([{**done, "report_md": str(self.layout.report_md)}], ["report"])
        jid = runs.latest_jobs(self.layout.root, self.name).get("job")
        if jid and not any(h.new for h in after) and jid in backend.live([jid]):
            log.info(f"report: job {jid} is already queued or running; not resubmitted")
            return backend.attach([jid], ["report"])
        label = "student + LoRA" if self.cfg.lora_model else "base student"
        call = Call(Report(), (str(self.layout.root), report_models(self.cfg), label), "report")

        def recorded(_: list[int], ids: list[str]) -> None:
            runs.Submission(self.layout.root, self.name, backend.kind, job=ids[0])

        handle = backend.submit(
            [call],
            cfg=self.cfg,
            name=self.job_name,
            after=after,
            inline=True,
            on_submit=recorded,
            after_any=True,  # the report reads the merged predictions and names a missing file
        )
        if handle.job_ids:
            deps = [d for h in after for d in h.dependency]
            log.info(f"report: job {handle.job_ids[0]} (after {', '.join(deps) or 'nothing'})")
        return handle

    def wait(self, backend: Backend, handle: Handle) -> Any:
        handle.wait()
        failed = handle.failures()
        if failed:
            raise StageFailed(failure_text(self.name, failed))
        # A report job's output, whether this launch or an earlier one submitted the job.
        if handle.job_ids and self.is_complete():
            report: dict[str, Any] = json.loads(self.layout.report_json.read_text())
            return {**report, "report_md": str(self.layout.report_md)}
        return super().wait(backend, handle)

    @classmethod
    def done_marker(cls, layout: RunLayout) -> Path | None:
        return layout.report_json


def report_models(cfg: EvaluateConfig) -> dict[str, str]:
    """The report's models and the stage folder that scored each: the student (with its adapter,
    or the base student alone), the base student, the teacher."""
    models = {"student": "evaluate"}
    if cfg.lora_model and cfg.compare_base:
        models["base"] = "evaluate_base"
    if cfg.teacher:
        models["teacher"] = "evaluate_teacher"
    return models


def report_text(report: dict[str, Any], *, full: bool = False) -> str:
    """Where the report is, then its headline (or, with ``full``, the whole markdown)."""
    head = f"report: {report['report_md']}"
    if full:
        return head + "\n" + Path(report["report_md"]).read_text()
    from cot.evaluation import accuracy_text

    o = report["student"]["overall"]
    fmt = o.get("format_compliance")
    return (
        f"{head}\naccuracy {accuracy_text(o)}  format compliance "
        f"{'n/a' if fmt is None else f'{fmt:.1%}'}  n={o['n']}"
    )
