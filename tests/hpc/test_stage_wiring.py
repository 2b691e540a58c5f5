"""The stages' wiring, in-process: what a sharded stage submits, attaches to, waits on and
reports, what the runner calls in which order, and the report stage, against a fake backend.

The fake backend records every submission (the calls, their labels and options) and returns
handles whose job ids and states the test sets: no Slurm, no subprocess, no model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from cot.errors import InputError
from hpc import config as C
from hpc import runs
from hpc import shards as S
from hpc.backends import Backend, Call, DependencyFailed, DoneHandle, Failure, Handle
from hpc.backends.base import Spec
from hpc.errors import ConfigError, StageFailed
from hpc.layout import RunLayout
from hpc.stages import ShardedStage, Stage, describe
from hpc.stages.sharded import check_engine, check_sampling, model_is_remote
from tests.jobs.light_worker import LightShard

# ---------------------------------------------------------------------------------- the fake


class FakeHandle(Handle):
    """Jobs of the fake backend: ids, labels and arrays as given; it never runs anything."""

    def __init__(
        self,
        ids: Sequence[str],
        labels: Sequence[str],
        arrays: Sequence[str] = (),
        *,
        new: bool = True,
        failed: Sequence[Failure] = (),
        results: Sequence[Any] = (),
    ) -> None:
        self._ids, self.labels, self._arrays = list(ids), list(labels), list(arrays)
        self._new, self._failed, self._results = new, list(failed), list(results)
        self.waited = 0

    @property
    def new(self) -> bool:
        return self._new

    @property
    def job_ids(self) -> list[str]:
        return list(self._ids)

    @property
    def dependency(self) -> list[str]:
        return list(self._ids)

    @property
    def arrays(self) -> list[str]:
        return list(self._arrays)

    def states(self) -> dict[str, str]:
        return dict.fromkeys(self.labels, "PENDING")

    def wait(self, on_poll: Callable[[], None] | None = None) -> None:
        self.waited += 1

    def results(self) -> list[Any]:
        return list(self._results)

    def failures(self) -> list[Failure]:
        return list(self._failed)


class FakeBackend(Backend):
    """Records what it is asked; job ids count up from 100, arrays of at most ``array_size``.

    ``alive``: the ids ``live`` reports; ``state_seq``: what successive ``states`` calls answer
    (the last one repeats), each after ``on_states`` (if any) ran with the call's number. A
    wait that polls more than ``max_polls`` times fails the test instead of hanging it.
    """

    def __init__(self, layout: RunLayout, *, array_size: int = 1000) -> None:
        super().__init__(layout)
        self.kind = "fake"
        self.array_size = array_size
        self.next_id = 100
        self.submitted: list[tuple[list[Call], Spec]] = []
        self.attached: list[tuple[list[str], list[str]]] = []
        self.asked_live: list[list[str]] = []
        self.asked_states: list[list[str]] = []
        self.alive: set[str] = set()
        self.state_seq: list[dict[str, str] | None] = [{}]
        self.on_states: Callable[[int], None] | None = None
        self.max_polls = 50
        self.inline_result: dict[str, Any] | None = None
        self.refuse: list[Failure] | None = None

    def _submit(self, calls: list[Call], spec: Spec) -> Handle:
        self.submitted.append((calls, spec))
        labels = [c.label for c in calls]
        if spec.inline and self.refuse is not None:
            raise DependencyFailed("a dependency failed", self.refuse)
        if spec.inline and self.inline_result is not None:
            return DoneHandle([self.inline_result], labels, fresh=True)
        if spec.inline:
            jid = str(self.next_id)
            self.next_id += 1
            if spec.on_submit:
                spec.on_submit([0], [jid])
            return FakeHandle([jid], labels)
        ids, arrays = [], []
        for lo in range(0, len(calls), self.array_size):
            array = str(self.next_id)
            self.next_id += 1
            idx = list(range(lo, min(len(calls), lo + self.array_size)))
            got = [f"{array}_{k - lo}" for k in idx]
            if spec.on_submit:
                spec.on_submit(idx, got)
            ids += got
            arrays.append(array)
        return FakeHandle(ids, labels, arrays)

    def attach(self, job_ids: Sequence[str], labels: Sequence[str]) -> Handle:
        self.attached.append((list(job_ids), list(labels)))
        return FakeHandle(job_ids, labels, new=False)

    def live(self, job_ids: Sequence[str]) -> set[str]:
        self.asked_live.append(list(job_ids))
        return set(job_ids) & self.alive

    def states(self, job_ids: Sequence[str]) -> dict[str, str] | None:
        self.asked_states.append(list(job_ids))
        if len(self.asked_states) > self.max_polls:
            raise AssertionError(f"states polled {self.max_polls} times: the wait never ends")
        if self.on_states:
            self.on_states(len(self.asked_states))
        answer = self.state_seq.pop(0) if len(self.state_seq) > 1 else self.state_seq[0]
        return None if answer is None else dict(answer)

    @property
    def poll_s(self) -> float:
        return 0.0


def _labels(calls: Sequence[Call]) -> list[str]:
    return [c.label for c in calls]


# ----------------------------------------------------------------------------- a planned stage

N = 6


def _input(tmp_path: Path, answers: bool = True) -> Path:
    inp = tmp_path / "q.jsonl"
    recs = [
        {"id": f"q{i}", "question": f"question {i}", **({"answer": str(i)} if answers else {})}
        for i in range(N)
    ]
    inp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return inp


def _cfg(tmp_path: Path, **kw: Any) -> C.GenerateConfig:
    if "input" not in kw:
        kw["input"] = str(_input(tmp_path))
    kw.setdefault("shards", 3)
    kw.setdefault("run_dir", str(tmp_path / "run"))
    return C.GenerateConfig(batch_size=2, cluster="local", **kw)


def _planned(tmp_path: Path, samples: int = 1, **kw: Any) -> ShardedStage:
    cfg = _cfg(tmp_path, samples_per_question=samples, **kw)
    stage = ShardedStage(cfg, LightShard(), name="generate", samples=samples)
    stage.validate(set())
    runs.make_run_dir(stage.layout.root)
    stage.plan()
    return stage


def _finish(stage: ShardedStage, shard: int) -> None:
    """Write a shard's records and its completion marker, as a task does."""
    d, plan = stage.dir.dir, stage.planned
    path = S.shard_path(d, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = plan.keys(shard)
    path.write_text("".join(json.dumps({"id": k[0], "sample": k[1]}) + "\n" for k in keys))
    S.finish_shard(d, plan, shard)


def _earlier(stage: ShardedStage, shards: dict[int, str], merge: str | None = "51") -> None:
    runs.Submission(stage.layout.root, stage.name, "fake", shards=shards, merge=merge)


def _launch(stage: ShardedStage) -> list[dict[str, Any]]:
    subs: list[dict[str, Any]] = runs.read_launch(stage.layout.root)["stages"][stage.name][
        "submissions"
    ]
    return [{k: v for k, v in s.items() if k != "time"} for s in subs]


# ------------------------------------------------------------------------------- submission


def test_a_fresh_launch_submits_the_shards_as_arrays_then_the_merge_after_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stage = _planned(tmp_path)
    root = stage.layout.root
    backend = FakeBackend(stage.layout, array_size=2)
    capsys.readouterr()
    handle = stage.submit(backend, [])

    (shards, spec), (merge, mspec) = backend.submitted
    assert _labels(shards) == ["shard 00000", "shard 00001", "shard 00002"]
    assert [(c.fn, c.args) for c in shards] == [
        (stage.worker, (stage.cfg, i, "generate")) for i in range(3)
    ]
    assert (spec.cfg, spec.name, spec.after, spec.inline, spec.after_any) == (
        stage.cfg,
        f"cot-generate {root.name}",
        [],
        False,
        False,
    )
    # The merge: inline where the backend allows, after every shard however it ended.
    assert _labels(merge) == ["merge"]
    assert merge[0].args == (str(root), "generate", [], "all")
    assert type(merge[0].fn).__name__ == "Merge"
    assert (mspec.name, mspec.inline, mspec.after_any) == (f"cot-generate {root.name}", True, True)
    assert [h.job_ids for h in mspec.after] == [["100_0", "100_1", "101_0"]]
    assert handle.job_ids == ["102"]
    assert backend.attached == []
    # Every array and the merge are in launch.json, each shard with its own task id.
    assert _launch(stage) == [
        {
            "kind": "fake",
            "shards": {"0": "100_0", "1": "100_1", "2": "101_0"},
            "arrays": ["100", "101"],
            "merge": "102",
        }
    ]
    assert capsys.readouterr().out.splitlines() == [
        f"generate: 3 shards, 3 to run, run folder {root}",
        "generate: submitted 3 shard(s) as array job(s) 100, 101; merge job 102 (after the shards)",
        f"  status: python -m hpc.launch status {root}",
    ]


def test_shards_after_an_upstream_stage_wait_for_it_to_end_however_it_ended(
    tmp_path: Path,
) -> None:
    stage = _planned(tmp_path)
    backend = FakeBackend(stage.layout)
    upstream = FakeHandle(["77"], ["train"])
    stage.submit(backend, [upstream])
    (_, spec), (_, mspec) = backend.submitted
    assert spec.after == [upstream] and spec.after_any is True
    assert [h.job_ids for h in mspec.after] == [["100_0", "100_1", "100_2"]]


def test_a_relaunch_runs_only_missing_shards_without_a_live_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stage = _planned(tmp_path)
    _finish(stage, 0)
    _earlier(stage, {0: "50_0", 1: "50_1", 2: "50_2"})
    backend = FakeBackend(stage.layout)
    backend.alive = {"50_0", "50_1"}  # the merge 51 and shard 2's job are gone
    capsys.readouterr()
    handle = stage.submit(backend, [])

    assert backend.asked_live == [["50_1", "50_2", "51"]]  # one scheduler call
    (shards, _), (_, mspec) = backend.submitted
    assert [(c.label, c.args[1]) for c in shards] == [("shard 00002", 2)]
    assert backend.attached == [(["50_1"], ["job 50_1"])]
    assert [(h.job_ids, h.new) for h in mspec.after] == [(["100_0"], True), (["50_1"], False)]
    assert handle.job_ids == ["101"]
    assert _launch(stage)[1] == {
        "kind": "fake",
        "shards": {"2": "100_0"},
        "arrays": ["100"],
        "merge": "101",
    }
    assert runs.latest_jobs(stage.layout.root, "generate")["shards"] == {
        0: "50_0",
        1: "50_1",
        2: "100_0",
    }
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"generate: 3 shards, 2 to run, run folder {stage.layout.root}",
        "generate: 1 shard(s) already queued or running, not resubmitted: 00001 (job 50_1)",
        "generate: submitted 1 shard(s) as array job(s) 100; merge job 101 (after the shards)",
        f"  status: python -m hpc.launch status {stage.layout.root}",
    ]


