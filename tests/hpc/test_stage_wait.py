"""Promises of ShardedStage.wait and of the backend choice that mutation testing found unpinned:
the first progress line, the shards a failed merge names, the run folder a chosen backend writes
into, and the backend that reads a recorded submission of a kind it does not know."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc import runs
from hpc.backends import choose_backend, for_kind, slurm
from hpc.backends.local import LocalBackend
from hpc.errors import StageFailed
from hpc.layout import RunLayout
from tests.hpc.test_stage_wiring import (
    FakeBackend,
    FakeHandle,
    _earlier,
    _finish,
    _planned,
    _queued,
)


def test_wait_first_progress_line_counts_shards_done_before_it_started(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first poll always prints the count, even when one shard is already complete."""
    stage, backend, handle = _queued(tmp_path)
    _finish(stage, 0)
    backend.state_seq = [{"51": "RUNNING"}, {"51": "FAILED"}]
    capsys.readouterr()
    with pytest.raises(StageFailed):
        stage.wait(backend, handle)
    assert capsys.readouterr().out.splitlines() == ["generate: 1/3 shards complete"]


def test_a_failed_merge_does_not_name_a_missing_shard_that_no_job_was_recorded_for(
    tmp_path: Path,
) -> None:
    """A failed merge names the missing shards that had a job, then the merge; no invented job."""
    stage = _planned(tmp_path)
    _earlier(stage, {0: "50_0", 1: "50_1"})  # shard 2: no job recorded
    backend = FakeBackend(stage.layout)
    _finish(stage, 0)
    backend.state_seq = [{"50_1": "COMPLETED", "51": "FAILED"}]  # accounting lags: not FAILED
    logs = stage.layout.logs
    with pytest.raises(StageFailed) as e:
        stage.wait(backend, FakeHandle(["51"], ["merge"], new=False))
    assert str(e.value) == (
        "generate: 2 shard(s) failed for good:\n"
        "  shard 00001: job 50_1 COMPLETED\n"
        f"    log: {logs / '50_1_0_log.err'}\n"
        "  merge: merge FAILED\n"
        f"    log: {logs / '51_0_log.err'}"
    )


@pytest.mark.parametrize(("up", "kind"), [(True, "slurm"), (False, "local")])
def test_auto_choice_gives_a_backend_on_the_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, up: bool, kind: str
) -> None:
    """``auto`` builds the chosen backend on the given run folder (its logs go there)."""
    layout = RunLayout(tmp_path / "run")
    monkeypatch.setattr(slurm, "controller_answers", lambda: up)
    chosen = choose_backend("auto", layout, announce=False)
    assert chosen.kind == kind and chosen.layout is layout
    assert chosen.layout.job_log("7") == tmp_path / "run" / "logs" / "7_0_log.err"


def test_a_recorded_kind_no_backend_knows_is_read_with_the_local_backend(tmp_path: Path) -> None:
    """``for_kind`` falls back to the local backend; ``status`` of such a run still answers."""
    from hpc.status import collect

    layout = RunLayout(tmp_path / "run")
    backend = for_kind("pbs", layout)
    assert type(backend) is LocalBackend and backend.layout is layout
    runs.make_run_dir(layout.root)
    runs.Submission(layout.root, "report", "pbs", job="77")
    row = collect(layout.root)["stages"]["report"]
    assert (row["kind"], row["job"], row["state"]) == ("pbs", "77", "-")
