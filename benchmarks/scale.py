"""Scale: the launcher's plan, a task's start-up, `status` and the merge at millions of records.

    .venv/bin/python benchmarks/scale.py [--sizes 100000,1000000,10000000] [--merge-gb 1]
    # with the test Slurm up (SLURM_CONF set), the 10,000-shard launch is timed too:
    SLURM_CONF=/tmp/cothpc-slurm/slurm.conf .venv/bin/python benchmarks/scale.py

Every measurement runs in a fresh process and reads its own peak RSS (VmHWM), so one figure
never carries another's memory. Each goal is printed with MET or MISSED:

- launcher (validate + plan at 10,000 shards): time against ``sha256sum`` of the same file (the
  I/O-and-hash floor), goal <= 2x; peak RSS < 300 MB at 10M;
- the same for Parquet (1M questions by default);
- one task's start-up at 10,000 shards (plan load, slice read and check): the same at every
  size within noise, < 100 MB of RSS over a bare interpreter;
- ``status`` (the whole command) on a run folder of 10,000 shards: < 2 s;
- merge of ~1 GB in 100 shards against ``cat`` of the same files, both fsync'd: >= 0.6x cat,
  peak RSS < 300 MB;
- launch of 10,000 shards on the test Slurm (``benchmarks/launch.py``): < 10 s and
  ceil(10000 / MaxArraySize) + 1 sbatch calls.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARDS = 10_000

PRELUDE = """
import sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

BARE = PRELUDE + "from hpc import shards as S\nprint(0, hwm_mb())"

PLAN = (
    PRELUDE
    + """
from hpc import shards as S
t = time.perf_counter()
plan = S.make_plan({inp!r}, {shards})
S.write_or_check_plan(Path({stage!r}), plan)
print(time.perf_counter() - t, hwm_mb())
"""
)

TASK = (
    PRELUDE
    + """
from hpc import shards as S
t = time.perf_counter()
plan = S.load_plan(Path({stage!r}))
recs = plan.records({shard})
keys = plan.keys({shard}, recs)
print(time.perf_counter() - t, hwm_mb(), len(keys))
"""
)


def child(code: str) -> list[float]:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    if out.returncode:
        raise SystemExit(out.stderr)
    return [float(x) for x in out.stdout.split()]


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def synth(path: Path, n: int) -> None:
    """GSM8K-like questions of ~200 bytes: ids, a question, a numeric answer, a category."""
    rng = random.Random(n)
    words = [
        "apples",
        "pears",
        "trains",
        "hours",
        "pages",
        "coins",
        "boxes",
        "miles",
        "eggs",
        "tickets",
    ]
    cats = ("arithmetic", "algebra", "word")
    with open(path, "w", encoding="utf-8") as fh:
        block = []
        for i in range(n):
            a, b = rng.randrange(2, 999), rng.randrange(2, 99)
            w = rng.choice(words)
            q = (
                f"Sam has {a} {w} and buys {b} times as many {w} each week for a month. "
                f"How many {w} does Sam have now, counting the ones bought?"
            )
            block.append(
                json.dumps(
                    {
                        "id": f"q{i:08d}",
                        "question": q,
                        "answer": a + 4 * a * b,
                        "category": cats[i % 3],
                    }
                )
            )
            if len(block) == 10_000:
                fh.write("\n".join(block) + "\n")
                block = []
        if block:
            fh.write("\n".join(block) + "\n")


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def to_parquet(src: Path, dest: Path, group: int) -> None:
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    pq.write_table(pj.read_json(src), dest, row_group_size=group)


