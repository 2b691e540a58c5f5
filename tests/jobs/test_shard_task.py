"""The shard task's promises, fast: the real shard loop with a string "model" (light_worker).

No torch and no Slurm: resume, recovery of a torn tail, the changed-input guard and an
idempotent relaunch, each checked by counting what the task generated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hpc import config as C
from hpc import shards as S
from hpc.errors import PlanError
from hpc.layout import RunLayout
from hpc.runs import make_run_dir
from tests.jobs.light_worker import LightShard, LightStage

N = 10


class CountingShard(LightShard):
    """:class:`LightShard` that remembers every prompt it was asked to generate."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.sleep_s = 0.0


def _planned(tmp_path: Path, shards: int = 1, seed: int = 0) -> LightStage:
    inp = tmp_path / "q.jsonl"
    inp.write_text(
        "".join(json.dumps({"id": f"q{i}", "question": f"question {i}"}) + "\n" for i in range(N))
    )
    cfg = C.GenerateConfig(
        run_dir=str(tmp_path / "run"),
        input=str(inp),
        shards=shards,
        batch_size=2,
        cluster="local",
        seed=seed,
    )
    stage = LightStage(cfg, LightShard())
    stage.validate(set())
    make_run_dir(RunLayout(Path(stage.cfg.run_dir)).root)
    stage.plan()
    return stage


def _line(i: int) -> str:
    return json.dumps({"id": f"q{i}", "sample": 0, "cot": f"question {i}"[::-1]}) + "\n"


def test_resume_generates_only_the_missing_keys(tmp_path: Path) -> None:
    stage = _planned(tmp_path)
    shard = stage.dir.shard(0)
    shard.parent.mkdir(parents=True)
    shard.write_text(_line(0) + _line(1) + _line(2))
    worker = CountingShard()
    out = worker(stage.cfg, 0)
    assert out["generated"] == N - 3
    assert worker.asked == [f"question {i}" for i in range(3, N)]
    assert shard.read_text() == "".join(_line(i) for i in range(N))
    assert stage.dir.marker(0).exists()


def test_a_valid_last_line_without_newline_is_dropped_and_redone(tmp_path: Path) -> None:
    stage = _planned(tmp_path)
    shard = stage.dir.shard(0)
    shard.parent.mkdir(parents=True)
    shard.write_text(_line(0) + _line(1) + _line(2).rstrip("\n"))  # whole JSON, torn line
    worker = CountingShard()
    assert worker(stage.cfg, 0)["generated"] == N - 2
    assert worker.asked[0] == "question 2"
    assert shard.read_text() == "".join(_line(i) for i in range(N))


def test_an_input_changed_after_planning_raises_and_leaves_no_marker(tmp_path: Path) -> None:
    stage = _planned(tmp_path)
    inp = Path(stage.cfg.input)
    inp.write_text(inp.read_text().replace("question 7", "question 8"))
    worker = CountingShard()
    with pytest.raises(PlanError, match="the input changed since the launch"):
        worker(stage.cfg, 0)
    assert worker.asked == []
    assert not stage.dir.marker(0).exists()


def test_a_local_relaunch_of_a_finished_stage_runs_no_shard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hpc.stages import run_stages

    stage = _planned(tmp_path, shards=2)
    run_stages([LightStage(stage.cfg, LightShard())], stage.cfg, wait=True)
    assert S.completed(stage.dir.dir) == {0, 1}
    starts = [stage.dir.attempts(i).read_text() for i in (0, 1)]
    capsys.readouterr()
    run_stages([LightStage(stage.cfg, LightShard())], stage.cfg, wait=True)
    assert "generate: 2 shards, 0 to run" in capsys.readouterr().out
    assert [stage.dir.attempts(i).read_text() for i in (0, 1)] == starts  # nothing started


def test_sigterm_stops_at_a_record_boundary_and_the_rerun_finishes(tmp_path: Path) -> None:
    """A bare ``scontrol requeue`` or ``scancel``: SIGTERM, then SIGKILL after KillWait. The task
    stops before its next batch, every line on disk whole, no marker; the rerun completes it."""
    import os
    import signal

    from jobs.sharded import Terminated

    stage = _planned(tmp_path)
    worker = CountingShard()
    real_generate = LightShard.__call__

    class Signalled(CountingShard):
        def __call__(self, cfg: Any, shard: int, stage: str = "generate") -> dict[str, Any]:
            import jobs.sharded as J

            real = J.DurableAppender

            class Appender(real):  # type: ignore[misc,valid-type]
                def write(self, recs: Any) -> int:
                    n: int = super().write(recs)
                    os.kill(os.getpid(), signal.SIGTERM)  # arrives right after the first record
                    return n

            J.DurableAppender = Appender  # type: ignore[misc]
            try:
                return real_generate(self, cfg, shard, stage)
            finally:
                J.DurableAppender = real  # type: ignore[misc]

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        Signalled()(stage.cfg, 0)
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is restored
    # The batch in hand (2 records) is written; the next batch is never started.
    assert stage.dir.shard(0).read_text() == _line(0) + _line(1)
    assert not stage.dir.marker(0).exists()
    assert worker(stage.cfg, 0)["generated"] == N - 2
    assert stage.dir.shard(0).read_text() == "".join(_line(i) for i in range(N))


def test_jobs_that_run_after_their_upstream_ended_check_its_output_first(tmp_path: Path) -> None:
    """Stage-to-stage dependencies are afterany: a job that starts after its upstream failed
    must stop at once, naming the input that is missing, before it loads anything."""
    from cot.errors import InputError
    from cot.models import ModelError
    from jobs.evaluate import EvaluateShard
    from jobs.train import Train

    missing = tmp_path / "run" / "train" / "adapter"
    ev = C.resolve_paths(
        C.EvaluateConfig(run_dir=str(tmp_path / "run"), lora_model=str(missing), cluster="local")
    )
    with pytest.raises(ModelError, match=f"adapter folder {missing} does not exist"):
        EvaluateShard()(ev, 0)
    data = tmp_path / "run" / "generate" / "merged.jsonl"
    tr = C.resolve_paths(
        C.TrainConfig(run_dir=str(tmp_path / "run"), data=str(data), out_dir=str(tmp_path / "out"))
    )
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)}
    try:  # the job installs its preemption handlers first
        with pytest.raises(InputError, match=f"training data {data} does not exist"):
            Train()(tr)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert not (tmp_path / "out").exists()
