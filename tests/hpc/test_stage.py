"""Unit tests of hpc/stage.py: how a failed local shard is reported."""

from __future__ import annotations

from pathlib import Path

import submitit

from hpc import stage


def _bad_shard() -> None:
    raise ValueError("q.jsonl:3: field 'question': missing")


def test_local_failure_names_the_exception_not_the_log_paths(tmp_path: Path) -> None:
    ex = submitit.AutoExecutor(folder=tmp_path / "logs", cluster="local")
    ex.update_parameters(timeout_min=1)
    job = ex.submit(_bad_shard)
    failed = stage._failed_local([job], [1])
    assert failed == [
        (1, str(job.paths.stderr), "ValueError: q.jsonl:3: field 'question': missing")
    ]
    text = stage._failure_text("generate", failed)
    assert "shard 00001: ValueError: q.jsonl:3: field 'question': missing" in text
    assert f"log: {job.paths.stderr}" in text


def test_failure_line_of_plain_text() -> None:
    assert stage.failure_line("plain error") == "plain error"
    assert stage.failure_line("") == "failed"
