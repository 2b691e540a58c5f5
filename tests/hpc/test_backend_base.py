"""Unit tests of the Backend interface (hpc/backends/base.py), the local backend's launcher side
(hpc/backends/local.py, with a fake submitit executor: nothing leaves this process) and the
backend choice (hpc/backends/__init__.py)."""

from __future__ import annotations

import itertools
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hpc.backends import local
from hpc.backends.base import (
    ONE_TASK,
    Backend,
    Call,
    DependencyFailed,
    DoneHandle,
    Failure,
    Handle,
    Resources,
    Spec,
    env_exports,
    failure_line,
    failure_text,
    job_env,
    last_error,
    poll_interval,
)
from hpc.backends.local import LocalBackend, LocalHandle, poll_delays
from hpc.config import REPO_ROOT, ClusterFields
from hpc.errors import StageFailed
from hpc.layout import RunLayout

# --------------------------------------------------------------------------- failure lines


def _submitit_error(trace: str, task: int = 0) -> str:
    """The text of submitit's FailedJobError (submitit/core/core.py, Job.exception)."""
    return (
        f"Job (task={task}) failed during processing with trace:\n"
        f"----------------------\n{trace}\n"
        "----------------------\n"
        f"You can check full logs with 'job.stderr({task})' and 'job.stdout({task})'"
        "or at paths:\n  - /run/logs/7_0_log.err\n  - /run/logs/7_0_log.out"
    )


def test_failure_line_is_the_exception_line_of_the_trace_at_most_300_chars() -> None:
    trace = (
        "Traceback (most recent call last):\n"
        '  File "jobs/sharded.py", line 3, in run\n'
        "    raise ValueError(...)\n"
        "ValueError: q.jsonl:3: field 'question': missing\n\n"
    )
    assert failure_line(_submitit_error(trace)) == (
        "ValueError: q.jsonl:3: field 'question': missing"
    )
    long = "RuntimeError: " + "x" * 400
    assert failure_line(_submitit_error(long)) == long[:300]
    assert failure_line("no rules here\n  last words  \n") == "last words"
    assert failure_line("   \n\n") == "failed"


# --------------------------------------------------------------------------- last_error


def _log(tmp_path: Path, data: bytes, name: str = "7_0_log.err") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "line",
    [
        "ValueError: q.jsonl:3: field 'question': missing",
        "submitit.core.utils.UncompletedJobException: job 7 ended early",
        "Job not requeued because: checkpoint function returned None.",
        "Caught signal SIGUSR2 on node1: this job is timed-out.",
        "slurmstepd: error: *** JOB 7 ON node1 CANCELLED AT 2024-05-01T10:00:00 ***",
        "/bin/sh: line 1: 4242 Killed python -m jobs.sharded",
    ],
)
def test_last_error_finds_each_kind_of_verdict(tmp_path: Path, line: str) -> None:
    log = _log(tmp_path, f"loading model\n{line}   \nshutting down cleanly\n".encode())
    assert last_error(log) == line


def test_last_error_gives_the_last_verdict_cut_at_300_chars(tmp_path: Path) -> None:
    long = "RuntimeError: " + "y" * 400
    data = f"KeyError: 'a'\nstep 3\nOSError: disk\nstep 4\n{long}\ndone\n"
    assert last_error(_log(tmp_path, data.encode())) == long[:300]
    assert last_error(_log(tmp_path, b"step 1\nstep 2\n", "quiet.err")) is None
    assert last_error(tmp_path / "missing.err") is None  # no log: no cause, no crash


def test_last_error_reads_exactly_the_last_tail_bytes(tmp_path: Path) -> None:
    data = b"Killed by the OOM killer\n" + b"step\n" * 40
    log = _log(tmp_path, data)
    assert last_error(log, tail_bytes=len(data)) == "Killed by the OOM killer"
    assert last_error(log, tail_bytes=len(data) - 1) is None  # "illed by..." is no verdict
    assert last_error(log, tail_bytes=len(data) + 100) == "Killed by the OOM killer"


def test_last_error_survives_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    log = _log(tmp_path, b"\xe9t\xe9\nRuntimeError: bad \xff byte\nbye\n")
    assert last_error(log) == "RuntimeError: bad \ufffd byte"


