"""Smoke tests against the real dev Slurm cluster (tests/slurm_cluster.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

submitit = pytest.importorskip("submitit")

pytestmark = pytest.mark.slurm

REPO_ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 120.0


# ---- functions run inside the jobs (module level, so the job can unpickle them)


def slurm_vars(item: int) -> dict[str, Any]:
    return {
        "item": item,
        **{
            k: os.environ.get(k)
            for k in (
                "SLURM_ARRAY_TASK_ID",
                "SLURM_ARRAY_JOB_ID",
                "SLURM_JOB_ID",
                "SLURMD_NODENAME",
            )
        },
    }


def rank_info() -> dict[str, Any]:
    env = submitit.JobEnvironment()
    return {
        "SLURM_PROCID": os.environ.get("SLURM_PROCID"),
        "SLURM_NTASKS": os.environ.get("SLURM_NTASKS"),
        "SLURMD_NODENAME": os.environ.get("SLURMD_NODENAME"),
        "global_rank": env.global_rank,
        "local_rank": env.local_rank,
        "num_tasks": env.num_tasks,
        "num_nodes": env.num_nodes,
        "node": env.node,
        "hostnames": list(env.hostnames),
        "job_id": env.job_id,
    }


def add(a: int, b: int) -> int:
    return a + b


# ---- helpers


def _executor(folder: Path, **params: Any) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(
        slurm_partition="debug",
        timeout_min=60,
        # The job unpickles functions from tests.hpc.*: make the repo importable.
        slurm_setup=[f"export PYTHONPATH={REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"],
        **params,
    )
    return executor


def _wait(jobs: list, deadline_s: float = DEADLINE_S) -> None:
    """Wait for all jobs; cancel them and fail if the deadline passes."""
    end = time.monotonic() + deadline_s
    while not all(job.done(force_check=True) for job in jobs):
        if time.monotonic() > end:
            for job in jobs:
                with contextlib.suppress(Exception):  # best effort
                    job.cancel(check=False)
            states = {job.job_id: job.state for job in jobs}
            pytest.fail(f"jobs not done after {deadline_s:.0f}s: {states}")
        time.sleep(0.5)


def _sacct_state(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.strip().splitlines()[0].strip() if out.strip() else ""


# ---- tests


def test_map_array_four_tasks(slurm_cluster, tmp_path: Path) -> None:
    executor = _executor(tmp_path / "array")
    jobs = executor.map_array(slurm_vars, range(4))
    assert len(jobs) == 4
    _wait(jobs)
    results = [job.result() for job in jobs]

    assert [r["item"] for r in results] == [0, 1, 2, 3]
    assert [r["SLURM_ARRAY_TASK_ID"] for r in results] == ["0", "1", "2", "3"]
    array_ids = {r["SLURM_ARRAY_JOB_ID"] for r in results}
    assert len(array_ids) == 1
    (array_id,) = array_ids
    for task, (job, r) in enumerate(zip(jobs, results, strict=True)):
        assert job.job_id == f"{array_id}_{task}"
        assert r["SLURM_JOB_ID"] and r["SLURM_JOB_ID"].isdigit()
        assert r["SLURMD_NODENAME"] in {"n1", "n2"}


def test_two_node_job(slurm_cluster, tmp_path: Path) -> None:
    executor = _executor(tmp_path / "multinode", nodes=2, tasks_per_node=1)
    job = executor.submit(rank_info)
    _wait([job])
    results = job.results()

    assert len(results) == 2
    assert {r["SLURM_PROCID"] for r in results} == {"0", "1"}
    assert {r["global_rank"] for r in results} == {0, 1}
    assert all(r["SLURM_NTASKS"] == "2" and r["num_tasks"] == 2 for r in results)
    assert all(r["num_nodes"] == 2 and r["local_rank"] == 0 for r in results)
    assert {r["SLURMD_NODENAME"] for r in results} == {"n1", "n2"}
    assert {r["node"] for r in results} == {0, 1}
    assert all(r["hostnames"] == ["n1", "n2"] for r in results)
    assert all(r["job_id"] == job.job_id for r in results)


def test_sacct_shows_completed(slurm_cluster, tmp_path: Path) -> None:
    executor = _executor(tmp_path / "sacct")
    job = executor.submit(add, 2, 3)
    _wait([job])
    assert job.result() == 5

    end = time.monotonic() + 30
    state = _sacct_state(job.job_id)
    while state != "COMPLETED" and time.monotonic() < end:
        time.sleep(0.5)
        state = _sacct_state(job.job_id)
    assert state == "COMPLETED"
    # job.state is cached by submitit and can lag; force an sacct call.
    assert job.get_info(mode="force").get("State") == "COMPLETED"
