"""More of the stages' wiring, in-process, against the recording fake backend of
tests/hpc/test_stage_wiring.py: what the handles a stage returns tell the caller, what a relaunch
asks the scheduler, how often the launch reads the input, and what validation refuses.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from hpc import config as C
from hpc import runs
from hpc import shards as S
from hpc.backends import Backend, DoneHandle, Handle
from hpc.errors import ConfigError
from hpc.layout import RunLayout
from hpc.stages import ShardedStage
from tests.hpc.test_stage_wiring import (
    FakeBackend,
    Step,
    _cfg,
    _earlier,
    _finish,
    _planned,
    _report,
    _written,
)
from tests.jobs.light_worker import LightShard


def test_a_report_already_written_is_one_completed_call_named_report(tmp_path: Path) -> None:
    stage, backend = _report(tmp_path)
    expected = _written(stage)
    handle = stage.submit(backend, [DoneHandle([{}], ["merge"])])
    # Nothing to wait for, nothing new: the report as read back, its one call COMPLETED.
    assert (handle.job_ids, handle.dependency, handle.new) == ([], [], False)
    assert handle.results() == [expected] and handle.failures() == []
    assert handle.states() == {"report": "COMPLETED"} and handle.state() == "COMPLETED"
    assert backend.submitted == [] and backend.attached == []


def test_a_complete_and_merged_stage_is_one_completed_merge(tmp_path: Path) -> None:
    stage = _planned(tmp_path)
    for i in range(3):
        _finish(stage, i)
    backend = FakeBackend(stage.layout)
    stage.submit(backend, [])  # merges here
    backend.asked_live.clear()
    handle = stage.submit(backend, [])  # nothing to ask the scheduler about
    summary = json.loads(stage.dir.merge_summary.read_text())
    assert (handle.job_ids, handle.dependency, handle.new) == ([], [], False)
    assert handle.results() == [summary] and handle.failures() == []
    assert handle.states() == {"merge": "COMPLETED"} and handle.state() == "COMPLETED"
    assert backend.submitted == [] and backend.asked_live == []


def test_a_relaunch_with_no_merge_recorded_asks_the_scheduler_only_about_the_shards(
    tmp_path: Path,
) -> None:
    stage = _planned(tmp_path)
    _finish(stage, 0)
    # The merge was never recorded (refused, or the launcher died before submitting it).
    _earlier(stage, {0: "50_0", 1: "50_1", 2: "50_2"}, merge=None)
    backend = FakeBackend(stage.layout)
    backend.alive = {"50_2"}
    handle = stage.submit(backend, [])
    assert backend.asked_live == [["50_1", "50_2"]]
    (shards, _), (merge, mspec) = backend.submitted
    assert [c.label for c in shards] == ["shard 00001"] and [c.label for c in merge] == ["merge"]
    assert [(h.job_ids, h.new) for h in mspec.after] == [(["100_0"], True), (["50_2"], False)]
    assert handle.job_ids == ["101"]
    assert runs.latest_jobs(stage.layout.root, "generate")["shards"] == {
        0: "50_0",
        1: "100_0",
        2: "50_2",
    }


def test_the_launch_streams_the_input_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: "The launch streams the input once": validation's scan is what the plan uses."""
    import hpc.stages.sharded as sharded

    scans: list[str] = []
    real = S.scan_questions

    def counted(path: Any, **kw: Any) -> Any:
        scans.append(str(path))
        return real(path, **kw)

    monkeypatch.setattr(sharded, "scan_questions", counted)
    monkeypatch.setattr(S, "scan_questions", counted)
    stage = _planned(tmp_path, start_index=1, num_samples=4)
    assert scans == [stage.cfg.input]
    plan = stage.planned
    assert (plan.num_records, plan.shards) == (4, 3)
    assert plan.selection == {"start_index": 1, "num_samples": 4}
    assert [plan.keys(i) for i in range(3)] == [[("q1", 0)], [("q2", 0)], [("q3", 0), ("q4", 0)]]
    assert S.load_plan(stage.dir.dir) == plan


def test_keep_majority_with_one_sample_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    cfg = _cfg(tmp_path, samples_per_question=1)
    stage = ShardedStage(cfg, LightShard(), name="generate", keep="majority")
    with pytest.raises(ConfigError) as e:
        stage.validate(set())
    assert str(e.value) == (
        "--keep majority votes among several samples of each question: give "
        "--samples-per-question 2 or more (with --temperature > 0)"
    )
    assert not Path(cfg.run_dir).exists()
    voted = dataclasses.replace(cfg, samples_per_question=3, temperature=0.7)
    ShardedStage(voted, LightShard(), name="generate", keep="majority", samples=3).validate(set())