# --------------------------------------------------------------------------- failure_text


def test_failure_text_names_every_task_its_cause_and_its_log(tmp_path: Path) -> None:
    log1 = _log(tmp_path, b"loading\nValueError: q.jsonl:3: bad\n", "7_0_log.err")
    log2 = tmp_path / "8_0_log.err"  # never written: no cause line
    failed = [
        Failure("shard 00001", "7", "FAILED", log1, "ValueError: q.jsonl:3: bad"),
        Failure("shard 00002", "8", "TIMEOUT", log2, "TIMEOUT"),
    ]
    assert failure_text("generate", failed) == (
        "generate: 2 shard(s) failed for good:\n"
        "  shard 00001: ValueError: q.jsonl:3: bad\n"
        "    cause: ValueError: q.jsonl:3: bad\n"
        f"    log: {log1}\n"
        "  shard 00002: TIMEOUT\n"
        f"    log: {log2}"
    )


# --------------------------------------------------------------------------- environment


def test_poll_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COT_HPC_POLL_S", raising=False)
    assert poll_interval() == 30.0
    monkeypatch.setenv("COT_HPC_POLL_S", "2.5")
    assert poll_interval() == 2.5


def test_job_env_and_its_shell_exports(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ClusterFields(cpus_per_task=3)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # the shell's values do not leak in
    env = {
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "3",
    }
    assert job_env(cfg) == env
    pythonpath = f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"
    assert env_exports(cfg) == [
        "export PYTHONUNBUFFERED=1",
        "export HF_HUB_OFFLINE=1",
        "export TRANSFORMERS_NO_ADVISORY_WARNINGS=1",
        "export TOKENIZERS_PARALLELISM=false",
        "export OMP_NUM_THREADS=3",
        pythonpath,
    ]
    monkeypatch.setenv("DS_ACCELERATOR", "cpu x")  # passed on as the launcher has it, quoted
    assert job_env(cfg) == {**env, "DS_ACCELERATOR": "cpu x"}
    assert env_exports(cfg)[-2:] == ["export DS_ACCELERATOR='cpu x'", pythonpath]


# --------------------------------------------------------------------------- handles


class _Fixed(Handle):
    """A handle whose states are given."""

    def __init__(self, states: dict[str, str]):
        self.labels, self._states = list(states), states

    @property
    def job_ids(self) -> list[str]:
        return []

    @property
    def dependency(self) -> list[str]:
        return []

    def states(self) -> dict[str, str]:
        return dict(self._states)

    def wait(self, on_poll: Callable[[], None] | None = None) -> None:
        return None

    def results(self) -> list[Any]:
        return []

    def failures(self) -> list[Failure]:
        return []


FAILED = ["FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL"]
FAILED += ["DEADLINE", "PREEMPTED", "REVOKED"]
ACTIVE = ["PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING"]
ACTIVE += ["SUSPENDED", "CONFIGURING", "COMPLETING", "SIGNALING", "STAGE_OUT"]


def test_state_of_a_submission_failed_beats_active_beats_completed() -> None:
    def state(*values: str) -> str:
        return _Fixed({f"shard {i}": v for i, v in enumerate(values)}).state()

    assert state() == "COMPLETED"
    assert state("COMPLETED", "COMPLETED") == "COMPLETED"
    for s in FAILED:  # every Slurm failure state is a failure, even beside running tasks
        assert state("COMPLETED", s, "RUNNING", "PENDING") == s
    for s in ACTIVE:
        assert state("COMPLETED", s) == s
    assert state("TIMEOUT", "OUT_OF_MEMORY", "FAILED") == "FAILED"
    assert state("RUNNING", "PENDING") == "PENDING"
    assert state("UNKNOWN") == "UNKNOWN"
    # A task the scheduler cannot say anything about is never hidden behind COMPLETED.
    assert state("COMPLETED", "UNKNOWN") == "UNKNOWN"
    assert state("COMPLETED", "-") == "-"
    assert _Fixed({}).new is True and _Fixed({}).arrays == []


def test_done_handle_is_complete_and_new_only_when_it_did_work() -> None:
    done = DoneHandle(["merged"], ["merge"], fresh=True)
    assert done.new is True
    assert (done.job_ids, done.dependency, done.arrays, done.failures()) == ([], [], [], [])
    assert done.states() == {"merge": "COMPLETED"} and done.state() == "COMPLETED"
    assert done.wait() is None
    done.results().append("junk")  # a caller's list is its own
    assert done.results() == ["merged"]
    assert DoneHandle().new is False and DoneHandle().results() == []


# --------------------------------------------------------------------------- Backend.submit


class _Recorder(Backend):
    """A backend that records what submit() hands it."""

    def _submit(self, calls: list[Call], spec: Spec) -> Handle:
        self.seen = (calls, spec)
        return DoneHandle()

    def attach(self, job_ids: Sequence[str], labels: Sequence[str]) -> Handle:
        return DoneHandle()

    def live(self, job_ids: Sequence[str]) -> set[str]:
        return set()

    def states(self, job_ids: Sequence[str]) -> dict[str, str] | None:
        return None

    @property
    def poll_s(self) -> float:
        return 1.0


def test_submit_passes_every_option_in_one_spec(tmp_path: Path) -> None:
    backend, cfg = _Recorder(RunLayout(tmp_path)), ClusterFields(time_min=5)
    assert (backend.kind, backend.why, backend.sequential) == ("", "", False)
    calls = (Call(print, ("a",), "shard 00000"),)
    backend.submit(calls, cfg=cfg, name="generate")
    assert backend.seen == (list(calls), Spec(cfg, "generate", ONE_TASK, [], False, None, False))
    assert Resources(nodes=1, tasks_per_node=1, gpus_per_node=0) == ONE_TASK
    dep, shape = DoneHandle(), Resources(2, 4, 1)
    backend.submit(
        calls, cfg=cfg, name="train", resources=shape, after=(dep,), inline=True,
        on_submit=print, after_any=True,
    )  # fmt: skip
    assert backend.seen[1] == Spec(cfg, "train", shape, [dep], True, print, True)
    assert backend.placement(shape) == shape and backend.check(cfg) is None


# --------------------------------------------------------------------------- local backend


class _Job:
    def __init__(self, job_id: int, fn: Callable[..., Any], args: tuple[Any, ...]):
        self.job_id, self.finished = job_id, False
        self.error: Exception | None = None
        try:
            self.value = fn(*args)
        except Exception as e:  # as submitit's FailedJobError, with the trace between rules
            self.error = RuntimeError(_submitit_error(f"{type(e).__name__}: {e}"))

    def done(self) -> bool:
        return self.finished

    def exception(self) -> Exception | None:
        assert self.finished, "asked a running job for its exception"
        return self.error

    def results(self) -> list[Any]:
        assert self.finished, "asked a running job for its results"
        if self.error is not None:
            raise self.error
        return [self.value]


class _Executor:
    """submitit's AutoExecutor, without processes: jobs end when the test says so."""

    def __init__(self, folder: str = "", cluster: str = ""):
        self.folder, self.cluster, self.params, self.jobs = folder, cluster, {}, []

    def update_parameters(self, **params: Any) -> None:
        self.params.update(params)

    def submit(self, fn: Callable[..., Any], *args: Any) -> _Job:
        self.jobs.append(_Job(100 + len(self.jobs), fn, args))
        return self.jobs[-1]

    def finish_running(self) -> None:
        for job in self.jobs:
            job.finished = True


def _boom(question: str) -> str:
    raise ValueError(f"q.jsonl:3: field {question!r}: missing")


def test_local_submits_as_slots_free_up_and_records_ids_once_all_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[_Executor] = []

    def make(self: LocalBackend, cfg: ClusterFields, res: Resources) -> _Executor:
        made.append(_Executor())
        return made[-1]

    monkeypatch.setattr(LocalBackend, "_executor", make)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        assert len(sleeps) < 10, "wait() never saw the calls end"

    monkeypatch.setattr(local, "time", SimpleNamespace(sleep=sleep))
    recorded: list[tuple[list[int], list[str]]] = []
    layout = RunLayout(tmp_path / "run")
    backend = LocalBackend(layout)
    calls = [Call(str.upper, ("a",), "shard 00000"), Call(str.upper, ("b",), "shard 00001")]
    cfg = ClusterFields(time_min=1, local_parallelism=1)
    handle = backend.submit(
        calls, cfg=cfg, name="generate", on_submit=lambda *a: recorded.append(a)
    )
    assert isinstance(handle, LocalHandle) and len(made) == 1
    assert layout.logs.is_dir() and layout.logs.stat().st_mode & 0o777 == 0o700
    assert handle.job_ids == handle.dependency == ["100"] and recorded == []
    assert handle.failures() == []  # nothing ended yet

    seen: list[dict[str, str]] = []

    def on_poll() -> None:
        seen.append(handle.states())
        made[0].finish_running()

    handle.wait(on_poll)
    assert seen == [
        {"shard 00000": "RUNNING", "shard 00001": "PENDING"},
        {"shard 00000": "COMPLETED", "shard 00001": "RUNNING"},
    ]
    assert sleeps == [0.05]  # one poll between them, none after the last call ended
    assert recorded == [([0, 1], ["100", "101"])]
    assert handle.job_ids == ["100", "101"] and len(made) == 1
    assert handle.results() == ["A", "B"] and handle.state() == "COMPLETED"
    assert handle.failures() == [] and handle.new is True


def test_local_failure_is_reported_with_its_job_and_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ex = _Executor()
    monkeypatch.setattr(LocalBackend, "_executor", lambda self, cfg, res: ex)
    layout = RunLayout(tmp_path)
    calls = [Call(str.upper, ("a",), "shard 00000"), Call(_boom, ("question",), "shard 00001")]
    handle = LocalBackend(layout).submit(calls, cfg=ClusterFields(time_min=1), name="generate")
    assert handle.states() == {"shard 00000": "RUNNING", "shard 00001": "RUNNING"}
    assert handle.failures() == []
    ex.finish_running()
    why = "ValueError: q.jsonl:3: field 'question': missing"
    assert handle.states() == {"shard 00000": "COMPLETED", "shard 00001": "FAILED"}
    assert handle.failures() == [
        Failure("shard 00001", "101", "FAILED", layout.logs / "101_0_log.err", why)
    ]
    with pytest.raises(StageFailed) as e:
        handle.results()
    assert str(e.value) == why


def test_local_executor_parameters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import submitit

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    made: list[_Executor] = []

    def auto_executor(folder: str, cluster: str) -> _Executor:
        made.append(_Executor(folder, cluster))
        return made[-1]

    monkeypatch.setattr(submitit, "AutoExecutor", auto_executor)
    layout = RunLayout(tmp_path)
    backend = LocalBackend(layout)
    cfg = ClusterFields(time_min=7, cpus_per_task=3, local_parallelism=4)
    call = Call(str.upper, ("a",), "train")
    backend.submit([call], cfg=cfg, name="train", resources=Resources(2, 3, 1))
    backend.submit([call], cfg=cfg, name="generate")
    assert [(ex.folder, ex.cluster) for ex in made] == [(str(layout.logs), "local")] * 2
    common = {"timeout_min": 7, "nodes": 1, "cpus_per_task": 3, "local_setup": env_exports(cfg)}
    assert made[0].params == {**common, "tasks_per_node": 6, "gpus_per_node": 1}
    assert made[1].params == {**common, "tasks_per_node": 1}  # no GPU asked: none named


def test_local_backend_facts(tmp_path: Path) -> None:
    backend = LocalBackend(RunLayout(tmp_path))
    assert (backend.kind, backend.why, backend.sequential) == ("local", "as requested", True)
    assert LocalBackend(RunLayout(tmp_path), "no SLURM controller answers").why == (
        "no SLURM controller answers"
    )
    assert backend.poll_s == 1.0
    assert list(itertools.islice(poll_delays(), 8)) == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    # one "node": a 2-node shape runs all 8 ranks here, with the GPUs of one node
    assert backend.placement(Resources(2, 4, 1)) == Resources(1, 8, 1)
    old = backend.attach(["7_0", "7_1"], ["shard 00000", "shard 00001"])
    assert isinstance(old, DoneHandle) and old.new is False and old.results() == []
    assert old.states() == {"shard 00000": "COMPLETED", "shard 00001": "COMPLETED"}
    assert backend.live(["7_0"]) == set()
    assert backend.states(["7_0", "8"]) == {"7_0": "-", "8": "-"}


class _Dep(_Fixed):
    """An upstream submission that has ended, with the given failures."""

    def __init__(self, failed: list[Failure]):
        super().__init__({f.label: f.state for f in failed})
        self.failed, self.waited = failed, 0

    def wait(self, on_poll: Callable[[], None] | None = None) -> None:
        self.waited += 1

    def failures(self) -> list[Failure]:
        return list(self.failed)


def test_local_dependencies_are_waited_for_and_a_failed_one_stops_the_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ex = _Executor()
    monkeypatch.setattr(LocalBackend, "_executor", lambda self, cfg, res: ex)
    backend, cfg = LocalBackend(RunLayout(tmp_path)), ClusterFields(time_min=1)
    bad = Failure("shard 00003", "9", "FAILED", tmp_path / "9_0_log.err", "ValueError: bad")
    ok, failed = _Dep([]), _Dep([bad])
    merge = [Call(str.upper, ("m",), "merge")]

    handle = backend.submit(merge, cfg=cfg, name="generate", after=[ok], inline=True)
    assert (ok.waited, handle.results(), handle.labels, handle.new) == (1, ["M"], ["merge"], True)
    assert ex.jobs == []  # an inline step runs here, not as a job

    for inline in (False, True):
        with pytest.raises(DependencyFailed) as e:
            backend.submit(merge, cfg=cfg, name="generate", after=[ok, failed], inline=inline)
        assert str(e.value) == failure_text("generate", [bad])
        assert e.value.failures == [bad] and ex.jobs == []
    assert failed.waited == 2

    # after_any: the step runs anyway; if it fails, the failed upstream tasks are named
    handle = backend.submit(merge, cfg=cfg, name="g", after=[failed], inline=True, after_any=True)
    assert handle.results() == ["M"]
    with pytest.raises(DependencyFailed) as e:
        backend.submit(
            [Call(_boom, ("q",), "merge")], cfg=cfg, name="g", after=[failed, ok], inline=True,
            after_any=True,
        )  # fmt: skip
    assert str(e.value) == failure_text("g", [bad]) and e.value.failures == [bad]
    with pytest.raises(ValueError, match="field 'q': missing"):  # no failed upstream: its own
        backend.submit([Call(_boom, ("q",), "merge")], cfg=cfg, name="g", inline=True)
    handle = backend.submit(merge, cfg=cfg, name="g", after=[failed], after_any=True)
    assert handle.job_ids == ["100"]  # submitted as a job despite the failed upstream


# --------------------------------------------------------------------------- backend choice


def test_choose_backend_announces_the_choice_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hpc.backends import choose_backend, for_kind, slurm

    layout = RunLayout(tmp_path)
    monkeypatch.setattr(slurm, "controller_answers", lambda: True)
    chosen = choose_backend("auto", layout)
    assert (chosen.kind, chosen.why) == ("slurm", "a SLURM controller answers")
    assert "cluster: slurm (a SLURM controller answers)" in capsys.readouterr().err
    monkeypatch.setattr(slurm, "controller_answers", lambda: False)
    chosen = choose_backend("auto", layout)
    assert (chosen.kind, chosen.why) == ("local", "no SLURM controller answers")
    assert "cluster: local (no SLURM controller answers)" in capsys.readouterr().err
    chosen = choose_backend("local", layout, announce=False)
    assert (chosen.kind, chosen.why, capsys.readouterr().err) == ("local", "as requested", "")
    assert choose_backend("slurm", layout, announce=False).kind == "slurm"
    kinds = [for_kind(k, layout).kind for k in ("slurm", "local", None, "")]
    assert kinds == ["slurm", "local", "local", "local"]
    assert for_kind("slurm", layout).layout == layout
