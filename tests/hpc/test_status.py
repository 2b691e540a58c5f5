"""``status RUN_DIR`` on a synthetic run folder, with a fake ``sacct`` that counts its calls.

The same command against a real Slurm run is tested in tests/jobs/test_generate_slurm.py.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from hpc import runs
from hpc import shards as S
from hpc.launch import main
from hpc.status import collect, render


def _fake_sacct(folder: Path, calls: Path, lines: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sacct"
    body = "".join(f"echo '{line}'\n" for line in lines)
    path.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n{body}')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run_folder(tmp_path: Path, kind: str = "slurm") -> Path:
    run_dir = tmp_path / "run"
    stage_dir = run_dir / "generate"
    src = tmp_path / "q.jsonl"
    ids = [f"q{i}" for i in range(9)]
    src.write_text("".join(json.dumps({"id": i, "question": f"{i}?"}) + "\n" for i in ids))
    plan = S.write_or_check_plan(stage_dir, S.make_plan(src, 3))

    def write(shard: int, n: int) -> None:
        path = S.shard_path(stage_dir, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = plan.keys(shard)[:n]
        path.write_text("".join(json.dumps({"id": k[0], "sample": k[1]}) + "\n" for k in keys))
        S.write_progress(stage_dir, shard, n)  # what the task tells status as it goes

    write(0, 3)
    S.finish_shard(stage_dir, plan, 0)
    write(1, 2)  # running, resumed once
    write(2, 1)  # failed for good
    for shard, starts in ((0, 1), (1, 2), (2, 3)):
        for _ in range(starts):
            S.append_attempt(stage_dir, shard, {"event": "start"})
            S.append_attempt(stage_dir, shard, {"event": "batch", "n": 1})
    runs.Submission(run_dir, "generate", kind, shards={0: "50_0", 1: "50_1", 2: "50_2"}, merge="51")
    return run_dir


def test_status_counts_and_one_sacct_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _run_folder(tmp_path)
    calls = tmp_path / "sacct.calls"
    _fake_sacct(
        tmp_path / "bin",
        calls,
        ["50_0|COMPLETED", "50_1|RUNNING", "50_2|FAILED", "51|PENDING"],
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")

    # status reads markers and progress counters, never a shard's contents (O(shards)).
    S.shard_path(run_dir / "generate", 1).write_text("not read\n" * 100)
    data = collect(run_dir)
    row = data["stages"]["generate"]
    assert (row["done"], row["running"], row["pending"], row["failed"]) == (1, 1, 0, 1)
    assert (row["records"], row["total"], row["requeues"]) == (6, 9, 1 + 2)
    assert row["merge"] == "PENDING" and row["merge_job"] == "51"
    assert row["failed_shards"] == [
        {
            "shard": 2,
            "job": "50_2",
            "state": "FAILED",
            "log": str(run_dir / "logs" / "50_2_0_log.err"),
        }
    ]
    assert len(calls.read_text().splitlines()) == 1

    text = render(data)
    assert "shards 1/3 done  1 running  0 pending  1 failed" in text
    assert "records 6/9  requeues 3  merge PENDING" in text
    assert "jobs 50 (slurm)  merge job 51" in text
    assert f"FAILED shard 00002 job 50_2 FAILED  log {run_dir}/logs/50_2_0_log.err" in text

    # The CLI: one more sacct call, and a non-zero exit because a shard failed for good.
    calls.write_text("")
    assert main(["status", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "shards 1/3 done" in out and "FAILED shard 00002" in out
    assert len(calls.read_text().splitlines()) == 1


def test_status_local_run_calls_no_sacct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _run_folder(tmp_path, kind="local")
    calls = tmp_path / "sacct.calls"
    _fake_sacct(tmp_path / "bin", calls, [])
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    assert main(["status", str(run_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stages"]["generate"]["done"] == 1
    assert not calls.exists()


def test_status_without_accounting_says_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = _run_folder(tmp_path)
    folder = tmp_path / "bin"
    folder.mkdir()
    sacct = folder / "sacct"
    sacct.write_text("#!/bin/sh\necho 'sacct: error: accounting storage is disabled' >&2\nexit 1\n")
    sacct.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:/usr/bin:/bin")
    data = collect(run_dir)
    assert data["sacct"] is False
    row = data["stages"]["generate"]
    assert row["done"] == 1 and row["records"] == 6  # markers and files are still exact
    assert "sacct unavailable" in render(data)


def test_status_empty_folder(tmp_path: Path) -> None:
    assert "nothing launched yet" in render(collect(tmp_path))
