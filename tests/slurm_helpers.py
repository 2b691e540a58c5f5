"""What every real-Slurm test file shares: the CLI runner, waits, sbatch counting, sacct reads,
``launch.json`` and attempt-log readers, dataset slices and job cleanup.

One copy here; the test files import it (tests/slurm_cluster.py owns the cluster itself).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hpc.layout import RunLayout
from tests.slurm_cluster import SlurmCluster, line_count

REPO = Path(__file__).resolve().parents[1]

__all__ = [
    "REPO",
    "all_job_ids",
    "attempts",
    "cancel_run",
    "cli",
    "counting_env",
    "finish",
    "first_lines",
    "line_count",
    "sacct",
    "sacct_states",
    "submissions",
    "wait_for",
]


def cli(
    args: list[str],
    env: dict[str, str] | None = None,
    *,
    cwd: Path = REPO,
    timeout: float = 600,
    module: str = "hpc.launch",
) -> subprocess.CompletedProcess[str]:
    """``python -m hpc.launch ARGS`` as a user types it; output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``cond`` until it returns something true (returned), or fail after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def finish(proc: subprocess.Popen[str], timeout: float = 420) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a launcher started with Popen; fail if it hangs."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"launcher still running after {timeout:.0f}s\n{out[-3000:]}\n{err[-3000:]}")
    return proc.returncode, out, err


def counting_env(folder: Path) -> tuple[dict[str, str], Path]:
    """An environment whose ``sbatch`` logs each call to the returned file."""
    bindir = folder / "bin"
    SlurmCluster.counting_sbatch(bindir)
    calls = folder / "sbatch_calls"
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    return {**env, "COT_TEST_SBATCH_LOG": str(calls)}, calls


def sacct(ids: list[str], fields: str = "JobID,State") -> list[list[str]]:
    """Rows of ``sacct -X`` for ``ids``, split on ``|``."""
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", f"--format={fields}", "-j", ",".join(ids)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [line.split("|") for line in out.splitlines() if line.strip()]


def sacct_states(ids: list[str]) -> dict[str, str]:
    """Job id -> first word of its state (``CANCELLED by 0`` -> ``CANCELLED``)."""
    return {row[0]: row[1].split()[0] for row in sacct(ids) if len(row) > 1 and row[1]}


def all_job_ids() -> set[str]:
    """Every job the cluster knows, finished (sacct) or queued (squeue), by its
    submission id: an array's tasks fold into one id, so a pending array that
    starts (``7_[0-2]`` becomes ``7_0``) is not a new job."""
    out = subprocess.run(
        ["sacct", "-a", "-n", "-P", "-X", "-o", "JobID", "-S", "2000-01-01T00:00:00"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    queued = subprocess.run(
        ["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return {job.split("_")[0] for job in out.split() + queued.split()}


def settled_job_ids(quiet_s: float = 3.0, limit_s: float = 60.0) -> set[str]:
    """:func:`all_job_ids` once two reads ``quiet_s`` apart agree: a job cancelled a moment
    ago can be gone from squeue and not yet in sacct (slurmdbd lags), and would then show up
    later as if it were new."""
    end = time.monotonic() + limit_s
    seen = all_job_ids()
    while True:
        time.sleep(quiet_s)
        now = all_job_ids()
        if now == seen or time.monotonic() > end:
            return now
        seen = now


def submissions(run_dir: Path, stage: str = "generate") -> list[dict[str, Any]]:
    """``launch.json``'s submissions of one stage."""
    data = json.loads(RunLayout(run_dir).launch.read_text())
    subs: list[dict[str, Any]] = data["stages"][stage]["submissions"]
    return subs


def attempts(stage_dir: Path, shard: int) -> list[tuple[dict[str, Any], int]]:
    """[(start event, records written by that start)] from ``attempts/<shard>``.

    A start that ended cleanly (a signal included) logged its count in its ``requests`` event;
    one killed with SIGKILL logged none, so its count is what the next start found on disk
    beyond what it had found itself.
    """
    from hpc.layout import StageLayout

    path = StageLayout(stage_dir).attempts(shard)
    starts: list[dict[str, Any]] = []
    if not path.exists():
        return []
    for line in path.read_text().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue  # being written right now
        if ev["event"] == "start":
            starts.append({"start": ev})
        elif ev["event"] in ("resume", "requests") and starts:
            starts[-1][ev["event"]] = ev
    out: list[tuple[dict[str, Any], int]] = []
    for i, st in enumerate(starts):
        if "requests" in st:
            n = int(st["requests"]["done"])
        elif i + 1 < len(starts) and "resume" in st and "resume" in starts[i + 1]:
            n = int(starts[i + 1]["resume"]["on_disk"]) - int(st["resume"]["on_disk"])
        else:
            n = 0
        out.append((st["start"], n))
    return out


def request_events(stage_dir: Path, shard: int) -> list[dict[str, Any]]:
    """The ``requests`` events of ``attempts/<shard>`` (one per start that sent requests and
    ended without SIGKILL): ``sent`` requests and ``done`` records written."""
    from hpc.layout import StageLayout

    path = StageLayout(stage_dir).attempts(shard)
    events = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [ev for ev in events if ev["event"] == "requests"]


def first_lines(src: Path, n: int, dest: Path) -> Path:
    """Write the first ``n`` lines of ``src`` to ``dest`` (a dataset slice for one test)."""
    dest.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return dest


def cancel_run(run_dir: Path) -> None:
    """scancel every job a run folder's ``launch.json`` recorded."""
    launch = RunLayout(run_dir).launch
    if not launch.exists():
        return
    ids = set()
    for st in json.loads(launch.read_text())["stages"].values():
        for sub in st["submissions"]:
            ids |= {str(j).split("_")[0] for j in sub.get("shards", {}).values()}
            ids |= {str(sub[k]) for k in ("merge", "job") if sub.get(k)}
    if ids:
        subprocess.run(["scancel", *sorted(ids)], capture_output=True, timeout=30, check=False)
