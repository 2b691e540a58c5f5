"""Promises of the plan reader, the filtering merge and a sharded stage's submission that the
earlier tests left unpinned (mutation survivors): in-process, no Slurm, no model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from hpc import runs
from hpc import shards as S
from hpc.backends import DoneHandle, Handle
from hpc.backends.base import Call, Spec
from hpc.layout import StageLayout
from tests.hpc.test_shards import _complete_all, _stage
from tests.hpc.test_stage_wiring import FakeBackend, _earlier, _finish, _planned

# --------------------------------------------------------------------------- plan.json


def test_a_plan_saved_as_utf8_json_is_read_whatever_the_locale(
    tmp_path: Path, ascii_locale: None
) -> None:
    """plan.json is JSON, read as UTF-8: one re-saved with raw UTF-8 text (an input under
    ``données/``) loads on a node whose locale encoding is ASCII."""
    folder = tmp_path / "données"
    folder.mkdir()
    stage_dir, plan = _stage(folder, 4, 2)
    path = StageLayout(stage_dir).plan
    fields = json.loads(path.read_bytes())
    path.write_bytes(json.dumps(fields, ensure_ascii=False, indent=1).encode("utf-8"))
    assert "é".encode() in path.read_bytes()
    assert S.load_plan(stage_dir) == plan
    assert S.write_or_check_plan(stage_dir, plan) == plan  # a relaunch finds it unchanged


# --------------------------------------------------------------------------- the merge


def test_a_filter_that_gives_too_few_verdicts_fails_the_merge_and_writes_nothing(
    tmp_path: Path,
) -> None:
    """``keep`` must give one verdict per record: a filter that gives fewer fails the merge
    instead of silently dropping the records it said nothing about; no file is written."""
    stage_dir, plan = _stage(tmp_path, 4, 2, samples=2)
    _complete_all(stage_dir, plan)
    out = tmp_path / "traces.jsonl"
    with pytest.raises(ValueError, match="shorter"):
        S.write_merged(stage_dir, plan, [out], keep=lambda recs: [True] * (len(recs) - 1))
    assert not StageLayout(stage_dir).merged.exists()
    assert not out.exists()


# ---------------------------------------------------------------------------- submission


def test_a_merge_run_at_submission_returns_a_handle_naming_the_merge(tmp_path: Path) -> None:
    """Every shard done, not merged: the merge runs at once, and its handle names one
    completed call, ``merge`` (as a stage already merged or attached to a merge job does)."""
    stage = _planned(tmp_path)
    for i in range(3):
        _finish(stage, i)
    handle = stage.submit(FakeBackend(stage.layout), [])
    assert isinstance(handle, DoneHandle) and handle.new
    assert handle.labels == ["merge"]
    assert handle.states() == {"merge": "COMPLETED"}
    again = stage.submit(FakeBackend(stage.layout), [])
    assert (again.labels, again.new) == (["merge"], False)


def test_a_relaunch_lists_every_live_shard_it_leaves_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The live shards that a relaunch does not resubmit are listed, comma-separated, each
    with its job id."""
    stage = _planned(tmp_path)
    _earlier(stage, {0: "50_0", 1: "50_1", 2: "50_2"})
    backend = FakeBackend(stage.layout)
    backend.alive = {"50_0", "50_2"}  # shard 1's job and the merge 51 are gone
    capsys.readouterr()
    stage.submit(backend, [])
    assert capsys.readouterr().out.splitlines()[1] == (
        "generate: 2 shard(s) already queued or running, not resubmitted: "
        "00000 (job 50_0), 00002 (job 50_2)"
    )


def test_the_merge_job_gets_the_stage_config(tmp_path: Path) -> None:
    """The merge job is submitted with the stage's config: its partition, account, time limit."""
    stage = _planned(tmp_path, partition="short", time_min=7)
    backend = FakeBackend(stage.layout)
    stage.submit(backend, [])
    (_, spec), (merge, mspec) = backend.submitted
    assert [c.label for c in merge] == ["merge"]
    assert mspec.cfg is stage.cfg and spec.cfg is stage.cfg
    assert (mspec.cfg.partition, mspec.cfg.time_min) == ("short", 7)


class _ShortBackend(FakeBackend):
    """Reports one job id fewer than the calls of an array it submitted."""

    def _submit(self, calls: list[Call], spec: Spec) -> Handle:
        if spec.inline or spec.on_submit is None:
            return super()._submit(calls, spec)
        told = spec.on_submit

        def short(indices: list[int], ids: list[str]) -> None:
            told(indices, ids[:-1])

        return super()._submit(calls, dataclasses.replace(spec, on_submit=short))


def test_job_ids_that_do_not_match_the_submitted_shards_are_refused(tmp_path: Path) -> None:
    """launch.json maps each submitted shard to its own job: a backend that reports fewer ids
    than shards stops the launch loudly instead of recording a guessed, partial mapping."""
    stage = _planned(tmp_path)
    backend = _ShortBackend(stage.layout)
    with pytest.raises(ValueError, match="shorter"):
        stage.submit(backend, [])
    assert runs.latest_jobs(stage.layout.root, "generate")["shards"] == {}
    assert [[c.label for c in calls] for calls, _ in backend.submitted] == [
        ["shard 00000", "shard 00001", "shard 00002"]
    ]
