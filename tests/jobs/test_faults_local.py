"""Faults without a cluster: full disk mid-shard, torn lines, a second launch, bad relaunches."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from hpc import shards as S
from hpc.launch import main
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def gen_args(run: Path, inp: Path, *extra: str) -> list[str]:
    return [
        "generate",
        "--cluster",
        "local",
        "--run-dir",
        str(run),
        "--input",
        str(inp),
        "--teacher",
        str(REPO / "models/tiny/teacher"),
        "--temperature",
        "0",
        "--max-new-tokens",
        "64",
        "--batch-size",
        "4",
        "--local-parallelism",
        "1",
        *extra,
    ]


def run_shard_inline(run: Path, inp: Path, shard: int = 0) -> dict:  # type: ignore[type-arg]
    """Plan a 1-shard stage, then run its task in this process (so faults can be injected)."""
    from hpc import config as C
    from jobs.generate import GenerateShard

    cfg = C.load_config(
        C.GenerateConfig,
        "generate",
        None,
        {
            "run_dir": str(run),
            "input": str(inp),
            "teacher": str(REPO / "models/tiny/teacher"),
            "temperature": 0.0,
            "max_new_tokens": 64,
            "batch_size": 4,
            "cpus_per_task": 2,
        },
    )
    S.write_or_check_plan(
        run / "generate", S.make_plan(inp, 1, 1, {"start_index": 0, "num_samples": None})
    )
    return GenerateShard()(C.resolve_paths(cfg), shard)  # type: ignore[no-any-return]


def test_disk_full_mid_shard_leaves_no_marker_and_resumes(
    tiny_models: Path, small_questions: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import jobs.sharded as J

    real = J.DurableAppender
    calls = {"n": 0}

    class Flaky(real):  # type: ignore[misc,valid-type]
        def write(self, records: Any) -> int:
            calls["n"] += 1
            if calls["n"] == 3:  # a torn partial write, as a full disk leaves
                self._fh.write(json.dumps(next(iter(records)))[:20])
                self._fh.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            n: int = super().write(records)
            return n

    monkeypatch.setattr(J, "DurableAppender", Flaky)
    run = tmp_path / "run"
    with pytest.raises(OSError, match=r"00000\.jsonl: writing shard 0 failed \(No space left"):
        run_shard_inline(run, small_questions)
    stage = run / "generate"
    assert not S.marker_path(stage, 0).exists()
    assert S.completed(stage) == set()
    monkeypatch.setattr(J, "DurableAppender", real)
    result = run_shard_inline(run, small_questions)
    assert result["status"] == "complete" and result["generated"] == 24 - 2  # 2 records were whole
    lines = S.shard_path(stage, 0).read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [
        json.loads(x)["id"] for x in small_questions.read_text().splitlines()
    ]


def test_torn_last_line_is_dropped_on_resume(
    tiny_models: Path, small_questions: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run_shard_inline(run, small_questions)
    stage = run / "generate"
    full = S.shard_path(stage, 0).read_text()
    # Undo completion: remove the marker, keep 10 records and half of the 11th.
    S.marker_path(stage, 0).unlink()
    lines = full.splitlines(keepends=True)
    S.shard_path(stage, 0).write_text("".join(lines[:10]) + lines[10][: len(lines[10]) // 2])
    result = run_shard_inline(run, small_questions)
    assert result["generated"] == 24 - 10
    assert S.shard_path(stage, 0).read_text() == full


def test_second_launch_refuses_while_first_holds_the_lock(
    tiny_models: Path, small_questions: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hpc.runs import make_run_dir, run_lock

    run = make_run_dir(tmp_path / "run")
    entered, release = threading.Event(), threading.Event()

    def holder() -> None:
        with run_lock(run):
            entered.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    entered.wait(10)
    try:
        assert main(gen_args(run, small_questions)) == 2
    finally:
        release.set()
        t.join()
    assert "is locked by another launch" in capsys.readouterr().err
    assert not (run / "generate").exists()


def test_input_changed_between_launch_and_relaunch(
    tiny_models: Path, small_questions: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    out = tmp_path / "out.jsonl"
    assert main(gen_args(run, small_questions, "--shards", "2", "--output", str(out))) == 0
    before = out.read_bytes()
    with open(small_questions, "a") as fh:
        fh.write(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    assert main(gen_args(run, small_questions, "--shards", "2", "--output", str(out))) == 2
    err = capsys.readouterr().err
    assert "refusing to relaunch" in err and "differs from the planned input" in err
    assert out.read_bytes() == before
    # Same input, other shard count: refused too.
    small_questions.write_text("".join(small_questions.read_text().splitlines(True)[:-1]))
    assert main(gen_args(run, small_questions, "--shards", "3", "--output", str(out))) == 2
    assert "--shards 3 differs from the planned 2" in capsys.readouterr().err


def test_local_run_equals_single_process_and_relaunch_does_nothing(
    tiny_models: Path, small_questions: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert (
        main(
            gen_args(
                tmp_path / "r3",
                small_questions,
                "--shards",
                "3",
                "--output",
                str(a),
                "--local-parallelism",
                "2",
            )
        )
        == 0
    )
    assert (
        main(gen_args(tmp_path / "r1", small_questions, "--shards", "1", "--output", str(b))) == 0
    )
    assert a.read_bytes() == b.read_bytes()
    recs = [json.loads(x) for x in a.read_text().splitlines()]
    assert {
        "id",
        "sample",
        "category",
        "question",
        "cot",
        "teacher_answer",
        "gold",
        "correct",
    } <= set(recs[0])
    starts = sorted((tmp_path / "r3/generate/attempts").iterdir())
    before = [p.read_text() for p in starts]
    capsys.readouterr()
    assert (
        main(gen_args(tmp_path / "r3", small_questions, "--shards", "3", "--output", str(a))) == 0
    )
    assert "0 to run" in capsys.readouterr().out
    assert [p.read_text() for p in starts] == before  # no task started again


def test_run_folder_and_logs_are_user_only(
    tiny_models: Path, small_questions: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert main(gen_args(run, small_questions, "--num-samples", "4")) == 0
    for d in (run, run / "logs"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
    assert any((run / "logs").glob("*.pkl"))
