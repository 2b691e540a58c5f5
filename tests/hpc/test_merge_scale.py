"""A merge of 1 GB of shard files runs in bounded memory and checks every record."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.merge import CHILD, make_synthetic
from tests.conftest import REPO


@pytest.mark.slow
def test_merge_1gb_bounded_memory(tmp_path: Path) -> None:
    stage = tmp_path / "generate"
    n = make_synthetic(stage, gb=1.0, shards=50)
    size = sum(p.stat().st_size for p in (stage / "shards").iterdir())
    assert size > 0.9e9
    # The benchmark's own child: it merges and prints seconds, records and its peak RSS (kB).
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(repo=str(REPO), stage=str(stage))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    total, rss_kb = int(out[1]), int(out[2])
    assert total == n
    assert rss_kb < 300 * 1024, f"peak RSS {rss_kb / 1024:.0f} MB"
    assert (stage / "merged.jsonl").stat().st_size == size
