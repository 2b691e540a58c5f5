"""Unit tests of the SLURM backend (hpc/backends/slurm.py), in-process and without a cluster.

``sbatch`` is a fake on PATH that keeps each script it is given (submitit runs it); ``sacct``,
``squeue`` and ``scontrol`` are answered by a fake ``subprocess.run`` that records every call.
"""

from __future__ import annotations

import logging
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from submitit.core.utils import DelayedSubmission

from hpc.backends import Call, Failure, Resources
from hpc.backends import slurm as E
from hpc.backends.slurm import SlurmBackend
from hpc.config import ClusterFields
from hpc.errors import ConfigError, SchedulerError, StageFailed
from hpc.layout import RunLayout


def _echo(*args: object) -> tuple[str, tuple[object, ...]]:
    return "ran", args


class Hung(Exception):
    """What a scheduler command without a timeout does when its daemon never answers."""


class FakeRun:
    """Stands for ``subprocess.run``: answers each program from ``answers`` and records calls.

    A program not on PATH is not found; one missing from ``answers`` never answers: it times
    out when a timeout is given and raises :class:`Hung` when none is.
    """

    def __init__(self, answers: dict[str, tuple[int, str, str]] | None = None) -> None:
        self.answers = answers or {}
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        if shutil.which(argv[0]) is None:  # as the real one: only installed programs run
            raise FileNotFoundError(argv[0])
        self.calls.append(list(argv))
        if argv[0] not in self.answers:
            if kw.get("timeout") is None:
                raise Hung(argv[0])
            raise subprocess.TimeoutExpired(argv, kw["timeout"])
        rc, out, err = self.answers[argv[0]]
        if kw.get("check") and rc:
            raise subprocess.CalledProcessError(rc, argv, out, err)
        return subprocess.CompletedProcess(argv, rc, out, err)