def bench_size(
    root: Path, n: int, bare_mb: float, parquet: bool = False, group: int = 65_536
) -> dict[str, float]:
    inp = root / f"q{n}.jsonl"
    t = time.perf_counter()
    synth(inp, n)
    kind = "JSONL"
    if parquet:
        to_parquet(inp, inp.with_suffix(".parquet"), group)
        inp.unlink()
        inp, kind = inp.with_suffix(".parquet"), f"Parquet, {group:,}-row groups"
    mb = inp.stat().st_size / 1e6
    print(f"\n{n:,} questions: {mb:,.0f} MB of {kind} ({time.perf_counter() - t:.1f}s to write)")
    timed(["cat", str(inp)])  # warm the page cache for both
    floor = min(timed(["sha256sum", str(inp)]) for _ in range(2))
    stage = root / f"run{n}{inp.suffix}" / "generate"
    shards = min(SHARDS, n)
    plan_s, plan_mb = child(
        PLAN.format(repo=str(REPO), inp=str(inp), shards=shards, stage=str(stage))
    )
    size_kb = (stage / "plan.json").stat().st_size / 1024
    ratio = plan_s / floor
    print(
        f"  launcher validate + plan ({shards:,} shards): {plan_s:.2f}s vs sha256sum {floor:.2f}s "
        f"= {ratio:.1f}x (goal <= 2x: {verdict(ratio <= 2)}); peak RSS {plan_mb:.0f} MB"
        + (f" (goal < 300 MB at 10M: {verdict(plan_mb < 300)})" if n >= 10_000_000 else "")
        + f"; plan.json {size_kb:,.0f} KiB (goal < 2 MB: {verdict(size_kb < 2048)})"
    )
    runs = [
        child(TASK.format(repo=str(REPO), stage=str(stage), shard=s))
        for s in (0, shards // 2, shards - 1)
    ]
    task_s = min(r[0] for r in runs)
    task_mb = max(r[1] for r in runs)
    over = task_mb - bare_mb
    print(
        f"  one task's start-up ({int(runs[0][2]):,} records of {shards:,} shards): "
        f"{task_s * 1000:.0f} ms, peak RSS {task_mb:.0f} MB = {over:.0f} MB over a bare "
        f"interpreter (goal < 100 MB: {verdict(over < 100)})"
    )
    inp.unlink()
    return {"task_s": task_s, "plan_mb": plan_mb}


def bench_status(root: Path) -> None:
    """A run folder of 10,000 shards: half complete, a quarter with a progress counter."""
    sys.path.insert(0, str(REPO))
    from hpc import shards as S

    inp = root / "status.jsonl"
    inp.write_text("".join(json.dumps({"question": f"q{i}?"}) + "\n" for i in range(SHARDS)))
    run = root / "status-run"
    stage = run / "generate"
    plan = S.write_or_check_plan(stage, S.make_plan(inp, SHARDS))
    for i in range(SHARDS):
        if i % 2 == 0:
            S.write_marker(
                stage,
                i,
                {"records": 1, "errors": 0, "bytes": 1, "crc32": 1, "slice": plan.digest(i)},
            )
        elif i % 4 == 1:
            S.write_progress(stage, i, 0)
        S.append_attempt(stage, i, {"event": "start", "job_id": f"900_{i}"})
    launch = {
        "stages": {
            "generate": {
                "submissions": [
                    {
                        "kind": "slurm",
                        "shards": {str(i): f"900_{i}" for i in range(SHARDS)},
                        "merge": "901",
                    }
                ]
            }
        }
    }
    (run / "launch.json").write_text(json.dumps(launch))
    (run / ".cot-hpc-run").write_text("")
    cmd = [sys.executable, "-m", "hpc.launch", "status", str(run)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(out.stdout + out.stderr)
    best = min(timed(cmd) for _ in range(3))
    print(
        f"\nstatus on {SHARDS:,} shards (whole command, one sacct call): {best:.2f}s "
        f"(goal < 2 s: {verdict(best < 2)})"
    )
    print("  " + "\n  ".join(out.stdout.strip().splitlines()[:4]))


def bench_merge(root: Path, gb: float) -> None:
    from benchmarks.merge import make_synthetic, race_cat

    stage = root / "merge" / "generate"
    n = make_synthetic(stage, gb, 100)
    best = race_cat(root, stage, n, rounds=3)
    mb, rss = best["bytes"] / 1e6, best["rss_mb"]
    ratio = best["cat"] / best["merge"]
    print(
        f"\nmerge of {mb:,.0f} MB in 100 shards, every byte checked against its marker, "
        f"fsync'd: {mb / best['merge']:,.0f} MB/s vs cat {mb / best['cat']:,.0f} "
        f"MB/s = {ratio:.2f}x cat (goal >= 0.6x: {verdict(ratio >= 0.6)}); peak RSS "
        f"{rss:.0f} MB (goal < 300 MB: {verdict(rss < 300)})"
    )


def bench_launch() -> None:
    if not os.environ.get("SLURM_CONF") or not shutil.which("sbatch"):
        print("\nlaunch of 10,000 shards: skipped (no test Slurm: set SLURM_CONF)")
        return
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/launch.py"), "--shards", str(SHARDS)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    print(
        f"\nlaunch of {SHARDS:,} shards on the test Slurm (benchmarks/launch.py, jobs cancelled):"
    )
    print("  " + "\n  ".join((out.stdout or out.stderr).strip().splitlines()[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000,10000000")
    ap.add_argument("--parquet", default="1000000", help="sizes also timed as Parquet")
    ap.add_argument("--merge-gb", type=float, default=1.0)
    ap.add_argument("--dir", default="/tmp/cothpc-scale-bench")
    args = ap.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    sys.path.insert(0, str(REPO))
    try:
        _, bare_mb = child(BARE.format(repo=str(REPO)))
        print(f"bare interpreter with hpc.shards imported: {bare_mb:.0f} MB")
        sizes = [int(s) for s in args.sizes.split(",")]
        got = [bench_size(root, n, bare_mb) for n in sizes]
        if len(got) > 1:
            lo, hi = got[0]["task_s"], got[-1]["task_s"]
            print(
                f"\ntask start-up at {sizes[0]:,} vs {sizes[-1]:,} questions: {lo * 1000:.0f} vs "
                f"{hi * 1000:.0f} ms (goal: the same within noise, here 2x or 50 ms: "
                f"{verdict(hi <= max(2 * lo, lo + 0.05))})"
            )
        for n in [int(s) for s in args.parquet.split(",") if s]:
            bench_size(root, n, bare_mb, parquet=True)
        bench_status(root)
        bench_merge(root, args.merge_gb)
        bench_launch()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
