"""The SLURM backend's promises that the earlier backend tests left unpinned (mutation survivors).

Reuses the fakes of tests/hpc/test_slurm_backend_states.py: ``sacct`` is answered by a fake
``subprocess.run``; nothing here waits or polls, so a wrong answer fails at once.
"""

from __future__ import annotations

from pathlib import Path

from hpc.backends.slurm import SlurmHandle
from hpc.layout import RunLayout
from tests.hpc.test_slurm_backend_states import StrictRun, scheduler

__all__ = ["scheduler"]  # the fixture, imported for its name


def test_refresh_gives_every_job_its_sacct_state_and_unknown_for_the_rest(
    scheduler: StrictRun, tmp_path: Path
) -> None:
    """One poll names each job of the handle with the state sacct lists for it, by its own id
    (a task of an array by ``12_3``), and UNKNOWN for a job sacct does not list yet."""
    scheduler.answers["sacct"] = (0, "20_1|RUNNING\n20_2|COMPLETED\n21|FAILED\n", "")
    labels = ["shard 1", "merge", "report"]
    handle = SlurmHandle(RunLayout(tmp_path / "run"), ["20_1", "21", "22"], labels)
    assert handle.refresh() == {"20_1": "RUNNING", "21": "FAILED", "22": "UNKNOWN"}
    assert handle.states() == {"shard 1": "RUNNING", "merge": "FAILED", "report": "UNKNOWN"}
    assert scheduler.calls == [
        ["sacct", "-n", "-P", "-X", "--format=JobID,State", "-j", "20,21,22"]
    ]
