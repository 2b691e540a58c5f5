"""The shard loop's bookkeeping, in-process: what a task leaves for ``status`` and for the user.

The real :func:`jobs.sharded.run_shard` with a torch-free engine (prompts reversed): the
attempt log (start, lease, resume, requests), the progress counter, the log lines, the
progress bar in a SLURM log, the per-request seeds, the SIGTERM exit and the record prefix the
merge relies on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import socket
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from cot.engines import Completion, Engine, Request, never
from hpc import shards as S
from jobs import sharded as J
from jobs.sharded import ShardWork, Terminated, record_head, request_seed, run_shard, task_info
from tests.jobs.light_worker import LightShard, LightStage
from tests.jobs.test_shard_task import N, _planned

SLURM_ENV = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")


class _Stream:
    """A stderr stand-in: a terminal or a SLURM log file (``isatty``), UTF-8 capable."""

    encoding = "utf-8"

    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


class _Engine(Engine):
    """Reverses each prompt (``tokens`` = its length) in batches of 2, checking ``should_stop``
    between batches; counts what it sent (``sent``, as the server engine does)."""

    def __init__(
        self, hook: Callable[[str, Request | None], None] | None = None, counts: bool = True
    ) -> None:
        self.requests: list[Request] = []
        if counts:
            self.sent = 0
        self.hook = hook or (lambda when, req: None)

    def run(
        self, requests: Sequence[Request], should_stop: Callable[[], bool] = never
    ) -> Iterator[tuple[Request, Completion]]:
        self.hook("start", None)
        for i in range(0, len(requests), 2):
            if should_stop():
                return
            batch = list(requests[i : i + 2])
            self.requests += batch
            if hasattr(self, "sent"):
                self.sent += len(batch)
            for r in batch:
                self.hook("yield", r)
                yield r, Completion(str(r.prompt)[::-1], len(str(r.prompt)))
                self.hook("written", r)
            self.hook("batch", None)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in (*SLURM_ENV, "SUBMITIT_LOCAL_JOB_ID", "SUBMITIT_FOLDER"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def logged(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> pytest.LogCaptureFixture:
    """Captures what jobs.sharded logs (hpc.logs.setup turns propagation off for jobs.*)."""
    monkeypatch.setattr(logging.getLogger("jobs"), "propagate", True)
    caplog.set_level(logging.INFO, logger="jobs.sharded")
    return caplog


def _line(i: int) -> str:
    rec = {"id": f"q{i}", "question": f"question {i}"}
    return json.dumps({**record_head(rec, 0), "cot": f"question {i}"[::-1]}) + "\n"


def _work(input_path: str, engine: Engine, seed: int = 0) -> ShardWork:
    @contextlib.contextmanager
    def session() -> Iterator[Any]:
        yield engine, lambda rec: rec["question"]

    return ShardWork(
        input_path, seed, session, lambda rec, s, c: {**record_head(rec, s), "cot": c.text}
    )


def _events(stage: LightStage) -> list[Any]:
    return [json.loads(line) for line in stage.dir.attempts(0).read_text().splitlines()]


def test_task_info_names_the_slurm_attempt(env: pytest.MonkeyPatch) -> None:
    env.setenv("SLURM_JOB_ID", "4242_3")
    env.setenv("SLURM_ARRAY_JOB_ID", "4242")
    env.setenv("SLURM_ARRAY_TASK_ID", "3")
    env.setenv("SLURM_RESTART_COUNT", "2")
    env.setenv("SUBMITIT_LOCAL_JOB_ID", "999")  # Slurm's id wins
    before = time.time()
    info = task_info()
    assert before <= info.pop("time") <= time.time()
    assert info == {
        "event": "start",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": "4242_3",
        "array_job_id": "4242",
        "array_task_id": "3",
        "restart_count": 2,
    }
    # ``status`` counts requeues from the start lines of the attempt log.
    assert '"start"' in json.dumps(task_info())


def test_task_info_of_a_local_job_falls_back_to_submitit_id(env: pytest.MonkeyPatch) -> None:
    env.setenv("SUBMITIT_LOCAL_JOB_ID", "31337")
    info = task_info()
    del info["time"]
    assert info == {
        "event": "start",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": "31337",
        "array_job_id": None,
        "array_task_id": None,
        "restart_count": 0,
    }


def test_record_head_opens_every_line_with_id_then_sample() -> None:
    rec = {"answer": "3", "question": "1+2?", "category": "arith", "id": "q7", "extra": 1}
    head = record_head(rec, 2)
    assert list(head.items()) == [
        ("id", "q7"),
        ("sample", 2),
        ("category", "arith"),
        ("question", "1+2?"),
    ]
    assert json.dumps(head).startswith('{"id": "q7", "sample": 2, ')
    assert record_head({"id": "q1", "question": "Q"}, 0) == {
        "id": "q1",
        "sample": 0,
        "category": None,
        "question": "Q",
    }


def test_request_seed_is_a_stable_32_bit_function_of_seed_and_key() -> None:
    # Pinned: a run resumed by another version must sample each record with the same seed.
    assert request_seed(0, ("q0", 0)) == 2368970624
    assert request_seed(0, ("q0", 1)) == 2817392895
    assert request_seed(1, ("q0", 0)) == 2708144017
    seeds = {request_seed(s, (f"q{i}", k)) for s in (0, 1, 2) for i in range(20) for k in (0, 1)}
    assert len(seeds) == 120
    assert all(0 <= x < 2**32 for x in seeds)


def test_progress_bar_is_quiet_in_a_slurm_log_and_live_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = {}
    for tty in (False, True):
        stream = _Stream(tty)
        monkeypatch.setattr(sys, "stderr", stream)
        bar = J.progress(10, 3, "shard 4")
        seen[tty] = (
            bar.total,
            bar.n,
            bar.desc,
            bar.mininterval,
            bar.ascii,
            bool(bar.dynamic_ncols),
        )
        bar.update(7)
        bar.close()
        assert "shard 4:  30%|" in stream.text
        assert "| 10/10 [" in stream.text
        assert ("█" in stream.text) is tty  # plain ASCII in a log file
    # A SLURM log gets at most one line per 30 s, in ASCII, at a fixed width.
    assert seen[False] == (10, 3, "shard 4", 30.0, True, False)
    assert seen[True] == (10, 3, "shard 4", 0.5, False, True)


def test_a_resumed_shard_records_its_attempt_and_what_it_did(
    tmp_path: Path, env: pytest.MonkeyPatch, logged: pytest.LogCaptureFixture
) -> None:
    env.setenv("SLURM_JOB_ID", "4242")
    env.setenv("SLURM_ARRAY_JOB_ID", "4240")
    env.setenv("SLURM_ARRAY_TASK_ID", "0")
    env.setenv("SLURM_RESTART_COUNT", "1")
    stderr = _Stream(tty=False)
    env.setattr(sys, "stderr", stderr)
    stage = _planned(tmp_path)
    shard = stage.dir.shard(0)
    shard.parent.mkdir(parents=True)
    shard.write_text(_line(0) + _line(1) + _line(2))
    engine = _Engine()
    before = time.time()
    out = run_shard(stage.dir.dir, 0, _work(stage.cfg.input, engine, seed=7))
    assert out == {"shard": 0, "status": "complete", "records": N, "generated": N - 3}
    assert shard.read_text() == "".join(_line(i) for i in range(N))
    # The seed each request carries depends on the run's seed and its key only.
    assert [(r.key, r.prompt, r.seed) for r in engine.requests] == [
        ((f"q{i}", 0), f"question {i}", request_seed(7, (f"q{i}", 0))) for i in range(3, N)
    ]
    assert request_seed(7, ("q3", 0)) == 3405974328
    # The attempt log: the lease taken, the start (who), the resume (what was on disk), and
    # the end of sending (requests sent, records written).
    lease, start, resume, requests = _events(stage)
    assert lease == {
        "event": "lease",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": "4242",
        "restart_count": 1,
    }
    assert before <= start.pop("time") <= time.time()
    assert start == {
        "event": "start",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": "4242",
        "array_job_id": "4240",
        "array_task_id": "0",
        "restart_count": 1,
    }
    assert resume == {"event": "resume", "on_disk": 3, "todo": N - 3}
    assert requests == {"event": "requests", "sent": N - 3, "done": N - 3}
    assert S.read_progress(stage.dir.dir, 0) == N  # what ``status`` shows for the shard
    # What the user reads in the job's log.
    assert f"shard 0: {N} records, 3 already on disk, {N - 3} to go" in logged.messages
    tokens = sum(len(f"question {i}") for i in range(3, N))
    done = [m for m in logged.messages if m.startswith(f"shard 0: {N - 3} records, ")]
    assert len(done) == 1
    m = re.fullmatch(rf"shard 0: {N - 3} records, (-?\d+) tokens in (-?[\d.]+)s", done[0])
    assert m is not None and int(m[1]) == tokens
    assert 0 <= float(m[2]) < 60
    # The bar in the SLURM log starts at what was on disk and ends at the shard's size.
    assert "shard 0:  30%|" in stderr.text
    assert f"| 3/{N} [" in stderr.text
    assert f"| {N}/{N} [" in stderr.text
    assert f"{N + 1}/{N}" not in stderr.text


def test_an_engine_without_a_sent_count_logs_none(tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    stage = _planned(tmp_path)
    run_shard(stage.dir.dir, 0, _work(stage.cfg.input, _Engine(counts=False)))
    assert _events(stage)[-1] == {"event": "requests", "sent": None, "done": N}


def test_progress_is_rewritten_every_5_s_while_the_shard_runs(
    tmp_path: Path, env: pytest.MonkeyPatch
) -> None:
    """``status`` reads progress/<shard>: the count on disk at the start, then every 5 s."""
    stage = _planned(tmp_path)
    shard = stage.dir.shard(0)
    shard.parent.mkdir(parents=True)
    shard.write_text(_line(0) + _line(1) + _line(2))
    clock = [1000.0]
    env.setattr(
        J,
        "time",
        types.SimpleNamespace(time=time.time, sleep=time.sleep, monotonic=lambda: clock[0]),
    )
    seen: list[int] = []

    def hook(when: str, req: Request | None) -> None:
        if when == "yield":
            clock[0] += 2.5  # each completion takes 2.5 s
        elif when in ("start", "written"):
            seen.append(S.read_progress(stage.dir.dir, 0))

    run_shard(stage.dir.dir, 0, _work(stage.cfg.input, _Engine(hook)))
    # At the start: the 3 on disk; then after each of the 7 completions, rewritten each 5 s.
    assert seen == [3, 3, 5, 5, 7, 7, 9, 9]
    assert S.read_progress(stage.dir.dir, 0) == N


def test_sigterm_stops_with_143_and_leaves_progress_and_attempts(
    tmp_path: Path, env: pytest.MonkeyPatch, logged: pytest.LogCaptureFixture
) -> None:
    stage = _planned(tmp_path)

    def hook(when: str, req: Request | None) -> None:
        if when == "batch":
            os.kill(os.getpid(), signal.SIGTERM)  # Slurm ends the attempt after the first batch

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as stop:
        run_shard(stage.dir.dir, 0, _work(stage.cfg.input, _Engine(hook)))
    assert stop.value.code == 128 + 15  # what Slurm and the shell report for SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before
    assert "shard 0: SIGTERM, stopping at a record boundary" in logged.messages
    assert stage.dir.shard(0).read_text() == _line(0) + _line(1)
    assert not stage.dir.marker(0).exists()
    assert S.read_progress(stage.dir.dir, 0) == 2
    assert [e["event"] for e in _events(stage)] == ["lease", "start", "resume", "requests"]
    assert _events(stage)[2:] == [
        {"event": "resume", "on_disk": 0, "todo": N},
        {"event": "requests", "sent": 2, "done": 2},
    ]


def test_a_relaunch_with_the_input_moved_reads_it_at_its_new_path(
    tmp_path: Path, env: pytest.MonkeyPatch
) -> None:
    """The plan keeps the path it was made from; a relaunch with the same bytes elsewhere is
    accepted (same sha256) and its tasks read the input they were given."""
    stage = _planned(tmp_path, seed=11)
    moved = tmp_path / "moved.jsonl"
    Path(stage.cfg.input).rename(moved)
    cfg = dataclasses.replace(stage.cfg, input=str(moved))
    relaunch = LightStage(cfg, LightShard())
    relaunch.plan()  # the plan on disk still names q.jsonl
    engine = _Engine()

    @contextlib.contextmanager
    def session() -> Iterator[Any]:
        yield engine, lambda rec: rec["question"]

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        out = J.run_configured_shard(
            cfg,
            "generate",
            0,
            open_engine=session,
            to_record=lambda rec, s, c: {**record_head(rec, s), "cot": c.text},
        )
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert out == {"shard": 0, "status": "complete", "records": N, "generated": N}
    assert stage.dir.shard(0).read_text() == "".join(_line(i) for i in range(N))
    assert [r.seed for r in engine.requests] == [request_seed(11, (f"q{i}", 0)) for i in range(N)]
