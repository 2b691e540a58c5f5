"""A merge of 1 GB of shard files runs in bounded memory and checks every record."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.merge import make_synthetic
from tests.conftest import REPO

CHILD = """
import sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from hpc import shards as S


def hwm_kb():
    # VmHWM is this process's own peak; ru_maxrss would carry the forking parent's over exec.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])


d = Path({stage!r})
counts = S.write_merged(d, S.load_plan(d), [])
print(counts["total"], hwm_kb())
"""


@pytest.mark.slow
def test_merge_1gb_bounded_memory(tmp_path: Path) -> None:
    stage = tmp_path / "generate"
    n = make_synthetic(stage, gb=1.0, shards=50)
    size = sum(p.stat().st_size for p in (stage / "shards").iterdir())
    assert size > 0.9e9
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(repo=str(REPO), stage=str(stage))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    total, rss_kb = int(out[0]), int(out[1])
    assert total == n
    assert rss_kb < 300 * 1024, f"peak RSS {rss_kb / 1024:.0f} MB"
    assert (stage / "merged.jsonl").stat().st_size == size