def _executable(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture()
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """PATH is only this folder (so no real Slurm command is ever reached)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", str(folder))
    monkeypatch.chdir(tmp_path)
    E.max_array_size.cache_clear()
    yield folder
    E.max_array_size.cache_clear()


@pytest.fixture()
def fake_run(bin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> FakeRun:
    """``sacct``, ``squeue`` and ``scontrol`` installed; their answers set on the returned fake."""
    for name in ("sacct", "squeue", "scontrol"):
        _executable(bin_dir, name, "exit 99")  # never run: subprocess.run is the fake
    run = FakeRun()
    monkeypatch.setattr(subprocess, "run", run)
    return run


@pytest.fixture()
def fake_sbatch(bin_dir: Path, tmp_path: Path) -> Path:
    """An ``sbatch`` that keeps each script as ``scripts/<job id>.sh`` (ids from 101), an
    ``srun``, and an ``scontrol`` that reports ``MaxArraySize = 4``. Shell builtins only."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    counter = tmp_path / "counter"
    counter.write_text("100\n")
    _executable(
        bin_dir,
        "sbatch",
        f"read n < {counter}; n=$((n+1)); echo $n > {counter}\n"
        'while IFS= read -r line || [ -n "$line" ]; do printf \'%s\\n\' "$line"; done'
        f' < "$1" > {scripts}/$n.sh\n'
        'echo "Submitted batch job $n"',
    )
    _executable(bin_dir, "scontrol", "printf 'MaxArraySize            = 4\\n'")
    _executable(bin_dir, "srun", "exit 1")
    return scripts


def _sbatch_lines(scripts: Path, job: int) -> list[str]:
    return [ln for ln in (scripts / f"{job}.sh").read_text().splitlines() if ln.startswith("#SB")]


def _srun_args(scripts: Path, job: int) -> list[str]:
    (line,) = [ln for ln in (scripts / f"{job}.sh").read_text().splitlines() if ln[:5] == "srun "]
    return line.split()


def _cfg(tmp_path: Path, **fields: Any) -> ClusterFields:
    return ClusterFields(run_dir=str(tmp_path / "run"), **fields)


def _calls(n: int) -> list[Call]:
    return [Call(_echo, (i, f"in{i}"), f"shard {i}") for i in range(n)]


def _pickled(logs: Path, job_id: str) -> DelayedSubmission:
    """The call a job runs, as submitit pickled it for the job's process."""
    return DelayedSubmission.load(logs / f"{job_id}_submitted.pkl")


# --------------------------------------------------------------------------- submission


def test_one_call_is_one_plain_job_with_every_cluster_field(
    fake_sbatch: Path, tmp_path: Path
) -> None:
    layout = RunLayout(tmp_path / "run")
    cfg = _cfg(
        tmp_path,
        partition="gpu",
        account="acc",
        qos="high",
        mem_gb=8,
        time_min=60,
        signal_delay_s=120,
        max_num_timeout=5,
        array_parallelism=2,
    )
    seen: list[tuple[list[int], list[str]]] = []
    handle = SlurmBackend(layout).submit(
        [Call(_echo, (7, "x"), "train")],
        cfg=cfg,
        name="cot-train run",
        resources=Resources(gpus_per_node=2),
        on_submit=lambda idx, ids: seen.append((idx, ids)),
    )
    assert handle.job_ids == ["101"] and handle.new and handle.arrays == ["101"]
    assert seen == [([0], ["101"])]
    logs = tmp_path / "run" / "logs"
    assert _sbatch_lines(fake_sbatch, 101) == [
        "#SBATCH --account=acc",
        "#SBATCH --cpus-per-task=2",
        f"#SBATCH --error={logs}/%j_0_log.err",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --job-name='cot-train run'",
        "#SBATCH --mem=8GB",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={logs}/%j_0_log.out",
        "#SBATCH --partition=gpu",
        "#SBATCH --qos=high",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --time=60",
        "#SBATCH --wckey=submitit",
    ]
    # One process: no srun option to end the step on a crashed rank.
    assert "--kill-on-bad-exit=1" not in _srun_args(fake_sbatch, 101)
    # The job runs exactly the call given, and may be requeued max_num_timeout times.
    job = _pickled(logs, "101")
    assert job.result() == ("ran", (7, "x"))
    assert job._timeout_countdown == 5
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700  # the folder holds pickles of configs


def test_calls_beyond_max_array_size_are_several_arrays_each_recorded_at_once(
    fake_sbatch: Path, tmp_path: Path
) -> None:
    layout = RunLayout(tmp_path / "run")
    seen: list[tuple[list[int], list[str]]] = []
    handle = SlurmBackend(layout).submit(
        _calls(6),
        cfg=_cfg(tmp_path, array_parallelism=2, max_num_timeout=0),
        name="cot-generate run",
        on_submit=lambda idx, ids: seen.append((idx, ids)),
    )
    ids = ["101_0", "101_1", "101_2", "101_3", "102_0", "102_1"]
    assert handle.job_ids == ids
    assert seen == [([0, 1, 2, 3], ids[:4]), ([4, 5], ids[4:])]
    assert handle.labels == [f"shard {i}" for i in range(6)]
    assert handle.dependency == handle.arrays == ["101", "102"]
    assert "#SBATCH --array=0-3%2" in _sbatch_lines(fake_sbatch, 101)
    assert "#SBATCH --array=0-1%2" in _sbatch_lines(fake_sbatch, 102)
    logs = tmp_path / "run" / "logs"
    for i, job_id in enumerate(ids):  # each task runs its own call
        job = _pickled(logs, job_id)
        assert job.result() == ("ran", (i, f"in{i}"))
        assert job._timeout_countdown == 0
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700


def test_two_calls_are_one_array_of_two_tasks(fake_sbatch: Path, tmp_path: Path) -> None:
    handle = SlurmBackend(RunLayout(tmp_path / "run")).submit(
        _calls(2), cfg=_cfg(tmp_path), name="x"
    )
    assert handle.job_ids == ["101_0", "101_1"]
    assert "#SBATCH --array=0-1%2" in _sbatch_lines(fake_sbatch, 101)
    assert not (fake_sbatch / "102.sh").exists()


def test_dependency_names_every_array_and_attached_job(fake_sbatch: Path, tmp_path: Path) -> None:
    backend = SlurmBackend(RunLayout(tmp_path / "run"))
    cfg = _cfg(tmp_path)
    shards = backend.submit(_calls(5), cfg=cfg, name="x")  # arrays 101 and 102
    earlier = backend.attach(["55_3", "55_3", "60"], ["shard 3", "shard 3 again", "merge"])
    assert earlier.dependency == ["55_3", "60"]  # a task of an old array by its own id
    assert not earlier.new and earlier.arrays == []
    # An array after them (the afterok default), and a merge after any end.
    backend.submit(_calls(2), cfg=cfg, name="x", after=[shards, earlier])
    backend.submit(_calls(3), cfg=cfg, name="x", after=[shards], after_any=True)
    backend.submit(_calls(1), cfg=cfg, name="x", after=[earlier], after_any=True)
    for job in (101, 102):
        assert not any("dep" in ln.split("=")[0] for ln in _sbatch_lines(fake_sbatch, job))
    expected = {
        103: "#SBATCH --dependency=afterok:101:102:55_3:60",
        104: "#SBATCH --dependency=afterany:101:102",
        105: "#SBATCH --dependency=afterany:55_3:60",
    }
    for job, line in expected.items():
        lines = _sbatch_lines(fake_sbatch, job)
        flags = [ln for ln in lines if "dep" in ln.split("=")[0]]
        assert flags == [line, "#SBATCH --kill-on-invalid-dep=yes"]


@pytest.mark.parametrize(
    ("nodes", "tasks", "kill_on_bad_exit"), [(1, 1, False), (1, 2, True), (2, 1, True)]
)
def test_one_crashed_rank_ends_a_multi_process_step(
    fake_sbatch: Path, tmp_path: Path, nodes: int, tasks: int, kill_on_bad_exit: bool
) -> None:
    SlurmBackend(RunLayout(tmp_path / "run")).submit(
        [Call(_echo, (), "train")],
        cfg=_cfg(tmp_path),
        name="x",
        resources=Resources(nodes=nodes, tasks_per_node=tasks),
    )
    assert ("--kill-on-bad-exit=1" in _srun_args(fake_sbatch, 101)) is kill_on_bad_exit
    assert f"#SBATCH --ntasks-per-node={tasks}" in _sbatch_lines(fake_sbatch, 101)


def test_unsafe_job_name_or_log_folder_is_refused_by_name(
    fake_sbatch: Path, tmp_path: Path
) -> None:
    backend = SlurmBackend(RunLayout(tmp_path / "run"))
    msg = "{} {!r} contains a newline, carriage return or NUL; it would break the sbatch script"
    with pytest.raises(ConfigError) as err:
        backend.submit(_calls(1), cfg=_cfg(tmp_path), name="cot-x\nrun")
    assert str(err.value) == msg.format("job name", "cot-x\nrun")
    bad_run = tmp_path / "ru\rn"
    backend = SlurmBackend(RunLayout(bad_run))
    with pytest.raises(ConfigError) as err:
        backend.submit(_calls(1), cfg=ClusterFields(run_dir=str(tmp_path)), name="cot-x run")
    assert str(err.value) == msg.format("log folder", str(bad_run / "logs"))
    assert list(fake_sbatch.iterdir()) == []


def test_slurm_backend_never_falls_back_to_running_here(bin_dir: Path, tmp_path: Path) -> None:
    """Without ``srun`` the SLURM backend refuses to submit (submitit would pick local)."""
    _executable(bin_dir, "sbatch", "echo 'Submitted batch job 7'")
    with pytest.raises(RuntimeError, match="srun"):
        SlurmBackend(RunLayout(tmp_path / "run")).submit(_calls(1), cfg=_cfg(tmp_path), name="x")
    assert not list((tmp_path / "run" / "logs").glob("*.pkl"))


# --------------------------------------------------------------------------- scheduler queries


@pytest.mark.parametrize(
    ("rc", "stdout", "up"),
    [
        (0, "Slurmctld(primary) at head is UP\n", True),
        (0, "Slurmctld(primary) at head is DOWN\n", False),
        (1, "Slurmctld(primary) at head is DOWN\n", False),
    ],
)
def test_controller_answers_only_when_scontrol_ping_says_up(
    fake_run: FakeRun, rc: int, stdout: str, up: bool
) -> None:
    fake_run.answers["scontrol"] = (rc, stdout, "")
    assert E.controller_answers() is up
    assert fake_run.calls == [["scontrol", "ping"]]


def test_controller_check_never_hangs_or_crashes(
    fake_run: FakeRun, bin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert E.controller_answers(timeout_s=0.5) is False  # scontrol never answers: timed out
    fake_run.answers["scontrol"] = (0, "UP", "")

    def broken(argv: list[str], **kw: Any) -> None:
        raise PermissionError(argv[0])

    monkeypatch.setattr(subprocess, "run", broken)
    assert E.controller_answers() is False
    (bin_dir / "scontrol").unlink()
    monkeypatch.setattr(subprocess, "run", fake_run)
    assert E.controller_answers() is False  # not installed: nothing is run
    assert fake_run.calls == [["scontrol", "ping"]]


def test_job_states_is_one_batched_sacct_call(fake_run: FakeRun) -> None:
    fake_run.answers["sacct"] = (
        0,
        "101_[2-3,7%1]|PENDING\n101_0|COMPLETED\n101_1|CANCELLED by 1000\n"
        "102|RUNNING\n103|\nsacct: no pipe here\n",
        "",
    )
    got = E.job_states(["101_0", "101_1", "101_2", "102", "103", "", "101_0"])
    assert fake_run.calls == [
        ["sacct", "-n", "-P", "-X", "--format=JobID,State", "-j", "101,102,103"]
    ]
    assert got == {
        "101_2": "PENDING",
        "101_3": "PENDING",
        "101_7": "PENDING",
        "101_0": "COMPLETED",
        "101_1": "CANCELLED",
        "102": "RUNNING",
        "103": "UNKNOWN",
    }


def test_job_states_is_none_when_sacct_cannot_answer(fake_run: FakeRun, bin_dir: Path) -> None:
    assert E.job_states([]) == {} and E.job_states(["", ""]) == {}
    assert fake_run.calls == []  # no jobs: nothing to ask
    assert E.job_states(["5"]) is None  # sacct never answers: timed out, not hung
    fake_run.answers["sacct"] = (1, "", "sacct: error: Slurm accounting storage is disabled")
    assert E.job_states(["5"]) is None
    (bin_dir / "sacct").unlink()
    assert E.job_states(["5"]) is None
    assert len(fake_run.calls) == 2


def test_backend_states_says_unknown_for_what_sacct_lacks(
    fake_run: FakeRun, tmp_path: Path
) -> None:
    backend = SlurmBackend(RunLayout(tmp_path / "run"))
    assert backend.states(["12", "13_1"]) is None  # sacct never answers
    fake_run.answers["sacct"] = (0, "12|TIMEOUT\n", "")
    assert backend.states(["12", "", "13_1"]) == {"12": "TIMEOUT", "13_1": "UNKNOWN"}


def test_live_jobs_asks_squeue_only_about_what_sacct_lacks(fake_run: FakeRun) -> None:
    fake_run.answers["sacct"] = (0, "7_0|RUNNING\n7_1|COMPLETED\n8|PENDING\n", "")
    fake_run.answers["squeue"] = (0, "7_[2-3]\n", "")
    assert E.live_jobs(["7_0", "7_1", "7_2", "8", "", "9"]) == {"7_0", "7_2", "8"}
    assert fake_run.calls[1:] == [["squeue", "-h", "-o", "%i", "-j", "7,9"]]
    assert E.live_jobs([]) == set() and len(fake_run.calls) == 2


def test_live_jobs_raises_when_neither_sacct_nor_squeue_answers(fake_run: FakeRun) -> None:
    fake_run.answers["squeue"] = (1, "", "slurm_load_jobs error: Unable to contact controller\n")
    with pytest.raises(SchedulerError) as err:
        E.live_jobs(["7_0"])
    assert str(err.value) == (
        "squeue does not answer: slurm_load_jobs error: Unable to contact controller"
    )
    # squeue exits 1 for a job it has forgotten: that job is simply not live.
    fake_run.answers["squeue"] = (1, "", "slurm_load_jobs error: Invalid job id specified\n")
    assert E.live_jobs(["7_0", "7"]) == set()


def test_max_array_size_from_scontrol_or_slurms_default(fake_run: FakeRun) -> None:
    fake_run.answers["scontrol"] = (0, "MaxJobCount = 10000\nMaxArraySize            = 40\n", "")
    assert E.max_array_size() == 40
    E.max_array_size.cache_clear()
    fake_run.answers["scontrol"] = (0, "MaxJobCount = 10000\n", "")
    assert E.max_array_size() == 1001
    E.max_array_size.cache_clear()
    fake_run.answers["scontrol"] = (1, "", "slurm_load_ctl_conf error")
    assert E.max_array_size() == 1001


# --------------------------------------------------------------------------- handles


def test_failures_name_the_job_its_state_and_its_log(
    fake_sbatch: Path, bin_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _executable(bin_dir, "sacct", "exit 99")  # never run: subprocess.run is the fake
    layout = RunLayout(tmp_path / "run")
    handle = SlurmBackend(layout).submit(_calls(3), cfg=_cfg(tmp_path), name="x")
    run = FakeRun({"sacct": (0, "101_0|COMPLETED\n101_1|OUT_OF_MEMORY\n101_2|RUNNING\n", "")})
    monkeypatch.setattr(subprocess, "run", run)
    assert handle.failures() == [
        Failure(
            "shard 1",
            "101_1",
            "OUT_OF_MEMORY",
            layout.logs / "101_1_0_log.err",
            "job 101_1 OUT_OF_MEMORY",
        )
    ]
    assert handle.states() == {
        "shard 0": "COMPLETED",
        "shard 1": "OUT_OF_MEMORY",
        "shard 2": "RUNNING",
    }
    assert len(run.calls) == 1  # states() reuses the last poll


def test_attached_handle_polls_until_every_job_has_ended(
    fake_run: FakeRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COT_HPC_POLL_S", "0.001")
    layout = RunLayout(tmp_path / "run")
    handle = SlurmBackend(layout).attach(["20_1", "21"], ["shard 1", "merge"])
    answers = iter(
        ["20_1|RUNNING\n21|PENDING\n", "20_1|COMPLETED\n", "20_1|COMPLETED\n21|FAILED\n"]
    )
    polls: list[dict[str, str]] = []

    def on_poll() -> None:
        polls.append(handle.states())
        fake_run.answers["sacct"] = (0, next(answers, ""), "")

    fake_run.answers["sacct"] = (0, next(answers), "")
    handle.wait(on_poll)
    assert polls == [
        {"shard 1": "RUNNING", "merge": "PENDING"},
        {"shard 1": "COMPLETED", "merge": "UNKNOWN"},  # not in sacct yet: still waited on
        {"shard 1": "COMPLETED", "merge": "FAILED"},
    ]
    assert handle.failures() == [
        Failure("merge", "21", "FAILED", layout.job_log("21"), "job 21 FAILED")
    ]
    with pytest.raises(StageFailed) as err:
        handle.results()
    assert str(err.value) == "no results: these jobs were submitted by an earlier launch"


def test_too_short_time_limit_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = SlurmBackend(RunLayout(tmp_path / "run"))
    with caplog.at_level(logging.WARNING, logger="hpc.backends.slurm"):
        backend.check(_cfg(tmp_path, time_min=2, signal_delay_s=90))
        backend.check(_cfg(tmp_path, time_min=3, signal_delay_s=90))
    assert [r.getMessage() for r in caplog.records] == [
        "warning: --time-min 2 leaves no working time before the USR2 sent 90 s (+ up to 30 s)"
        " before the limit; every attempt would be checkpointed and requeued at once. Raise"
        " --time-min or lower --signal-delay-s."
    ]


class _Job:
    """A submitit job as the handle uses it: ``done`` and ``results``."""

    def __init__(self, job_id: str, result: object = None, error: str = "", polls: int = 1):
        self.job_id, self.result, self.error, self.polls = job_id, result, error, polls

    def done(self, force_check: bool = False) -> bool:
        self.polls -= 1  # done at the poll-th check
        return self.polls <= 0

    def results(self) -> list[object]:
        if self.error:
            raise RuntimeError(self.error)
        return [self.result]


def test_handle_of_new_jobs_ends_its_wait_when_submitit_says_done_and_gives_results(
    fake_run: FakeRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COT_HPC_POLL_S", "7")
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        if len(sleeps) == 2:
            raise AssertionError("polled on after every job was done")
        sleeps.append(seconds)

    monkeypatch.setattr(E.time, "sleep", sleep)
    layout = RunLayout(tmp_path / "run")
    jobs = [_Job("40_0", {"rows": 3}), _Job("40_1", [1], polls=2)]
    handle = E.SlurmHandle(layout, ["40_0", "40_1"], ["shard 0", "shard 1"], jobs)
    fake_run.answers["sacct"] = (0, "40_0|COMPLETED\n", "")  # slurmdbd lags behind
    handle.wait()
    assert sleeps == [7.0]  # the second task was still running at the first poll
    assert handle.states() == {"shard 0": "COMPLETED", "shard 1": "UNKNOWN"}
    assert handle.results() == [{"rows": 3}, [1]]
    traceback = "\n".join(
        ["Job (task=0) failed", "-" * 40, "Traceback:", "  ...", "ValueError: bad row 7", "-" * 40]
    )
    handle = E.SlurmHandle(layout, ["41"], ["merge"], [_Job("41", error=traceback)])
    with pytest.raises(StageFailed) as err:
        handle.results()
    assert str(err.value) == "job failed: ValueError: bad row 7"
