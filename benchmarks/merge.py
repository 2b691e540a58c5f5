"""Merge throughput against `cat` of the same shard files, in one run.

    .venv/bin/python benchmarks/merge.py [--gb 1.0] [--shards 100] [--dir /tmp/cothpc-merge-bench]

Prints MB/s for our verified merge and for `cat shards/*.jsonl > out`, the ratio, and the merge's
peak RSS (measured in a child process). Goal: >= 0.6x cat's speed, < 300 MB RSS for 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hpc import shards as S  # noqa: E402


def make_synthetic(stage_dir: Path, gb: float, shards: int, record_bytes: int = 1000) -> int:
    """Write a complete stage (plan, shards, markers) of about ``gb`` GB; returns the records."""
    n = max(shards, int(gb * 1e9 / record_bytes))
    ids = [f"rec-{i:09d}" for i in range(n)]
    stage_dir.mkdir(parents=True, exist_ok=True)
    inp = stage_dir / "input.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "question": "q"}) + "\n" for i in ids))
    plan = S.make_plan(inp, shards)
    S.write_or_check_plan(stage_dir, plan)
    pad = "x" * (record_bytes - 150)
    for shard in range(shards):
        lo, hi = plan.ranges[shard]
        path = S.shard_path(stage_dir, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(
            json.dumps(
                {
                    "id": ids[k],
                    "sample": 0,
                    "category": "arithmetic",
                    "cot": pad,
                    "teacher_answer": str(k),
                    "correct": k % 2 == 0,
                }
            )
            + "\n"
            for k in range(lo, hi)
        ).encode()
        path.write_bytes(data)
        # The marker finish_shard writes: the merge verifies the byte count and crc32.
        S.write_marker(
            stage_dir,
            shard,
            {
                "records": hi - lo,
                "errors": 0,
                "bytes": len(data),
                "crc32": zlib.crc32(data),
                "slice": plan.digest(shard),
            },
        )
    return n


CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from hpc import shards as S


def hwm_kb():
    # VmHWM is this process's own peak; ru_maxrss would carry the forking parent's over exec.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])


d = Path({stage!r})
t = time.perf_counter()
counts = S.write_merged(d, S.load_plan(d), [])
dt = time.perf_counter() - t
print(dt, counts["total"], hwm_kb())
"""


def race_cat(root: Path, stage: Path, n: int, rounds: int) -> dict[str, float]:
    """Time ``cat`` of the shards into a fsync'd file against the verified merge (a fresh process
    each time), alternating, ``rounds`` times; the best time of each, the merge's peak RSS (MB)
    and the bytes. The page cache is warmed first, equally for both."""
    files = sorted((stage / "shards").glob("*.jsonl"))
    size = sum(f.stat().st_size for f in files)
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    best = {"cat": 1e9, "merge": 1e9, "rss_mb": 0.0, "bytes": float(size)}
    for _ in range(rounds):
        t = time.perf_counter()
        with open(root / "cat.out", "wb") as out:
            subprocess.run(["cat", *map(str, files)], stdout=out, check=True)
            out.flush()
            os.fsync(out.fileno())
        best["cat"] = min(best["cat"], time.perf_counter() - t)
        (root / "cat.out").unlink()
        code = CHILD.format(repo=str(REPO), stage=str(stage))
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
        dt, total, rss_kb = float(out[0]), int(out[1]), int(out[2])
        assert total == n, (total, n)
        assert (stage / "merged.jsonl").stat().st_size == size
        best["merge"] = min(best["merge"], dt)
        best["rss_mb"] = max(best["rss_mb"], rss_kb / 1024)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--dir", default="/tmp/cothpc-merge-bench")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic files")
    args = ap.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    stage = root / "generate"
    t = time.perf_counter()
    n = make_synthetic(stage, args.gb, args.shards)
    print(f"synthetic: {n:,} records in {args.shards} shards ({time.perf_counter() - t:.1f}s)")
    best = race_cat(root, stage, n, rounds=2)
    cat_mbs = best["bytes"] / 1e6 / best["cat"]
    merge_mbs = best["bytes"] / 1e6 / best["merge"]
    print(f"cat:   {cat_mbs:8.0f} MB/s  ({best['cat']:.2f}s)")
    print(f"merge: {merge_mbs:8.0f} MB/s  ({best['merge']:.2f}s, every byte checked, fsync'd)")
    print(f"ratio merge/cat: {merge_mbs / cat_mbs:.2f}  (goal >= 0.6)")
    print(f"merge peak RSS: {best['rss_mb']:.0f} MB  (goal < 300 MB for 1 GB)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