def test_a_relaunch_whose_missing_shards_all_run_submits_only_a_new_merge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stage = _planned(tmp_path)
    _earlier(stage, {0: "50_0", 1: "50_1", 2: "50_2"})
    backend = FakeBackend(stage.layout)
    backend.alive = {"50_0", "50_1", "50_2"}
    stage.submit(backend, [])
    assert [_labels(calls) for calls, _ in backend.submitted] == [["merge"]]
    assert backend.attached == [(["50_0", "50_1", "50_2"], ["job 50_0", "job 50_1", "job 50_2"])]
    assert "generate: submitted 0 shard(s) as array job(s) none; merge job 100" in (
        capsys.readouterr().out
    )


def test_a_relaunch_while_the_shards_and_merge_are_queued_attaches_to_the_merge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stage = _planned(tmp_path)
    _finish(stage, 0)
    _earlier(stage, {0: "50_0", 1: "50_1", 2: "50_2"})
    backend = FakeBackend(stage.layout)
    backend.alive = {"50_1", "50_2", "51"}
    capsys.readouterr()
    handle = stage.submit(backend, [])
    assert backend.submitted == []
    assert backend.attached == [(["51"], ["merge"])]
    assert handle.job_ids == ["51"] and not handle.new
    assert capsys.readouterr().out.splitlines()[1] == (
        "generate: 2 shard(s) to go and merge job 51 already queued or running; nothing resubmitted"
    )
    # An upstream stage submitted anew: the queued merge is not reused (a live shard is never
    # given a second writer); a new merge waits on the live shards.
    backend.attached.clear()
    stage.submit(backend, [FakeHandle(["90"], ["train"])])
    assert [_labels(calls) for calls, _ in backend.submitted] == [["merge"]]
    assert backend.attached == [(["50_1", "50_2"], ["job 50_1", "job 50_2"])]
    # Not every missing shard is live: the queued merge would miss one; a new one is needed.
    backend.submitted.clear()
    backend.alive = {"50_1", "51"}
    stage.submit(backend, [])
    assert [_labels(calls) for calls, _ in backend.submitted] == [["shard 00002"], ["merge"]]


def test_a_complete_stage_submits_nothing_and_returns_its_merge_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stage = _planned(tmp_path)
    for i in range(3):
        _finish(stage, i)
    backend = FakeBackend(stage.layout)
    # Every shard done, never merged: the merge runs here, and says what it wrote.
    capsys.readouterr()
    handle = stage.submit(backend, [])
    summary = json.loads(stage.dir.merge_summary.read_text())
    assert handle.results() == [summary] and handle.new and handle.job_ids == []
    assert summary["kept"] == summary["total"] == N
    assert stage.dir.merged.read_text().count("\n") == N
    assert capsys.readouterr().out.splitlines()[1] == (
        f"merged {N} of {N} records -> {stage.dir.merged}"
    )
    # Merged too: nothing to do at all.
    handle = stage.submit(backend, [])
    assert handle.results() == [summary] and not handle.new
    assert capsys.readouterr().out.splitlines()[1] == "generate: already complete and merged"
    assert backend.submitted == []
    assert stage.is_complete()


