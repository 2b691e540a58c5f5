"""Stage promises that the earlier wiring tests left unpinned (mutation survivors), in-process
against the recording fake backend and the helpers of tests/hpc/test_stage_wiring.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hpc import runs
from hpc.stages import EvaluateStage
from tests.hpc.test_stage_wiring import _ev, _input, _model, _report


def test_a_report_job_uses_the_evaluate_configs_cluster_settings(tmp_path: Path) -> None:
    """The report job is submitted with the command's config (its partition, time limit...)."""
    stage, backend = _report(tmp_path, partition="short", time_min=7)
    stage.submit(backend, [])
    [(_, spec)] = backend.submitted
    assert spec.cfg is stage.cfg
    assert (spec.cfg.partition, spec.cfg.time_min) == ("short", 7)


def test_a_report_job_is_recorded_with_the_backend_that_runs_it(tmp_path: Path) -> None:
    """launch.json names the backend of the report job (status asks that backend its state)."""
    stage, backend = _report(tmp_path)
    stage.submit(backend, [])
    [entry] = runs.read_launch(stage.layout.root)["stages"]["report"]["submissions"]
    assert (entry["kind"], entry["job"]) == ("fake", "100")
    assert runs.latest_jobs(stage.layout.root, "report")["kind"] == "fake"


def test_an_evaluation_plans_and_pins_its_samples_per_question(tmp_path: Path) -> None:
    """--samples-per-question K: the evaluation plans K samples of every question (the status
    total) and pins K, so a relaunch with another K is refused."""
    cfg = _ev(
        tmp_path,
        input=str(_input(tmp_path)),
        base_model=str(_model(tmp_path / "student")),
        samples_per_question=3,
        temperature=0.7,
    )
    stage = EvaluateStage(cfg, after=())
    stage.validate(set())
    runs.make_run_dir(stage.layout.root)
    stage.plan()
    plan = stage.planned
    assert (plan.samples, plan.num_records * plan.samples) == (3, 18)
    assert stage.fingerprint()["decoding"]["samples"] == 3


def test_an_evaluated_model_with_its_own_code_runs_with_trust_remote_code(tmp_path: Path) -> None:
    """--trust-remote-code lets evaluate (and the teacher's scores) load a model folder that
    ships its own code; without it, validation refuses (test_stage_wiring)."""
    code = _model(tmp_path / "code", auto_map={"AutoModel": "m.M"})
    cfg = _ev(tmp_path, input=str(_input(tmp_path)), base_model=str(code))
    trusted = dataclasses.replace(cfg, trust_remote_code=True)
    EvaluateStage(trusted, after=()).validate(set())
    EvaluateStage(trusted, name="evaluate_teacher").validate(set())