def test_a_stage_built_by_a_later_launch_reads_its_plan_back(tmp_path: Path) -> None:
    first = _planned(tmp_path)
    for i in range(3):
        _finish(first, i)
    first.submit(FakeBackend(first.layout), [])  # merges here
    # A later command (status, wait, a relaunch) builds the stage again without planning it.
    again = ShardedStage(first.cfg, LightShard(), name="generate")
    assert again.planned == first.planned == S.load_plan(first.dir.dir)
    assert again.is_complete()
    handle = again.submit(FakeBackend(again.layout), [])
    assert handle.results() == [json.loads(again.dir.merge_summary.read_text())]


def test_fingerprint_pins_the_server_command(tmp_path: Path) -> None:
    """A relaunch with another server command is another engine: it must differ."""
    cfg = _cfg(tmp_path, engine="server", server_command="serve {model} --port {port}")
    fp = ShardedStage(cfg, LightShard(), name="generate").fingerprint()
    assert fp["engine"] == {
        "engine": "server",
        "prompt_format": "auto",
        "quant": "auto",
        "server": "transformers",
        "server_command": "serve {model} --port {port}",
        "server_url": None,
    }


# ----------------------------------------------------------------------------------- runner


class Checking(FakeBackend):
    """The fake backend, recording every config it is asked to check."""

    def __init__(self, layout: RunLayout, *, sequential: bool = False) -> None:
        super().__init__(layout)
        self.sequential = sequential
        self.checked: list[Any] = []

    def check(self, cfg: Any) -> None:
        self.checked.append(cfg)


class Seen(Step):
    """A runner step with its own config, recording the backend and handles it is given."""

    def __init__(self, root: Path, name: str, events: list[Any], cfg: Any, **kw: Any) -> None:
        super().__init__(root, name, events, **kw)
        if cfg is not None:
            self.cfg = cfg

    def submit(self, backend: Backend, after: Any) -> Handle:
        self.events.append(("submitted to", self.name, backend))
        return super().submit(backend, after)

    def wait(self, backend: Backend, handle: Handle) -> Any:
        self.events.append(("waits on", self.name, backend, handle))
        return super().wait(backend, handle)


@pytest.mark.parametrize("sequential", [False, True])
def test_runner_checks_each_distinct_config_once_and_hands_every_stage_its_backend(
    tmp_path: Path, sequential: bool
) -> None:
    from hpc.stages import run_stages

    root = tmp_path / "run"
    cluster = C.ClusterFields(run_dir=str(root), cluster="local")
    mine = C.ClusterFields(run_dir=str(root), cluster="local", time_min=30)
    events: list[Any] = []
    stages = [
        Seen(root, "a", events, mine),
        Seen(root, "b", events, C.ClusterFields(run_dir=str(root), cluster="local", time_min=30)),
        Seen(root, "c", events, None, after=("a",)),  # no config of its own: the command's
    ]
    backend = Checking(RunLayout(root), sequential=sequential)
    out = run_stages(stages, cluster, wait=True, backend=backend)
    assert backend.checked == [cluster, mine]
    assert out.backend is backend
    handles = [s.handle for s in stages]  # type: ignore[attr-defined]
    assert [e for e in events if e[0] in ("submitted to", "waits on")] == (
        [
            ("submitted to", "a", backend),
            ("waits on", "a", backend, handles[0]),
            ("submitted to", "b", backend),
            ("waits on", "b", backend, handles[1]),
            ("submitted to", "c", backend),
            ("waits on", "c", backend, handles[2]),
        ]
        if sequential
        else [("submitted to", n, backend) for n in "abc"]
        + [("waits on", n, backend, h) for n, h in zip("abc", handles, strict=True)]
    )
    assert out.results == {"a": "a done", "b": "b done", "c": "c done"}


@pytest.mark.parametrize("kind", ["local", "slurm"])
def test_runner_without_a_backend_takes_the_one_the_cluster_setting_names(
    tmp_path: Path, kind: str
) -> None:
    from hpc.backends.local import LocalBackend
    from hpc.backends.slurm import SlurmBackend
    from hpc.stages import run_stages

    root = tmp_path / "run"
    events: list[Any] = []
    cluster = C.ClusterFields(run_dir=str(root), cluster=kind)
    # The step submits nothing: no scheduler is asked anything.
    out = run_stages([Seen(root, "a", events, None)], cluster, wait=False)
    assert type(out.backend) is {"local": LocalBackend, "slurm": SlurmBackend}[kind]
    assert (out.backend.kind, out.backend.why) == (kind, "as requested")
    assert out.backend.layout.root == root
    assert ("submitted to", "a", out.backend) in events