def test_a_complete_stage_with_an_output_copies_it_again(tmp_path: Path) -> None:
    out = tmp_path / "traces.jsonl"
    stage = _planned(tmp_path, output=str(out))
    for i in range(3):
        _finish(stage, i)
    backend = FakeBackend(stage.layout)
    stage.submit(backend, [])
    out.unlink()
    handle = stage.submit(backend, [])
    assert handle.new and out.read_text() == stage.dir.merged.read_text()
    assert backend.submitted == []


def test_a_merge_run_inline_reports_what_it_merged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stage = _planned(tmp_path)
    backend = FakeBackend(stage.layout)
    backend.inline_result = {
        "kept": 5,
        "total": 6,
        "merged": "M",
        "keep": "all",
        "outputs": [],
    }
    capsys.readouterr()
    handle = stage.submit(backend, [])
    assert handle.results() == [backend.inline_result]
    assert capsys.readouterr().out.splitlines()[1:] == ["merged 5 of 6 records -> M"]
    assert runs.latest_jobs(stage.layout.root, "generate")["merge"] is None


def test_a_failed_dependency_of_the_merge_names_the_shards(tmp_path: Path) -> None:
    stage = _planned(tmp_path)
    backend = FakeBackend(stage.layout)
    log = stage.layout.job_log("100_1")
    backend.refuse = [Failure("shard 00001", "100_1", "FAILED", log, "job 100_1 FAILED")]
    with pytest.raises(StageFailed) as e:
        stage.submit(backend, [])
    assert str(e.value) == (
        f"generate: 1 shard(s) failed for good:\n  shard 00001: job 100_1 FAILED\n    log: {log}"
    )
    # The shards were recorded before the merge was refused: a relaunch finds them.
    assert _launch(stage) == [
        {
            "kind": "fake",
            "shards": {"0": "100_0", "1": "100_1", "2": "100_2"},
            "arrays": ["100"],
        }
    ]


# ---------------------------------------------------------------------------------- waiting


def _queued(tmp_path: Path) -> tuple[ShardedStage, FakeBackend, FakeHandle]:
    stage = _planned(tmp_path)
    _earlier(stage, {0: "50_0", 1: "50_1", 2: "50_2"})
    return stage, FakeBackend(stage.layout), FakeHandle(["51"], ["merge"], new=False)


def test_wait_prints_progress_once_per_change_and_returns_the_merge_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stage, backend, handle = _queued(tmp_path)
    summary = {"kept": 6, "total": 6, "merged": "M", "keep": "all", "outputs": []}

    def progress(call: int) -> None:
        if call == 3:
            _finish(stage, 1)
        if call == 5:
            stage.dir.merge_summary.write_text(json.dumps(summary))

    backend.on_states = progress
    # No answer from accounting, then the merge runs; COMPLETED counts once merge.json exists.
    backend.state_seq = [None, {"51": "PENDING"}, {"51": "RUNNING"}, {"51": "COMPLETED"}]
    capsys.readouterr()
    assert stage.wait(backend, handle) == summary
    assert backend.asked_states[0] == ["50_0", "50_1", "50_2", "51"]
    assert len(backend.asked_states) == 5
    assert capsys.readouterr().out.splitlines() == [
        "generate: 0/3 shards complete",
        "generate: 1/3 shards complete",
        "merged 6 of 6 records -> M",
    ]


def test_wait_on_a_merge_run_here_returns_its_result(tmp_path: Path) -> None:
    stage, backend, _ = _queued(tmp_path)
    assert stage.wait(backend, DoneHandle([{"kept": 1}], ["merge"])) == {"kept": 1}
    assert backend.asked_states == []


def test_wait_names_each_missing_shard_whose_job_failed(tmp_path: Path) -> None:
    stage, backend, handle = _queued(tmp_path)
    _finish(stage, 0)
    backend.state_seq = [
        # A complete shard is not failed, whatever its job says; a running one is not named.
        {"50_0": "CANCELLED", "50_1": "TIMEOUT", "50_2": "RUNNING", "51": "PENDING"}
    ]
    stage.layout.logs.mkdir(parents=True, exist_ok=True)
    log = stage.layout.job_log("50_1")
    log.write_text("starting\nRuntimeError: CUDA out of memory\n")
    message = (
        "generate: 1 shard(s) failed for good:\n"
        "  shard 00001: job 50_1 TIMEOUT\n"
        "    cause: RuntimeError: CUDA out of memory\n"
        f"    log: {log}"
    )
    with pytest.raises(StageFailed) as e:
        stage.wait(backend, handle)
    assert str(e.value) == message
    # The merge that ran after the shards failed too: the failed shard is the news, not it.
    backend.state_seq = [{"50_1": "TIMEOUT", "50_2": "RUNNING", "51": "FAILED"}]
    with pytest.raises(StageFailed) as e:
        stage.wait(backend, handle)
    assert str(e.value) == message


def test_wait_on_a_failed_merge_names_the_missing_shards_and_the_merge(tmp_path: Path) -> None:
    stage, backend, handle = _queued(tmp_path)
    _finish(stage, 0)
    # Accounting lags: shard 1's job still reads COMPLETED, shard 2's is not known yet.
    backend.state_seq = [{"50_0": "COMPLETED", "50_1": "COMPLETED", "51": "FAILED"}]
    logs = stage.layout.logs
    with pytest.raises(StageFailed) as e:
        stage.wait(backend, handle)
    assert str(e.value) == (
        "generate: 3 shard(s) failed for good:\n"
        "  shard 00001: job 50_1 COMPLETED\n"
        f"    log: {logs / '50_1_0_log.err'}\n"
        "  shard 00002: job 50_2 UNKNOWN\n"
        f"    log: {logs / '50_2_0_log.err'}\n"
        "  merge: merge FAILED\n"
        f"    log: {logs / '51_0_log.err'}"
    )


# ----------------------------------------------------------------------------------- status


