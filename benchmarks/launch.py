"""Time to submit N shards to the real (test) Slurm, and the number of sbatch calls made.

    bash hpc/devcluster/up.sh /tmp/cothpc-slurm [--max-array-size 1001]
    export SLURM_CONF=/tmp/cothpc-slurm/slurm.conf
    .venv/bin/python benchmarks/launch.py [--shards 1000]

Goal: ceil(N / MaxArraySize) + 1 sbatch calls, under 5 s (10 s above 1000 shards). The jobs
are cancelled right after. A wrapper `sbatch` first on PATH counts the calls; CLI startup
(`--help`) is timed too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=1000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cothpc-launch-"))
    inp = tmp / "q.jsonl"
    inp.write_text(
        "".join(json.dumps({"question": f"What is {i} + 1?"}) + "\n" for i in range(args.shards))
    )
    real = subprocess.run(["which", "sbatch"], capture_output=True, text=True).stdout.strip()
    bindir = tmp / "bin"
    bindir.mkdir()
    counter = tmp / "sbatch_calls"
    wrapper = bindir / "sbatch"
    wrapper.write_text(f'#!/bin/sh\necho x >> "{counter}"\nexec "{real}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    max_array = int(
        subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True)
        .stdout.split("MaxArraySize", 1)[1]
        .split("=", 1)[1]
        .split()[0]
    )
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "hpc.launch", "--help"], cwd=REPO, check=True, capture_output=True
    )
    help_s = time.perf_counter() - t
    cmd = [
        sys.executable,
        "-m",
        "hpc.launch",
        "generate",
        "--cluster",
        "slurm",
        "--shards",
        str(args.shards),
        "--input",
        str(inp),
        "--run-dir",
        str(tmp / "run"),
        "--teacher",
        str(REPO / "models/tiny/teacher"),
        "--time-min",
        "60",
    ]
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    launch_s = time.perf_counter() - t
    # Cancel whatever was recorded, failed launch or not: nothing of this benchmark may run on.
    record = tmp / "run" / "launch.json"
    launch = json.loads(record.read_text()) if record.exists() else {}
    sub = launch.get("stages", {}).get("generate", {}).get("submissions", [{}])[-1]
    ids = [*sub.get("arrays", []), sub.get("merge", "")]
    subprocess.run(["scancel", *[i for i in ids if i]], check=False)
    if out.returncode:
        print(out.stdout, out.stderr)
        raise SystemExit(out.returncode)
    calls = len(counter.read_text().splitlines())
    pickles = list((tmp / "run" / "logs").glob("*.pkl"))
    pkl_kb = sum(p.stat().st_size for p in pickles) / 1024
    want = math.ceil(args.shards / max_array) + 1  # the arrays, plus the afterok merge job
    print(f"CLI --help: {help_s:.2f}s")
    print(f"submit {args.shards} shards: {launch_s:.2f}s (whole command, Python start included)")
    print(
        f"sbatch calls: {calls} = {len(sub.get('arrays', []))} array(s) + 1 merge job; "
        f"ceil({args.shards}/{max_array}) + 1 = {want}"
    )
    print(
        f"submitit pickles: {len(pickles):,} files, {pkl_kb:,.0f} KiB in all "
        f"({pkl_kb / max(1, len(pickles)):.1f} KiB each: one per array task, which is how "
        "submitit's array tasks find their call)"
    )
    goal_s = 5 if args.shards <= 1000 else 10
    ok = calls == want and launch_s < goal_s
    print(f"goal: {want} calls and < {goal_s} s -> {'MET' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
