"""The SLURM backend's view of job states, in-process and without a cluster.

Completes tests/hpc/test_slurm_backend.py (whose fakes it reuses): here the fake
``subprocess.run`` also behaves like the real one about its options (no ``capture_output``:
nothing captured; no ``text``: bytes), so a scheduler answer is read only when it was asked for
properly. Covers what squeue and sacct answers mean for "is this job still alive", how a
handle waits on submitit's jobs, and the messages a user reads.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpc.backends import choose_backend
from hpc.backends import slurm as E
from hpc.backends.slurm import SlurmBackend, SlurmHandle
from hpc.config import ClusterFields
from hpc.errors import SchedulerError
from hpc.layout import RunLayout
from tests.hpc.test_slurm_backend import FakeRun, _executable


class StrictRun(FakeRun):
    """:class:`FakeRun`, with the real ``subprocess.run``'s outputs: ``stdout``/``stderr`` are
    None unless ``capture_output`` is true, and bytes unless ``text`` is true."""

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        done = super().__call__(argv, **kw)
        if not kw.get("capture_output"):
            return subprocess.CompletedProcess(argv, done.returncode, None, None)
        if not kw.get("text"):
            return subprocess.CompletedProcess(
                argv, done.returncode, done.stdout.encode(), done.stderr.encode()
            )
        return done


@pytest.fixture()
def scheduler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StrictRun]:
    """PATH holds only ``sacct``, ``squeue`` and ``scontrol``, answered by the returned fake."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("sacct", "squeue", "scontrol"):
        _executable(folder, name, "exit 99")  # never run: subprocess.run is the fake
    monkeypatch.setenv("PATH", str(folder))
    run = StrictRun()
    monkeypatch.setattr(subprocess, "run", run)
    yield run


# --------------------------------------------------------------------------- squeue


def test_squeue_answer_decides_what_sacct_does_not_list(scheduler: StrictRun) -> None:
    """slurmdbd lags (sacct lists nothing yet): only the ids squeue names are alive. A task is
    not taken for alive because a job with its array's number is listed."""
    scheduler.answers["sacct"] = (0, "", "")
    scheduler.answers["squeue"] = (0, "7\n8_[1-2]\n9_4\n", "")
    ids = ["7", "7_2", "8_1", "8_3", "9_4", "9", "10"]
    assert E.live_jobs(ids) == {"7", "8_1", "9_4"}
    assert scheduler.calls[1:] == [["squeue", "-h", "-o", "%i", "-j", "10,7,8,9"]]


def test_squeue_forgetting_a_job_is_read_from_its_error_text(scheduler: StrictRun) -> None:
    scheduler.answers["squeue"] = (1, "", "slurm_load_jobs error: Invalid job id specified\n")
    assert E.live_jobs(["31_0", "32"]) == set()  # sacct never answers: squeue alone decides
    scheduler.answers["squeue"] = (1, "", "slurm_load_jobs error: Socket timed out\n")
    with pytest.raises(SchedulerError) as err:
        E.live_jobs(["31_0", "32"])
    assert str(err.value) == "squeue does not answer: slurm_load_jobs error: Socket timed out"


def test_squeue_that_never_answers_is_an_error_not_a_hang(
    scheduler: StrictRun, tmp_path: Path
) -> None:
    """Relaunching must not guess: a silent squeue times out and says why."""
    with pytest.raises(SchedulerError) as err:
        E.live_jobs(["44_1", "45"])
    assert str(err.value) == (
        "squeue does not answer (Command '['squeue', '-h', '-o', '%i', '-j', '44,45']' timed out"
        " after 60 seconds); cannot tell live jobs"
    )
    (tmp_path / "bin" / "squeue").unlink()
    with pytest.raises(SchedulerError) as err:
        E.live_jobs(["44_1"])
    assert str(err.value) == "squeue does not answer (squeue); cannot tell live jobs"