def test_status_row_counts_every_shard_state_and_the_merge(tmp_path: Path) -> None:
    inp = tmp_path / "q12.jsonl"
    recs = [{"id": f"q{i}", "question": f"question {i}"} for i in range(12)]
    inp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    stage = _planned(tmp_path, input=str(inp), shards=8, samples=2)
    # Shards 0 and 1 done; 2, 3 running; 4, 5 failed for good; 6 queued; 7 never submitted.
    for i in (0, 1):
        _finish(stage, i)
    for i, n in ((2, 1), (3, 2), (4, 1), (6, 3)):
        S.write_progress(stage.dir.dir, i, n)
    jobs = {i: f"50_{i}" for i in range(7)}
    runs.Submission(stage.layout.root, "generate", "slurm", shards=jobs, merge="51")
    # Shard 3 was started three times (two requeues); other events are not starts.
    for event in ("start", "batch", "batch", "start", "batch", "start", "batch", "resume"):
        S.append_attempt(stage.dir.dir, 3, {"event": event})
    S.append_attempt(stage.dir.dir, 0, {"event": "start"})
    states = {
        "50_0": "COMPLETED",
        "50_1": "FAILED",  # a task that died after its marker: the shard is done
        "50_2": "RUNNING",
        "50_3": "RUNNING",
        "50_4": "OUT_OF_MEMORY",
        "50_5": "CANCELLED",
        "50_6": "PENDING",
    }
    info = runs.latest_jobs(stage.layout.root, "generate")
    row = ShardedStage.status(stage.layout, "generate", info, states)
    logs = stage.layout.logs
    assert row == {
        "kind": "slurm",
        "jobs": [f"50_{i}" for i in range(7)],
        "shards": 8,
        "done": 2,
        "running": 2,
        "pending": 2,
        "failed": 2,
        # Done shards count whole (1 and 2 questions, 2 samples each), the others as they report.
        "records": 2 * (1 + 2) + 1 + 2 + 1 + 3,
        "total": 24,
        "requeues": 2,
        "failed_shards": [
            {
                "shard": 4,
                "job": "50_4",
                "state": "OUT_OF_MEMORY",
                "log": str(logs / "50_4_0_log.err"),
            },
            {"shard": 5, "job": "50_5", "state": "CANCELLED", "log": str(logs / "50_5_0_log.err")},
        ],
        "merge_job": "51",
        "merge": "UNKNOWN",  # recorded, but the scheduler does not know it (yet)
        "merge_summary": None,
    }
    assert ShardedStage.status(stage.layout, "generate", info, {"51": "PENDING"})["merge"] == (
        "PENDING"
    )
    # No merge submitted yet: no merge state at all.
    stage.layout.launch.unlink()
    runs.Submission(stage.layout.root, "generate", "slurm", shards=jobs)
    info = runs.latest_jobs(stage.layout.root, "generate")
    row = ShardedStage.status(stage.layout, "generate", info, states)
    assert (row["merge_job"], row["merge"], row["merge_summary"]) == (None, None, None)


def test_status_row_of_a_merged_stage_carries_its_summary(tmp_path: Path) -> None:
    stage = _planned(tmp_path)
    for i in range(3):
        _finish(stage, i)
    stage.submit(FakeBackend(stage.layout), [])  # merges here
    runs.Submission(stage.layout.root, "generate", "local", shards={0: "7"}, merge="8")
    info = runs.latest_jobs(stage.layout.root, "generate")
    row = ShardedStage.status(stage.layout, "generate", info, {"8": "FAILED"})
    summary = json.loads(stage.dir.merge_summary.read_text())
    assert (row["done"], row["records"], row["total"]) == (3, N, N)
    assert (row["merge"], row["merge_summary"]) == ("COMPLETED", summary)


# ---------------------------------------------------------------------------- merge summary


def test_describe_names_errors_categories_votes_and_copies() -> None:
    from cot.evaluation import vote_text

    vote = {"questions": 4, "ties": 1, "no_answer": 0, "unanimous": 2, "agreement": 0.75}
    counts = {
        "kept": 4,
        "total": 6,
        "merged": "/r/generate/merged.jsonl",
        "errors": 2,
        "keep": "correct",
        "per_category": {"word": [1, 2], "arith": [3, 4]},
        "majority": vote,
        "outputs": ["/o/a.jsonl", "/o/b.jsonl"],
    }
    assert describe(counts).splitlines() == [
        "merged 4 of 6 records -> /r/generate/merged.jsonl",
        '  2 error records (the engine could not produce them; each keeps its reason in "error")',
        "  arith            kept      3 of      4",
        "  word             kept      1 of      2",
        f"  {vote_text(vote)}",
        "  copied to /o/a.jsonl",
        "  copied to /o/b.jsonl",
    ]
    plain = {**counts, "errors": 0, "keep": "all", "majority": None, "outputs": []}
    assert describe(plain) == "merged 4 of 6 records -> /r/generate/merged.jsonl"


# ------------------------------------------------------------------------ checks and identity


def test_engine_settings_that_cannot_work_are_refused_before_submission(tmp_path: Path) -> None:
    def check(**kw: Any) -> None:
        check_engine(C.GenerateConfig(**kw))

    check()  # hf, nothing of a server
    for flag, kw in (
        ("--server-url", {"server_url": "http://h:1"}),
        ("--server-command", {"server_command": "serve {model} {port}"}),
    ):
        with pytest.raises(ConfigError) as e:
            check(**kw)
        assert str(e.value) == f"{flag} needs --engine server (the engine is hf)"
    with pytest.raises(ConfigError) as e:
        check(engine="server", server_url="http://h:1", server_command="serve {model} {port}")
    assert str(e.value) == (
        "--server-url and --server-command exclude each other: the first uses a running "
        "server, the second starts one per task"
    )
    with pytest.raises(ConfigError) as e:
        check(engine="server", server_url="h:8000/v1")
    assert str(e.value) == "--server-url 'h:8000/v1' must start with http:// or https://"
    check(engine="server", server_url="http://h:8000/v1")
    check(engine="server", server_url="https://h/v1")
    check(engine="server", server_command="serve {model} --port {port}")
    with pytest.raises(InputError, match=r"missing the \{port\} placeholder"):
        check(engine="server", server_command="serve {model}")  # fails once, here
    check(engine="server", server="vllm")  # a preset


def test_an_adapter_is_refused_by_a_server_that_cannot_serve_one(tmp_path: Path) -> None:
    cfg = C.EvaluateConfig(
        run_dir=str(tmp_path / "run"),
        input=str(_input(tmp_path)),
        engine="server",
        server="transformers",
        lora_model=str(tmp_path / "adapter"),
    )
    with pytest.raises(InputError, match="the transformers server preset cannot serve a LoRA"):
        ShardedStage(cfg, LightShard(), name="evaluate").validate(set())
    ShardedStage(dataclasses.replace(cfg, server="vllm"), LightShard(), name="evaluate").validate(
        set()
    )


def test_sampling_settings_that_cannot_give_what_they_ask_are_refused() -> None:
    cfg = C.GenerateConfig(samples_per_question=2, temperature=0.0)
    with pytest.raises(ConfigError) as e:
        check_sampling(cfg)
    assert str(e.value) == (
        "--samples-per-question 2 at --temperature 0 would write 2 identical copies of each "
        "greedy answer; give --temperature > 0 (e.g. 0.7) or --samples-per-question 1"
    )
    with pytest.raises(ConfigError, match=r"^--keep majority votes among several samples"):
        check_sampling(C.GenerateConfig(samples_per_question=1), "majority")
    check_sampling(C.GenerateConfig(samples_per_question=2, temperature=0.7), "majority")
    check_sampling(C.GenerateConfig(samples_per_question=1, temperature=0.0), "all")


