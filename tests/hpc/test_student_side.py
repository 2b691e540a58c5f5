"""The student side's wiring: which models are scored, sampling refusals, evaluation records."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cot.records import RecordError
from hpc import config as C
from hpc.launch import main
from hpc.stages import evaluation_stages
from hpc.stages.report import report_models


def _ev(tmp_path: Path, **kw: object) -> C.EvaluateConfig:
    cfg = C.load_config(C.EvaluateConfig, "evaluate", C.DEMO_CONFIG, {"run_dir": str(tmp_path)})
    return dataclasses.replace(cfg, **kw)  # type: ignore[arg-type]


def test_without_an_adapter_one_model_is_scored_once(tmp_path: Path) -> None:
    cfg = _ev(tmp_path, compare_base=True, lora_model=None, teacher=None)
    assert [st.name for st in evaluation_stages(cfg)] == ["evaluate", "report"]
    assert report_models(cfg) == {"student": "evaluate"}


def test_with_an_adapter_the_base_and_the_teacher_are_scored_too(tmp_path: Path) -> None:
    cfg = _ev(tmp_path, compare_base=True, lora_model=str(tmp_path / "lora"), teacher="/t")
    stages = evaluation_stages(cfg)
    assert [st.name for st in stages] == [
        "evaluate", "evaluate_base", "evaluate_teacher", "report"
    ]  # fmt: skip
    assert report_models(cfg) == {
        "student": "evaluate", "base": "evaluate_base", "teacher": "evaluate_teacher"
    }  # fmt: skip
    teacher = stages[2]
    assert teacher.cfg.base_model == "/t" and teacher.cfg.lora_model is None
    assert teacher.cfg.prompt_format == "auto"  # the teacher is prompted as generation does
    assert teacher.worker.teacher and not stages[0].worker.teacher


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["generate", "--samples-per-question", "4", "--temperature", "0"], "identical copies"),
        (["evaluate", "--samples-per-question", "3"], "identical copies"),  # greedy by default
        (["generate", "--keep", "majority", "--samples-per-question", "1"], "2 or more"),
    ],
)
def test_sampling_settings_that_cannot_work_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    run = tmp_path / "run"
    assert main([*argv, "--run-dir", str(run), "--cluster", "local"]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not run.exists()


class _Done:
    def __init__(self, text: str, error: str | None = None):
        self.text, self.error = text, error


def test_evaluation_records_reduce_worked_golds_and_leave_missing_gold_unscored() -> None:
    from jobs.evaluate import student_record

    base = {"id": "q1", "question": "How many?", "category": "word"}
    gsm = {**base, "answer": "She has 3 * 6 = <<3*6=18>>18 apples.\n#### 18"}
    rec = student_record(gsm, 0, _Done("Step 1: 3 * 6 = 18\nFinal Answer: 18"))
    assert (rec["gold"], rec["gold_reduced"], rec["pred"], rec["correct"]) == (
        "18",
        True,
        "18",
        True,
    )
    plain = student_record({**base, "answer": "18"}, 1, _Done("Final Answer: 17"))
    assert (plain["gold"], plain["gold_reduced"], plain["correct"]) == ("18", False, False)
    assert list(plain)[:2] == ["id", "sample"] and plain["sample"] == 1
    unscored = student_record(base, 0, _Done("Final Answer: 18"))
    assert unscored["gold"] is None and unscored["correct"] is None  # never "wrong"
    failed = student_record(gsm, 0, _Done("", error="prompt too long"))
    assert failed["correct"] is False and failed["error"] == "prompt too long"
    assert student_record(base, 0, _Done("", error="x"))["correct"] is None


# Two evaluations as local jobs (~13 s): in the full suite. The fast suite scores K samples
# in-process (tests/cot/test_evaluation.py: pass@k, majority, agreement).
@pytest.mark.slow
def test_evaluate_with_k_samples_end_to_end_scores_pass_at_k_majority_and_the_teacher(
    tmp_path: Path, tiny_models: Path, small_questions: Path
) -> None:
    import json

    # The tiny teacher as the scored model: it answers in the expected format.
    run = tmp_path / "run"
    teacher = str(tiny_models / "teacher")
    argv = [
        "evaluate", "--cluster", "local", "--run-dir", str(run), "--input", str(small_questions),
        "--num-samples", "4", "--shards", "2", "--base-model", teacher, "--teacher", teacher,
        "--samples-per-question", "3", "--temperature", "0.8", "--max-new-tokens", "64",
        "--quant", "none", "--batch-size", "4",
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((run / "results" / "report.json").read_text())
    assert report["student_label"] == "base student"  # no adapter: one student model
    student = report["student"]
    assert student["samples_per_question"] == 3 and student["overall"]["n"] == 12
    overall = student["overall"]
    assert overall["questions"] == 4 and overall["pass@K"] is not None
    assert overall["pass@1"] == pytest.approx(overall["accuracy"])  # mean over samples
    assert overall["pass@1"] <= overall["pass@K"]
    assert report["teacher"]["overall"]["n"] == 12
    assert report["agreement"]["student_teacher"]["overall"]["n"] == 4
    preds = (run / "results" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 12
    merged = [json.loads(x) for x in (run / "evaluate" / "merged.jsonl").read_text().splitlines()]
    assert [r["sample"] for r in merged[:3]] == [0, 1, 2]
    assert len({r["generated"] for r in merged}) > 4  # samples of one question differ


def test_the_pipeline_scores_its_teacher_with_generates_settings_or_not_at_all() -> None:
    from hpc.pipeline import resolve, stages_of

    sets = {
        "generate": {"max_new_tokens": 99, "prompt_format": "raw", "batch_size": 3, "mem_gb": 7},
        "evaluate": {"max_new_tokens": 55, "num_samples": 4},
    }
    stages = {st.name: st for st in stages_of(resolve(str(C.DEMO_CONFIG), sets, {}))}
    teacher = stages["evaluate_teacher"].cfg
    assert teacher.base_model == stages["generate"].cfg.teacher and teacher.lora_model is None
    assert (teacher.max_new_tokens, teacher.prompt_format, teacher.batch_size) == (99, "raw", 3)
    assert (
        teacher.mem_gb == 7 and teacher.num_samples == 4
    )  # resources: generate's; questions: evaluate's
    assert teacher.teacher_prompt_template == stages["generate"].cfg.prompt_template
    assert stages["evaluate"].cfg.max_new_tokens == 55
    off = {**sets, "evaluate": {**sets["evaluate"], "score_teacher": False}}
    names = [st.name for st in stages_of(resolve(str(C.DEMO_CONFIG), off, {}))]
    assert "evaluate_teacher" not in names and names[-1] == "report"


def test_a_comparison_that_did_not_finish_leaves_the_students_report(tmp_path: Path) -> None:
    import json

    from hpc.layout import RunLayout
    from jobs.report import Report

    run = RunLayout(tmp_path)
    merged = run.stage("evaluate").merged
    merged.parent.mkdir(parents=True)
    rec = {"id": "a", "sample": 0, "category": "c", "question": "q", "generated": "Final Answer: 1",
           "pred": "1", "gold": "1", "correct": True}  # fmt: skip
    merged.write_text(json.dumps(rec) + "\n")
    out = Report()(str(tmp_path), {"student": "evaluate", "teacher": "evaluate_teacher"})
    assert out["student"]["overall"]["correct"] == 1 and "teacher" not in out
    assert out["not_scored"] == {"teacher": str(run.stage("evaluate_teacher").merged)}
    text = run.report_md.read_text()
    assert "- teacher: not scored (" in text and "did not finish" in text
    assert json.loads(run.report_json.read_text())["not_scored"] == out["not_scored"]
    merged.unlink()
    with pytest.raises(
        RecordError, match="file not found"
    ):  # the student's own scores are required
        Report()(str(tmp_path), {"student": "evaluate"})


def test_generation_reduces_worked_golds_for_keep_correct() -> None:
    from jobs.generate import teacher_record

    rec = {"id": "q", "question": "?", "answer": "3 * 24 = <<3*24=72>>72\n#### 72"}
    out = teacher_record(rec, 0, _Done("Step: 3 * 24 = 72\nFinal Answer: 72"))
    assert (out["gold"], out["gold_reduced"], out["correct"]) == ("72", True, True)
    blank = teacher_record({**rec, "answer": "  "}, 0, _Done("Final Answer: 72"))
    assert "gold" not in blank and "correct" not in blank


def test_merge_refuses_to_filter_a_stage_of_scores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["merge", str(tmp_path), "--stage", "evaluate", "--keep", "majority"]) == 2
    assert "a stage of scores is merged whole" in capsys.readouterr().err


def test_a_finished_report_is_returned_with_where_it_is(tmp_path: Path) -> None:
    from hpc.stages import ReportStage

    cfg = _ev(tmp_path)
    stage = ReportStage(cfg)
    stage.layout.report_json.parent.mkdir(parents=True)
    stage.layout.report_json.write_text('{"student": {}}')
    handle = stage.submit(None, [])  # type: ignore[arg-type]
    assert handle.results()[0]["report_md"] == str(stage.layout.report_md)
