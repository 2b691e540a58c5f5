"""Stages: one class per stage of a run (validate, plan, submit, is_complete, outputs).

A single command runs a list of one stage (two for ``evaluate``: scores, then the report);
``pipeline`` runs the list of all of them; ``status`` asks the same classes for their rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hpc.config import EvaluateConfig
from hpc.stages.base import Stage
from hpc.stages.merge import MergeStage
from hpc.stages.report import ReportStage, report_text
from hpc.stages.runner import Outcome, run_stages
from hpc.stages.sharded import EvaluateStage, GenerateStage, ShardedStage, describe
from hpc.stages.train import TrainStage

__all__ = [
    "STATUS",
    "EvaluateStage",
    "GenerateStage",
    "MergeStage",
    "Outcome",
    "ReportStage",
    "ShardedStage",
    "Stage",
    "TrainStage",
    "describe",
    "evaluation_stages",
    "report_text",
    "run_stages",
]

# The class that reads each stage folder's status row, by stage name.
STATUS: dict[str, Any] = {
    "generate": ShardedStage,
    "evaluate": ShardedStage,
    "evaluate_base": ShardedStage,
    "evaluate_teacher": ShardedStage,
    "train": TrainStage,
    "report": ReportStage,
}


def evaluation_stages(
    cfg: EvaluateConfig,
    *,
    after: tuple[str, ...] = (),
    teacher: EvaluateConfig | None = None,
) -> list[Stage]:
    """The student's scores, the base student's (``compare_base``, with an adapter only: without
    one there is one model, scored once), the teacher's (``teacher``), then the report.

    Args:
        after: what the student's scores wait for (``("train",)`` in a pipeline). Without it,
            as in the ``evaluate`` command, the report is always rewritten.
        teacher: the config that scores the teacher (the pipeline's, from generate's settings);
            by default :func:`teacher_config` of ``cfg`` when ``cfg.teacher`` is set.
    """
    stages: list[Stage] = [EvaluateStage(cfg, after=after)]
    if cfg.compare_base and cfg.lora_model:
        base = dataclasses.replace(cfg, lora_model=None, output=None)
        stages.append(EvaluateStage(base, name="evaluate_base", after=()))
    if teacher is None and cfg.teacher:
        teacher = teacher_config(cfg)
    if teacher is not None:
        stages.append(EvaluateStage(teacher, name="evaluate_teacher", after=()))
    stages.append(ReportStage(cfg, always=not after))
    return stages


def teacher_config(cfg: EvaluateConfig) -> EvaluateConfig:
    """The evaluate config that scores the teacher on the same test questions: the teacher's
    folder as the model, no adapter, its own prompt template, chat where it has a template."""
    assert cfg.teacher
    return dataclasses.replace(
        cfg,
        base_model=cfg.teacher,
        lora_model=None,
        output=None,
        prompt_format="auto",
        compare_base=False,
    )