def test_a_model_name_on_a_running_server_is_remote(tmp_path: Path) -> None:
    url = "http://h:1/v1"
    assert model_is_remote(C.GenerateConfig(engine="server", server_url=url), "Qwen/Qwen2")
    assert not model_is_remote(C.GenerateConfig(engine="server", server_url=url), str(tmp_path))
    assert not model_is_remote(C.GenerateConfig(engine="server"), "Qwen/Qwen2")
    assert not model_is_remote(C.GenerateConfig(engine="hf", server_url=url), "Qwen/Qwen2")


def test_keep_correct_needs_gold_answers_in_the_input(tmp_path: Path) -> None:
    inp = _input(tmp_path, answers=False)
    stage = ShardedStage(
        _cfg(tmp_path, input=str(inp)), LightShard(), name="generate", keep="correct"
    )
    with pytest.raises(ConfigError) as e:
        stage.validate(set())
    assert str(e.value) == f"{inp}: --keep correct needs an `answer` field in the input"
    assert not Path(stage.cfg.run_dir).exists()


def test_fingerprint_pins_engine_decoding_and_keep(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, seed=3, top_p=0.9, max_new_tokens=64)
    stage = ShardedStage(cfg, LightShard(), name="generate", keep="correct", samples=2)
    assert stage.fingerprint() == {
        "stage": "generate",
        "engine": {"engine": "hf", "prompt_format": "auto", "quant": "auto"},
        "decoding": {
            "max_new_tokens": 64,
            "temperature": 0.7,
            "top_p": 0.9,
            "seed": 3,
            "samples": 2,
        },
        "keep": "correct",
    }
    server = dataclasses.replace(
        cfg, engine="server", server_url="http://h:1", precision="bf16", temperature=1
    )
    fp = ShardedStage(server, LightShard(), name="evaluate").fingerprint()
    assert fp["engine"] == {
        "engine": "server",
        "prompt_format": "auto",
        "quant": "auto",
        "precision": "bf16",
        "server": "transformers",
        "server_command": None,
        "server_url": "http://h:1",
    }
    assert fp["stage"] == "evaluate" and fp["keep"] == "all"
    assert type(fp["decoding"]["temperature"]) is float and fp["decoding"]["samples"] == 1


