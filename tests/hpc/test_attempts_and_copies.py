"""A shard's attempt log is UTF-8 under any locale; an output copy never holds a whole file."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from hpc import shards as S
from hpc.layout import StageLayout
from hpc.stages.sharded import _starts


@pytest.mark.usefixtures("ascii_locale")
def test_the_attempt_log_is_utf8_and_counted_whatever_the_locale(tmp_path: Path) -> None:
    start = {"event": "start", "host": "nœud-3", "note": "reprise après préemption"}
    assert S.append_attempt(tmp_path, 0, start) == 1
    assert S.append_attempt(tmp_path, 0, {"event": "resume", "on_disk": 2}) == 2
    path = StageLayout(tmp_path).attempts(0)
    lines = path.read_bytes().decode("utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [start, {"event": "resume", "on_disk": 2}]
    # status counts the starts of that log (one requeue per start after the first)
    assert _starts(path) == 1
    S.append_attempt(tmp_path, 0, start)
    assert _starts(path) == 2


def test_an_output_copy_reads_the_merged_file_in_bounded_blocks(tmp_path: Path) -> None:
    """Copying a merged file of any size to an output path holds one block (1 MiB) in memory,
    never the whole file."""
    src = tmp_path / "merged.jsonl"
    src.write_bytes(b"x" * (16 << 20))
    tracemalloc.start()
    try:
        S._copy_atomic(src, tmp_path / "out" / "copy.jsonl")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"copy held {peak / 2**20:.1f} MiB"
    assert (tmp_path / "out" / "copy.jsonl").read_bytes() == src.read_bytes()