# --------------------------------------------------------------------------- sacct


def test_sacct_lines_without_fields_are_skipped_not_the_end(scheduler: StrictRun) -> None:
    scheduler.answers["sacct"] = (
        0,
        "sacct: warning: accounting lags\n\n5_0|RUNNING\nnot a row\n5_1|FAILED\n6|COMPLETED\n",
        "",
    )
    assert E.job_states(["5_0", "5_1", "6"]) == {
        "5_0": "RUNNING",
        "5_1": "FAILED",
        "6": "COMPLETED",
    }
    assert E.live_jobs(["5_0", "5_1", "6"]) == {"5_0"}
    assert [c[0] for c in scheduler.calls] == ["sacct", "sacct"]  # squeue not needed


# --------------------------------------------------------------------------- handles


def test_handle_refuses_labels_that_do_not_match_its_jobs(
    scheduler: StrictRun, tmp_path: Path
) -> None:
    """Reporting states pairs each job with its label: a job without one is never dropped."""
    scheduler.answers["sacct"] = (0, "50|FAILED\n51|RUNNING\n", "")
    backend = SlurmBackend(RunLayout(tmp_path / "run"))
    assert backend.attach(["50", "51"], ["a", "b"]).states() == {"a": "FAILED", "b": "RUNNING"}
    for labels in (["a"], ["a", "b", "c"]):
        handle = backend.attach(["50", "51"], labels)
        with pytest.raises(ValueError):
            handle.states()


class _SubmititJob:
    """A submitit job whose ``done()`` answers from submitit's cache unless ``force_check``
    asks the scheduler afresh (the cache is refreshed only now and then)."""

    def __init__(self, job_id: str) -> None:
        self.job_id, self.cached, self.forced = job_id, False, 0

    def done(self, force_check: bool = False) -> bool:
        if force_check:
            self.forced += 1
            self.cached = True  # the job has ended: a fresh check says so
        return self.cached


def test_wait_asks_submitit_afresh_when_sacct_lags(
    scheduler: StrictRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def sleep(seconds: float) -> None:
        raise AssertionError("polled again although every job had ended")

    monkeypatch.setattr(E.time, "sleep", sleep)
    jobs = [_SubmititJob("60_0"), _SubmititJob("60_1")]
    handle = SlurmHandle(RunLayout(tmp_path / "run"), ["60_0", "60_1"], ["s0", "s1"], jobs)
    scheduler.answers["sacct"] = (0, "", "")  # slurmdbd has not heard of them yet
    polls: list[int] = []
    handle.wait(lambda: polls.append(1))
    assert polls == [1] and [j.forced for j in jobs] == [1, 1]
    assert handle.states() == {"s0": "UNKNOWN", "s1": "UNKNOWN"}


# --------------------------------------------------------------------------- backend facts


def test_time_limit_with_working_time_left_is_not_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """USR2 comes at most signal_delay_s + 30 s before the limit: one second more is enough."""
    backend = SlurmBackend(RunLayout(tmp_path / "run"))
    with caplog.at_level(logging.WARNING, logger="hpc.backends.slurm"):
        backend.check(ClusterFields(run_dir=str(tmp_path), time_min=2, signal_delay_s=89))
        backend.check(ClusterFields(run_dir=str(tmp_path), time_min=1, signal_delay_s=30))
    assert [r.getMessage() for r in caplog.records] == [
        "warning: --time-min 1 leaves no working time before the USR2 sent 30 s (+ up to 30 s)"
        " before the limit; every attempt would be checkpointed and requeued at once. Raise"
        " --time-min or lower --signal-delay-s."
    ]


def test_slurm_asked_for_by_name_is_announced_as_requested(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = choose_backend("slurm", RunLayout(tmp_path))
    assert (backend.kind, backend.why) == ("slurm", "as requested")
    assert "cluster: slurm (as requested)" in capsys.readouterr().err
