"""The whole pipeline on the real test Slurm: dependent jobs, cancelling, idempotent rerun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.slurm_cluster import SlurmCluster

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


def counting_sbatch(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose sbatch logs each call to the returned file."""
    bindir = tmp_path / "bin"
    SlurmCluster.counting_sbatch(bindir)
    calls = tmp_path / "sbatch_calls"
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    return {**env, "COT_TEST_SBATCH_LOG": str(calls)}, calls


def cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hpc.launch", *args],
        cwd=REPO,
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=600,
    )


def status(run: Path) -> dict[str, Any]:
    out = cli(["status", str(run), "--json"])
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def wait_until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(3)
    raise AssertionError(f"timed out waiting for {what}")


def cancel_all(run: Path) -> None:
    launch = run / "launch.json"
    if not launch.exists():
        return
    ids = set()
    for st in json.loads(launch.read_text())["stages"].values():
        for sub in st["submissions"]:
            ids |= {str(j).split("_")[0] for j in sub.get("shards", {}).values()}
            ids |= {str(sub[k]) for k in ("merge", "job") if sub.get(k)}
    if ids:
        subprocess.run(["scancel", *sorted(ids)], check=False)


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
        # Submitted at once and returned: generate array + merge, train, eval arrays + merges,
        # report. Nothing has finished yet, so every later stage waits on afterok.
        submitted = calls.read_text().splitlines()
        assert len(submitted) == 8, submitted
        assert "pipeline submitted" in out.stdout
        wait_until(lambda: (run / "results" / "report.json").exists(), 600, "the report")
        report = json.loads((run / "results" / "report.json").read_text())
        assert report["student"]["overall"]["n"] == 24
        assert "base" in report
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

        wait_until(settled, 400, "the report job to be cancelled")
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
