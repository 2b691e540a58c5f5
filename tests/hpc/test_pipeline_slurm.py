"""The whole pipeline on the real test Slurm: dependent jobs, cancelling, idempotent rerun."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.slurm_helpers import cancel_run as cancel_all
from tests.slurm_helpers import cli, wait_for
from tests.slurm_helpers import counting_env as counting_sbatch

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SMALL = [
    "--set",
    "generate.num_samples=48",
    "--set",
    "generate.shards=2",
    "--set",
    "generate.max_new_tokens=128",
    "--set",
    "train.max_steps=12",
    "--set",
    "train.save_steps=6",
    "--set",
    "train.max_length=192",
    "--set",
    "evaluate.num_samples=24",
    "--set",
    "evaluate.shards=2",
    "--set",
    "evaluate.max_new_tokens=128",
]


def status(run: Path) -> dict[str, Any]:
    out = cli(["status", str(run), "--json"])
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_pipeline_end_to_end_then_rerun_submits_nothing(
    slurm_cluster: Any, tiny_models: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    env, calls = counting_sbatch(tmp_path)
    try:
        out = cli(
            ["pipeline", "--cluster", "slurm", "--run-dir", str(run), "--time-min", "60", *SMALL],
            env,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        # Submitted at once and returned: generate array + merge, train, an array + merge for
        # each of the student, the base student and the teacher, the report. Nothing has
        # finished yet, so every later stage waits (afterany) on the one before.
        submitted = calls.read_text().splitlines()
        assert len(submitted) == 10, submitted
        assert "pipeline submitted" in out.stdout
        # The same command again while those jobs are queued or running: every stage finds its
        # live job and submits nothing, so there is one training and one writer per output.
        again = cli(
            ["pipeline", "--cluster", "slurm", "--run-dir", str(run), "--time-min", "60", *SMALL],
            env,
        )
        assert again.returncode == 0, again.stderr[-3000:]
        assert calls.read_text().splitlines() == submitted, again.stdout
        subs = json.loads((run / "launch.json").read_text())["stages"]
        assert len(subs["train"]["submissions"]) == 1 and len(subs["report"]["submissions"]) == 1
        evaluations = ("evaluate", "evaluate_base", "evaluate_teacher")
        assert all(len(subs[s]["submissions"]) == 1 for s in evaluations)
        wait_for(lambda: (run / "results" / "report.json").exists(), 600, "the report", interval=3)
        report = json.loads((run / "results" / "report.json").read_text())
        assert report["student"]["overall"]["n"] == 24
        assert "base" in report and report["teacher"]["overall"]["n"] == 24
        assert report["agreement"]["student_teacher"]["overall"]["n"] == 24
        assert report["student_label"] == "student + LoRA"
        assert (run / "train" / "COMPLETE").exists()
        assert (run / "train" / "adapter" / "adapter_config.json").exists()
        st = status(run)
        assert st["stages"]["generate"]["done"] == 2
        assert st["stages"]["train"]["state"] == "COMPLETED"
        # Rerunning the finished pipeline submits nothing.
        calls.unlink()
        out = cli(
            ["pipeline", "--cluster", "slurm", "--run-dir", str(run), "--time-min", "60", *SMALL],
            env,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert not calls.exists(), calls.read_text()
        assert "report" in out.stdout
    finally:
        cancel_all(run)


def test_failed_stage_cancels_dependents_and_status_names_it(
    slurm_cluster: Any, tiny_models: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    missing = tmp_path / "not-written-yet.jsonl"  # train reads it at run time: it fails there
    try:
        out = cli(
            [
                "pipeline",
                "--cluster",
                "slurm",
                "--run-dir",
                str(run),
                "--time-min",
                "60",
                *SMALL,
                "--set",
                f"train.data={missing}",
            ]
        )
        assert out.returncode == 0, out.stderr[-3000:]

        def settled() -> bool:
            st = status(run)["stages"]
            return st.get("report", {}).get("state") in ("CANCELLED", "FAILED")

        wait_for(settled, 400, "the report job to be cancelled", interval=3)
        st = status(run)["stages"]
        assert st["generate"]["done"] == 2  # the stage before the failure completed
        assert st["train"]["state"] == "FAILED"
        assert st["evaluate"]["failed"] + st["evaluate"]["pending"] >= 1
        assert not (run / "evaluate" / "merge.json").exists()
        text = cli(["status", str(run)])
        assert text.returncode == 1
        assert "FAILED" in text.stdout and st["train"]["log"] in text.stdout
        log = Path(st["train"]["log"])
        assert log.exists() and "not-written-yet.jsonl" in log.read_text()
    finally:
        cancel_all(run)
