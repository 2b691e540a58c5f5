"""Unit tests of hpc/backends: pure logic and the sbatch scripts (fake commands on PATH)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpc.backends import choose_backend, failure_line, failure_text, job_env
from hpc.backends import slurm as E
from hpc.layout import RunLayout


def _fake_bin(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture()
def only_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """PATH holds only a fresh folder of fake commands (plus /bin for the shebang's sh)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", str(folder))
    E.max_array_size.cache_clear()
    yield folder
    E.max_array_size.cache_clear()


# --------------------------------------------------------------------------- chunks


@pytest.mark.parametrize(
    ("n", "size", "expected"),
    [
        (8, 3, [(0, 3), (3, 6), (6, 8)]),
        (3, 3, [(0, 3)]),  # N == MaxArraySize: one array
        (4, 3, [(0, 3), (3, 4)]),  # N == MaxArraySize + 1: two arrays
        (1, 1001, [(0, 1)]),
        (2002, 1001, [(0, 1001), (1001, 2002)]),
        (0, 5, []),
    ],
)
def test_chunks(n: int, size: int, expected: list[tuple[int, int]]) -> None:
    parts = E.chunks(n, size)
    assert [(p.start, p.stop) for p in parts] == expected
    assert [i for p in parts for i in p] == list(range(n))
    assert all(len(p) <= size for p in parts)


# --------------------------------------------------------------------------- sacct ids


@pytest.mark.parametrize(
    ("job_id", "expected"),
    [
        ("12", ["12"]),
        ("12_3", ["12_3"]),
        ("12.batch", ["12.batch"]),
        ("12_[4]", ["12_4"]),
        ("12_[0-3]", ["12_0", "12_1", "12_2", "12_3"]),
        ("12_[0-2,7%2]", ["12_0", "12_1", "12_2", "12_7"]),
        ("345_[1,3-4,9]", ["345_1", "345_3", "345_4", "345_9"]),
        ("7_[5-7%256]", ["7_5", "7_6", "7_7"]),
    ],
)
def test_expand_array_ids(job_id: str, expected: list[str]) -> None:
    assert E.expand(job_id) == expected


def test_job_ids_distinct_array_roots() -> None:
    class J:
        def __init__(self, job_id: str) -> None:
            self.job_id = job_id

    jobs = [J("10_0"), J("10_1"), J("11_0"), J("12"), J("10_2")]
    assert E.root_ids([j.job_id for j in jobs]) == ["10", "11", "12"]


def test_job_states_one_sacct_call_parses_arrays(only_path: Path, tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    _fake_bin(
        only_path,
        "sacct",
        f'echo "$@" >> {calls}\n'
        "for l in '20_0|COMPLETED' '20_1|CANCELLED by 0' '20_[2-4%2]|PENDING' '21|RUNNING' '22|'\n"
        'do echo "$l"; done',
    )
    states = E.job_states(["20_0", "20_3", "21", "22", "21"])
    assert states == {
        "20_0": "COMPLETED",
        "20_1": "CANCELLED",
        "20_2": "PENDING",
        "20_3": "PENDING",
        "20_4": "PENDING",
        "21": "RUNNING",
        "22": "UNKNOWN",
    }
    lines = calls.read_text().splitlines()
    assert len(lines) == 1
    assert "-j 20,21,22" in lines[0]


def test_job_states_without_sacct(only_path: Path) -> None:
    assert E.job_states([]) == {}
    assert E.job_states(["5_1"]) is None  # no sacct on PATH: unknown, not "no jobs"
    _fake_bin(only_path, "sacct", "echo 'sacct: error: Slurm accounting disabled' >&2; exit 1")
    assert E.job_states(["5_1"]) is None


# --------------------------------------------------------------------------- choose_cluster


def test_choose_cluster_auto_without_scontrol_is_local(
    only_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not (only_path / "scontrol").exists()
    assert choose_backend("auto", RunLayout(only_path)).kind == "local"
    assert "cluster: local (no SLURM controller answers)" in capsys.readouterr().err


def test_choose_cluster_auto_with_dead_controller_is_local(only_path: Path) -> None:
    # srun/sbatch/scontrol installed but no controller: submitit alone would pick slurm.
    for name in ("srun", "sbatch", "sinfo"):
        _fake_bin(only_path, name, "exit 0")
    _fake_bin(only_path, "scontrol", "echo 'Slurmctld(primary) at h is DOWN'; exit 1")
    assert choose_backend("auto", RunLayout(only_path), announce=False).kind == "local"


def test_choose_cluster_auto_with_live_controller_is_slurm(only_path: Path) -> None:
    _fake_bin(only_path, "scontrol", "echo 'Slurmctld(primary) at h is UP'")
    assert choose_backend("auto", RunLayout(only_path), announce=False).kind == "slurm"


@pytest.mark.parametrize("kind", ["slurm", "local"])
def test_choose_cluster_explicit(only_path: Path, kind: str) -> None:
    assert choose_backend(kind, RunLayout(only_path), announce=False).kind == kind


# --------------------------------------------------------------------------- MaxArraySize


def test_max_array_size_from_scontrol(only_path: Path) -> None:
    _fake_bin(
        only_path,
        "scontrol",
        "printf 'MaxArraySize            = 3\\nMaxJobCount             = 10000\\n'",
    )
    assert E.max_array_size() == 3


def test_max_array_size_default_without_scontrol(only_path: Path) -> None:
    assert E.max_array_size() == E.DEFAULT_MAX_ARRAY_SIZE == 1001


def test_job_env_threads_and_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpc.config import GenerateConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # jobs stay offline whatever the shell says
    env = job_env(GenerateConfig(cpus_per_task=3))
    assert env["OMP_NUM_THREADS"] == "3"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert os.environ.get("HF_HUB_OFFLINE") == "0"  # reading it changed nothing


# --------------------------------------------------------------------------- failures


def _bad_shard() -> None:
    raise ValueError("q.jsonl:3: field 'question': missing")


def test_local_failure_names_the_exception_not_the_log_paths(tmp_path: Path) -> None:
    from hpc.backends import Call
    from hpc.backends.local import LocalBackend
    from hpc.config import ClusterFields

    backend = LocalBackend(RunLayout(tmp_path))
    handle = backend.submit(
        [Call(_bad_shard, (), "shard 00001")], cfg=ClusterFields(time_min=1), name="x"
    )
    handle.wait()
    (failed,) = handle.failures()
    assert failed.label == "shard 00001"
    assert failed.why == "ValueError: q.jsonl:3: field 'question': missing"
    assert failed.log.exists() and failed.log.name.endswith("_0_log.err")
    text = failure_text("generate", [failed])
    assert "shard 00001: ValueError: q.jsonl:3: field 'question': missing" in text
    assert f"log: {failed.log}" in text
    assert handle.state() == "FAILED"


def _merge_ok() -> str:
    return "merged"


def _merge_missing() -> str:
    raise RuntimeError("cannot merge, 1 of 2 shards are not complete")


def test_local_after_any_runs_the_step_and_names_failures_only_when_it_fails(
    tmp_path: Path,
) -> None:
    from hpc.backends import Call, DependencyFailed
    from hpc.backends.local import LocalBackend
    from hpc.config import ClusterFields

    backend, cfg = LocalBackend(RunLayout(tmp_path)), ClusterFields(time_min=1)
    shards = backend.submit([Call(_bad_shard, (), "shard 00001")], cfg=cfg, name="x")
    ok = backend.submit(
        [Call(_merge_ok, (), "merge")], cfg=cfg, name="x", after=[shards], inline=True,
        after_any=True,
    )  # fmt: skip
    assert ok.results() == ["merged"]  # the step checks its inputs; a failed task is no veto
    with pytest.raises(DependencyFailed, match="shard 00001: ValueError") as e:
        backend.submit(
            [Call(_merge_missing, (), "merge")], cfg=cfg, name="x", after=[shards], inline=True,
            after_any=True,
        )  # fmt: skip
    assert [f.label for f in e.value.failures] == ["shard 00001"]
    with pytest.raises(DependencyFailed):  # without after_any a failed task stops the step
        backend.submit([Call(_merge_ok, (), "merge")], cfg=cfg, name="x", after=[shards])


def test_failure_line_of_plain_text() -> None:
    assert failure_line("plain error") == "plain error"
    assert failure_line("") == "failed"


def test_local_backend_leaves_the_launcher_environment_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hpc.backends import Call
    from hpc.backends.local import LocalBackend
    from hpc.config import ClusterFields

    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    before = dict(os.environ)
    backend = LocalBackend(RunLayout(tmp_path))
    handle = backend.submit(
        [Call(_env_of_job, (), "probe")], cfg=ClusterFields(time_min=1, cpus_per_task=3), name="x"
    )
    (env,) = handle.results()
    assert dict(os.environ) == before
    assert env["HF_HUB_OFFLINE"] == "1" and env["OMP_NUM_THREADS"] == "3"
    assert env["PYTHONUNBUFFERED"] == "1"


def _env_of_job() -> dict[str, str]:
    names = ("HF_HUB_OFFLINE", "OMP_NUM_THREADS", "PYTHONUNBUFFERED")
    return {k: os.environ.get(k, "") for k in names}


def test_every_stage_limit_is_checked_once(tmp_path: Path) -> None:
    """A pipeline gives each stage its own --time-min: the runner checks each stage's limits
    with the backend, and identical ones once."""
    from hpc.backends.local import LocalBackend
    from hpc.config import ClusterFields
    from hpc.stages import runner

    seen: list[int] = []

    class Probe(LocalBackend):
        def check(self, cfg: ClusterFields) -> None:
            seen.append(cfg.time_min)

    class Quiet:
        name, after = "x", ()

        def __init__(self, time_min: int) -> None:
            self.cfg = ClusterFields(run_dir=str(tmp_path / "run"), time_min=time_min)

        def validate(self, produced: set[Path]) -> None: ...
        def outputs(self) -> list[Path]:
            return []

        def refuse_changes(self) -> None: ...
        def plan(self) -> None: ...
        def submit(self, backend: object, after: object) -> object:
            from hpc.backends import DoneHandle

            return DoneHandle()

        def wait(self, backend: object, handle: object) -> None: ...

    stages = [Quiet(5), Quiet(60), Quiet(5)]
    backend = Probe(RunLayout(tmp_path / "run"))
    runner.run_stages(stages, stages[0].cfg, wait=False, backend=backend)  # type: ignore[arg-type]
    assert seen == [5, 60]