def test_outputs_and_completion(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    stage = _planned(tmp_path, output=str(out))
    assert stage.outputs() == [stage.dir.merged, out]
    assert not stage.is_complete()
    for i in range(3):
        _finish(stage, i)
    assert not stage.is_complete()  # not merged yet
    stage.dir.merge_summary.write_text("{}")
    assert stage.is_complete()
    S.marker_path(stage.dir.dir, 1).unlink()
    assert not stage.is_complete()
    bare = ShardedStage(_cfg(tmp_path, run_dir=str(tmp_path / "b")), LightShard(), name="x")
    assert bare.outputs() == [bare.dir.merged] and not bare.is_complete()


# ----------------------------------------------------------------------------------- runner


class Step(Stage):
    """A stage that records what the runner asks of it, in one shared list."""

    def __init__(
        self,
        root: Path,
        name: str,
        events: list[Any],
        *,
        after: tuple[str, ...] = (),
        outputs: Sequence[Path] = (),
        handle: Handle | None = None,
        refuse: str | None = None,
    ) -> None:
        super().__init__(RunLayout(root))
        self.name, self.after, self.events = name, after, events
        self._outputs, self._refuse = list(outputs), refuse
        self.handle = handle or FakeHandle([f"{name}-job"], [name])

    def validate(self, produced: set[Path]) -> None:
        self.events.append(("validate", self.name, sorted(p.name for p in produced)))
        if self._refuse == "validate":
            raise ConfigError(f"{self.name}: bad input")

    def outputs(self) -> list[Path]:
        return self._outputs

    def is_complete(self) -> bool:
        return False

    def refuse_changes(self) -> None:
        self.events.append(("refuse", self.name))
        if self._refuse == "changes":
            raise ConfigError(f"{self.name}: other settings")

    def plan(self) -> None:
        self.events.append(("plan", self.name))

    def submit(self, backend: Backend, after: Sequence[Handle]) -> Handle:
        self.events.append(("submit", self.name, [h.job_ids for h in after]))
        return self.handle

    def wait(self, backend: Backend, handle: Handle) -> Any:
        self.events.append(("wait", self.name))
        return f"{self.name} done"


def _steps(tmp_path: Path, events: list[Any], **kw: Any) -> list[Stage]:
    root = tmp_path / "run"
    return [
        Step(root, "a", events, outputs=[tmp_path / "a.out"], **kw.get("a", {})),
        Step(root, "b", events, after=("a",), outputs=[tmp_path / "b.out"], **kw.get("b", {})),
        Step(root, "c", events, after=("a", "b", "elsewhere"), **kw.get("c", {})),
    ]


def _run(tmp_path: Path, stages: list[Stage], events: list[Any], **kw: Any) -> Any:
    from hpc.stages import run_stages

    cluster = C.ClusterFields(run_dir=str(tmp_path / "run"), cluster="local")
    backend = kw.pop("backend", None) or FakeBackend(RunLayout(tmp_path / "run"))
    return run_stages(
        stages,
        cluster,
        before=lambda: events.append(("before",)),
        on_queued=lambda: events.append(("queued",)),
        backend=backend,
        **kw,
    )


def test_runner_validates_all_then_refuses_plans_and_submits_in_order(tmp_path: Path) -> None:
    events: list[Any] = []
    out = _run(tmp_path, _steps(tmp_path, events), events, wait=False)
    assert events == [
        ("before",),
        # Each stage is validated knowing what the stages before it will write.
        ("validate", "a", []),
        ("validate", "b", ["a.out"]),
        ("validate", "c", ["a.out", "b.out"]),
        ("refuse", "a"),
        ("refuse", "b"),
        ("refuse", "c"),
        ("plan", "a"),
        ("plan", "b"),
        ("plan", "c"),
        ("submit", "a", []),
        ("submit", "b", [["a-job"]]),
        ("submit", "c", [["a-job"], ["b-job"]]),
        ("queued",),
    ]
    assert list(out.handles) == ["a", "b", "c"] and out.results == {} and out.queued
    assert (tmp_path / "run" / ".cot-hpc-run").exists()


def test_runner_waits_for_every_stage_when_asked(tmp_path: Path) -> None:
    events: list[Any] = []
    out = _run(tmp_path, _steps(tmp_path, events), events, wait=True)
    assert events[-4:] == [("queued",), ("wait", "a"), ("wait", "b"), ("wait", "c")]
    assert out.results == {"a": "a done", "b": "b done", "c": "c done"}
    assert not out.queued


def test_runner_on_a_sequential_backend_waits_for_each_stage_before_the_next(
    tmp_path: Path,
) -> None:
    events: list[Any] = []
    backend = FakeBackend(RunLayout(tmp_path / "run"))
    backend.sequential = True
    out = _run(tmp_path, _steps(tmp_path, events), events, wait=True, backend=backend)
    assert events[-6:] == [
        ("submit", "a", []),
        ("wait", "a"),
        ("submit", "b", [["a-job"]]),
        ("wait", "b"),
        ("submit", "c", [["a-job"], ["b-job"]]),
        ("wait", "c"),
    ]  # nothing left queued, nothing waited twice
    assert out.results == {"a": "a done", "b": "b done", "c": "c done"}


def test_runner_without_queued_jobs_does_not_say_so(tmp_path: Path) -> None:
    events: list[Any] = []
    done = {"handle": DoneHandle(["x"], ["a"])}
    stages = _steps(tmp_path, events, a=done, b=done, c=done)
    out = _run(tmp_path, stages, events, wait=False)
    assert ("queued",) not in events and not out.queued


def test_a_refusal_stops_the_runner_before_anything_is_written(tmp_path: Path) -> None:
    events: list[Any] = []
    stages = _steps(tmp_path, events, c={"refuse": "changes"})
    with pytest.raises(ConfigError, match="c: other settings"):
        _run(tmp_path, stages, events, wait=True)
    assert [e[0] for e in events].count("plan") == 0
    assert [e[0] for e in events].count("submit") == 0
    # Bad input stops even earlier: no run folder at all.
    events.clear()
    other = tmp_path / "other"
    other.mkdir()
    stages = _steps(other, events, b={"refuse": "validate"})
    with pytest.raises(ConfigError, match="b: bad input"):
        _run(other, stages, events, wait=True)
    assert events == [("before",), ("validate", "a", []), ("validate", "b", ["a.out"])]
    assert not (other / "run").exists()
    # A --run-dir that holds something else is refused before any stage is looked at.
    events.clear()
    (other / "run").mkdir()
    (other / "run" / "thesis.tex").write_text("mine")
    with pytest.raises(ConfigError, match="--run-dir"):
        _run(other, _steps(other, events), events, wait=True)
    assert events == [("before",)]


# ----------------------------------------------------------------------------------- report


def _ev(tmp_path: Path, **kw: Any) -> C.EvaluateConfig:
    return C.EvaluateConfig(run_dir=str(tmp_path / "run"), cluster="local", **kw)


def _report(tmp_path: Path, **kw: Any) -> tuple[Any, FakeBackend]:
    from hpc.stages import ReportStage

    always = kw.pop("always", False)
    stage = ReportStage(_ev(tmp_path, **kw), always=always)
    runs.make_run_dir(stage.layout.root)
    return stage, FakeBackend(stage.layout)


def _written(stage: Any) -> dict[str, Any]:
    stage.layout.results.mkdir(parents=True, exist_ok=True)
    report = {"student": {"overall": {"n": 3}}}
    stage.layout.report_json.write_text(json.dumps(report))
    stage.layout.report_md.write_text("# report\n")
    return {**report, "report_md": str(stage.layout.report_md)}


def test_report_job_runs_after_the_scores_and_is_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stage, backend = _report(tmp_path, lora_model=str(tmp_path / "lora"), compare_base=True)
    after = [FakeHandle(["100_0", "100_1"], ["evaluate"]), DoneHandle([{}], ["merge"])]
    capsys.readouterr()
    handle = stage.submit(backend, after)
    [(calls, spec)] = backend.submitted
    assert [(c.label, c.args) for c in calls] == [
        (
            "report",
            (
                str(stage.layout.root),
                {"student": "evaluate", "base": "evaluate_base"},
                "student + LoRA",
            ),
        )
    ]
    assert type(calls[0].fn).__name__ == "Report"
    assert (spec.after, spec.inline, spec.after_any) == (after, True, True)
    assert spec.name == f"cot-report {stage.layout.root.name}"
    assert handle.job_ids == ["100"]
    assert runs.latest_jobs(stage.layout.root, "report")["job"] == "100"
    assert capsys.readouterr().out.splitlines() == ["report: job 100 (after 100_0, 100_1)"]
    # Without an adapter the student is the base student, and is labelled so.
    stage, backend = _report(tmp_path / "b", teacher=str(tmp_path / "t"))
    stage.submit(backend, [])
    [(calls, _)] = backend.submitted
    assert calls[0].args[1:] == (
        {"student": "evaluate", "teacher": "evaluate_teacher"},
        "base student",
    )
    assert capsys.readouterr().out.splitlines() == ["report: job 100 (after nothing)"]


def test_a_written_report_is_kept_unless_upstream_changed_or_always(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stage, backend = _report(tmp_path)
    expected = _written(stage)
    capsys.readouterr()
    handle = stage.submit(backend, [DoneHandle([{}], ["merge"])])
    assert handle.results() == [expected] and backend.submitted == []
    assert capsys.readouterr().out.splitlines() == ["report: already written"]
    assert stage.is_complete() and stage.outputs() == [
        stage.layout.report_md,
        stage.layout.report_json,
    ]
    # A merge that ran anew, or scores still queued: the report is written again.
    stage.submit(backend, [DoneHandle([{}], ["merge"], fresh=True)])
    stage.submit(backend, [FakeHandle(["5"], ["merge"], new=False)])
    assert len(backend.submitted) == 2
    stage, backend = _report(tmp_path, always=True)
    stage.submit(backend, [])
    assert len(backend.submitted) == 1


def test_a_queued_report_job_is_attached_to_not_resubmitted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stage, backend = _report(tmp_path)
    runs.Submission(stage.layout.root, "report", "fake", job="77")
    backend.alive = {"77"}
    capsys.readouterr()
    handle = stage.submit(backend, [FakeHandle(["50"], ["evaluate"], new=False)])
    assert backend.submitted == [] and backend.attached == [(["77"], ["report"])]
    assert handle.job_ids == ["77"]
    assert capsys.readouterr().out.splitlines() == [
        "report: job 77 is already queued or running; not resubmitted"
    ]
    # Upstream submitted anew: the old report job waits on jobs that will never run.
    stage.submit(backend, [FakeHandle(["60"], ["evaluate"])])
    assert len(backend.submitted) == 1
    # The recorded job has ended: a new one.
    backend.alive = set()
    stage.submit(backend, [])
    assert len(backend.submitted) == 2


def test_report_wait_returns_the_report_or_names_the_failure(tmp_path: Path) -> None:
    stage, backend = _report(tmp_path)
    log = stage.layout.job_log("9")
    failed = FakeHandle(
        ["9"], ["report"], failed=[Failure("report", "9", "FAILED", log, "job 9 FAILED")]
    )
    with pytest.raises(StageFailed) as e:
        stage.wait(backend, failed)
    assert (
        str(e.value)
        == f"report: 1 shard(s) failed for good:\n  report: job 9 FAILED\n    log: {log}"
    )
    assert failed.waited == 1
    # A job (of this launch or an earlier one) that wrote the report: read it.
    expected = _written(stage)
    assert stage.wait(backend, FakeHandle(["9"], ["report"])) == expected
    # Run here: its own result.
    assert stage.wait(backend, DoneHandle([{"r": 1}], ["report"])) == {"r": 1}


def test_report_models_and_headline(tmp_path: Path) -> None:
    from hpc.stages import report_text
    from hpc.stages.report import report_models

    lora, teacher = str(tmp_path / "l"), str(tmp_path / "t")
    assert report_models(_ev(tmp_path)) == {"student": "evaluate"}
    assert report_models(_ev(tmp_path, compare_base=True)) == {"student": "evaluate"}
    assert report_models(_ev(tmp_path, lora_model=lora)) == {"student": "evaluate"}
    assert report_models(_ev(tmp_path, lora_model=lora, compare_base=True, teacher=teacher)) == {
        "student": "evaluate",
        "base": "evaluate_base",
        "teacher": "evaluate_teacher",
    }
    md = tmp_path / "report.md"
    md.write_text("# the report\n")
    overall = {"accuracy": 0.5, "ci95": None, "correct": 2, "scored": 4, "n": 4}
    report = {"report_md": str(md), "student": {"overall": {**overall, "format_compliance": 0.75}}}
    assert report_text(report) == (
        f"report: {md}\naccuracy 50.0% (2/4)  format compliance 75.0%  n=4"
    )
    report["student"]["overall"]["format_compliance"] = None
    assert report_text(report).endswith("format compliance n/a  n=4")
    assert report_text(report, full=True) == f"report: {md}\n# the report\n"


# ------------------------------------------------------------------------- base and wiring


def test_a_one_job_stage_status_row(tmp_path: Path) -> None:
    from hpc.stages import STATUS, ReportStage, TrainStage

    layout = RunLayout(tmp_path / "run")
    info = {"kind": "slurm", "shards": {}, "job": "77"}
    assert Stage.status(layout, "x", info, {"77": "TIMEOUT"}) == {
        "kind": "slurm",
        "jobs": [],
        "state": "TIMEOUT",
        "job": "77",
        "log": str(layout.logs / "77_0_log.err"),
        "failed": 1,
    }
    row = ReportStage.status(layout, "report", {**info, "job": None}, {})
    assert (row["state"], row["job"], row["failed"]) == ("-", None, 0)
    assert row["log"] is None  # no job, no log (was ".../logs/None_0_log.err")
    layout.results.mkdir(parents=True)
    layout.report_json.write_text("{}")
    row = ReportStage.status(layout, "report", info, {"77": "FAILED"})
    assert (row["state"], row["failed"]) == ("COMPLETED", 0)
    assert {
        "generate": ShardedStage,
        "evaluate": ShardedStage,
        "evaluate_base": ShardedStage,
        "evaluate_teacher": ShardedStage,
        "train": TrainStage,
        "report": ReportStage,
    } == STATUS


def test_stage_basics(tmp_path: Path) -> None:
    events: list[Any] = []
    root = tmp_path / "my-run"
    step = Step(root, "a", events)
    assert step.job_name == "cot-a my-run"
    assert step.in_run(root / "train" / "adapter") and step.in_run(str(root))
    assert not step.in_run(tmp_path / "elsewhere") and not step.in_run(None)
    assert not step.in_run("")
    handle = FakeHandle(["1"], ["a"], results=["r1", "r2"])
    assert Stage.wait(step, FakeBackend(step.layout), handle) == "r1" and handle.waited == 1
    assert Stage.wait(step, FakeBackend(step.layout), FakeHandle(["1"], ["a"])) is None
    assert Stage.fingerprint(step) is None and Stage.done_marker(step.layout) is None


def test_evaluation_stages_by_settings(tmp_path: Path) -> None:
    from hpc.stages import evaluation_stages
    from hpc.stages.__init__ import teacher_config

    lora, teacher = str(tmp_path / "l"), str(tmp_path / "t")

    def names(cfg: C.EvaluateConfig, **kw: Any) -> list[tuple[str, tuple[str, ...]]]:
        return [(s.name, s.after) for s in evaluation_stages(cfg, **kw)]

    report_after = ("evaluate", "evaluate_base", "evaluate_teacher")
    assert names(_ev(tmp_path, compare_base=True)) == [("evaluate", ()), ("report", report_after)]
    stages = evaluation_stages(
        _ev(tmp_path, lora_model=lora, compare_base=True, teacher=teacher, output="o.jsonl"),
        after=("train",),
    )
    assert [(s.name, s.after) for s in stages] == [
        ("evaluate", ("train",)),
        ("evaluate_base", ()),
        ("evaluate_teacher", ()),
        ("report", report_after),
    ]
    base, judge = stages[1].cfg, stages[2].cfg  # type: ignore[attr-defined]
    assert (base.lora_model, base.output, base.base_model) == (None, None, "models/student")
    assert (judge.base_model, judge.lora_model, judge.output) == (teacher, None, None)
    assert (judge.prompt_format, judge.compare_base) == ("auto", False)
    assert judge == teacher_config(stages[0].cfg)  # type: ignore[attr-defined]
    assert stages[3].always is False  # type: ignore[attr-defined]
    assert evaluation_stages(_ev(tmp_path))[-1].always is True  # type: ignore[attr-defined]
    # A pipeline's own teacher config wins over the evaluate config's teacher.
    mine = _ev(tmp_path, base_model="my-teacher")
    got = evaluation_stages(_ev(tmp_path, teacher=teacher), teacher=mine)
    assert got[1].cfg is mine  # type: ignore[attr-defined]


# ------------------------------------------------------------------ generate's and evaluate's


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _model(folder: Path, **config: Any) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"weights")
    return folder


def _template(path: Path, text: str = "Q: {question}\nA:") -> Path:
    path.write_text(text)
    return path


def test_generate_stage_checks_and_pins_the_teacher_and_its_prompt(tmp_path: Path) -> None:
    from hpc.stages import GenerateStage
    from jobs.generate import GenerateShard

    teacher = _model(tmp_path / "teacher")
    tpl = _template(tmp_path / "prompt.txt")
    cfg = _cfg(tmp_path, teacher=str(teacher), prompt_template=str(tpl), keep="correct")
    cfg = dataclasses.replace(cfg, samples_per_question=2)
    stage = GenerateStage(cfg)
    assert (stage.name, stage.keep, stage.samples) == ("generate", "correct", 2)
    assert type(stage.worker) is GenerateShard
    stage.validate(set())
    fp = stage.fingerprint()
    assert fp["teacher"] == {
        "path": str(teacher.resolve()),
        "files": {"config.json": _sha(b"{}"), "tokenizer.json": _sha(b"{}")},
    }
    assert fp["prompt_template"] == _sha(b"Q: {question}\nA:")
    assert (fp["stage"], fp["keep"], fp["decoding"]["samples"]) == ("generate", "correct", 2)

    def refused(**kw: Any) -> str:
        with pytest.raises(InputError) as e:
            GenerateStage(dataclasses.replace(cfg, **kw)).validate(set())
        return str(e.value)

    assert refused(teacher=str(tmp_path / "none")).startswith(
        f"model folder {tmp_path / 'none'} does not exist"
    )
    code = _model(tmp_path / "code", auto_map={"AutoModel": "m.M"})
    assert "refusing to run it without --trust-remote-code" in refused(teacher=str(code))
    GenerateStage(dataclasses.replace(cfg, teacher=str(code), trust_remote_code=True)).validate(
        set()
    )
    bad = _template(tmp_path / "bad.txt", "no placeholder")
    assert (
        refused(prompt_template=str(bad))
        == f"prompt template {bad} has no {{question}} placeholder"
    )
    # A model of a running server is a name, not a folder; its template is still checked.
    remote = {"engine": "server", "server_url": "http://h:1/v1", "teacher": "org/teacher"}
    GenerateStage(dataclasses.replace(cfg, **remote)).validate(set())
    assert "has no {question}" in refused(**remote, prompt_template=str(bad))


def _adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    # A safetensors file: an 8-byte header length, the header, then the tensors' bytes.
    (folder / "adapter_model.safetensors").write_bytes(b"\x02" + b"\x00" * 7 + b"{}" + b"tensor")
    return folder


def test_evaluate_stages_check_and_pin_their_models(tmp_path: Path) -> None:
    from cot.models import ModelError
    from hpc.stages import EvaluateStage

    student = _model(tmp_path / "student")
    tpl = _template(tmp_path / "teacher_prompt.txt")
    in_run = tmp_path / "run" / "train" / "adapter"
    cfg = _ev(
        tmp_path,
        input=str(_input(tmp_path)),
        base_model=str(student),
        lora_model=str(in_run),
        teacher_prompt_template=str(tpl),
    )
    stage = EvaluateStage(cfg)
    assert (stage.name, stage.after, stage.keep, stage.worker.teacher) == (
        "evaluate",
        ("train",),
        "all",
        False,
    )
    # An adapter this run's training will write is not there yet: checked only when it is not.
    stage.validate({in_run})
    with pytest.raises(ModelError, match=f"adapter folder {in_run} does not exist"):
        EvaluateStage(cfg).validate(set())
    files = {"config.json": _sha(b"{}"), "tokenizer.json": _sha(b"{}")}
    base_fp = {"path": str(student.resolve()), "files": files}
    fp = stage.fingerprint()
    assert (fp["base_model"], fp["adapter"]) == (
        base_fp,
        {"path": str(in_run), "from": "this run folder"},
    )
    # An adapter from elsewhere: its whole weights are hashed (an adapter's are small).
    lora = _adapter(tmp_path / "lora")
    other = EvaluateStage(dataclasses.replace(cfg, lora_model=str(lora)), after=())
    other.validate(set())
    assert other.fingerprint()["adapter"] == {
        "path": str(lora.resolve()),
        "files": {
            "adapter_config.json": _sha(b"{}"),
            "adapter_model.safetensors": _sha(b"\x02" + b"\x00" * 7 + b"{}" + b"tensor"),
        },
    }
    # The teacher's scores: the teacher prompted as generation prompts it.
    judge = EvaluateStage(dataclasses.replace(cfg, lora_model=None), name="evaluate_teacher")
    assert judge.worker.teacher is True and judge.name == "evaluate_teacher"
    judge.validate(set())
    fp = judge.fingerprint()
    assert (fp["teacher"], fp["prompt_template"]) == (base_fp, _sha(b"Q: {question}\nA:"))
    assert "base_model" not in fp and "adapter" not in fp
    missing = tmp_path / "missing.txt"
    with pytest.raises(InputError, match=f"prompt template {missing} not found"):
        EvaluateStage(
            dataclasses.replace(cfg, lora_model=None, teacher_prompt_template=str(missing)),
            name="evaluate_teacher",
        ).validate(set())
    EvaluateStage(  # only the teacher's scores read that template
        dataclasses.replace(cfg, lora_model=None, teacher_prompt_template=str(missing))
    ).validate(set())
    code = _model(tmp_path / "code", auto_map={"AutoModel": "m.M"})
    with pytest.raises(ModelError, match="without --trust-remote-code"):
        EvaluateStage(dataclasses.replace(cfg, lora_model=None, base_model=str(code))).validate(
            set()
        )
    remote = {"engine": "server", "server_url": "http://h:1/v1", "base_model": "org/student"}
    EvaluateStage(dataclasses.replace(cfg, lora_model=None, **remote)).validate(set())


def test_planning_pins_the_settings_and_a_relaunch_with_others_is_refused(tmp_path: Path) -> None:
    import yaml

    from hpc.errors import PlanError

    stage = _planned(tmp_path)
    pinned = stage.dir.dir / "fingerprint.json"
    assert json.loads(pinned.read_text()) == stage.fingerprint()
    assert stage.planned.shards == 3 and S.load_plan(stage.dir.dir) == stage.planned
    resolved = yaml.safe_load(stage.layout.config.read_text())["generate"]
    assert (resolved["shards"], resolved["input"]) == (3, stage.cfg.input)

    def again(**kw: Any) -> ShardedStage:
        cfg = dataclasses.replace(stage.cfg, **kw)
        return ShardedStage(cfg, LightShard(), name="generate")

    again().refuse_changes()  # the same settings: a relaunch goes on
    with pytest.raises(PlanError) as e:
        again(seed=5).refuse_changes()
    assert str(e.value).startswith(f"{pinned}: refusing to relaunch generate")
    assert "decoding.seed: 0 -> 5" in str(e.value)
    with pytest.raises(PlanError, match="--shards 2 differs from the planned 3"):
        again(shards=2).refuse_changes()
    assert json.loads(pinned.read_text()) == stage.fingerprint()  # refusals wrote nothing


def test_a_selection_of_the_input_is_what_gets_planned(tmp_path: Path) -> None:
    stage = _planned(tmp_path, start_index=2, num_samples=3)
    plan = stage.planned
    assert (plan.num_records, plan.shards) == (3, 3)
    assert plan.selection == {"start_index": 2, "num_samples": 3}
    assert [plan.keys(i) for i in range(3)] == [[("q2", 0)], [("q3", 0)], [("q4", 0)]]
