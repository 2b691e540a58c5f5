"""``generate --engine server`` as a real Slurm array: each task starts its own
``transformers serve --continuous-batching`` (the ``transformers`` preset) on a free port.

One task is preempted with ``scancel --signal=USR2`` mid-shard. The merged output must hold every
(id, sample) once, in input order; the preempted task must have stopped sending, recorded what
had finished, killed its server and requeued, so that the restart redoes at most the
``--concurrency`` requests that were in flight.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hpc import shards as S
from tests.slurm_helpers import (
    attempts,
    cancel_run,
    finish,
    first_lines,
    line_count,
    request_events,
    submissions,
)

pytest.importorskip("fastapi", reason="needs the serve extra (transformers serve)")
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
N_QUESTIONS = 96
SHARDS = 2
CONCURRENCY = 4
HIT_AT = 6  # lines of the preempted shard on disk when the signal is sent


def _server_pids(run_dir: Path) -> list[int]:
    """The pids of every server the tasks started, from the task logs ("started pid N")."""
    pids: list[int] = []
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and path.suffix in (".err", ".out", ".log"):
            text = path.read_text(errors="replace")
            pids += [int(p) for p in re.findall(r"server \(shard \d+\): started pid (\d+)", text)]
    return pids


def test_server_array_preempted_mid_shard_resumes_each_key_once(
    slurm_cluster: Any, tiny_models: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    from cot.serving import _group_members

    questions = first_lines(dataset_dir / "raw_questions.jsonl", N_QUESTIONS, tmp_path / "q.jsonl")
    run_dir, out = tmp_path / "run", tmp_path / "out.jsonl"
    argv = [
        sys.executable, "-m", "hpc.launch", "generate",
        "--cluster", "slurm", "--wait",
        "--engine", "server", "--server", "transformers",
        "--concurrency", str(CONCURRENCY), "--server-timeout-s", "300",
        "--teacher", str(tiny_models / "teacher"),
        "--prompt-template", str(REPO / "templates" / "prompts" / "teacher.txt"),
        "--input", str(questions), "--output", str(out), "--run-dir", str(run_dir),
        "--shards", str(SHARDS), "--max-new-tokens", "96", "--temperature", "0",
        "--keep", "all", "--seed", "0",
        "--time-min", "60", "--cpus-per-task", "1", "--signal-delay-s", "30",
        "--max-num-timeout", "3",
    ]  # fmt: skip
    env = {
        **os.environ,
        **slurm_cluster.env,
        "PYTHONPATH": str(REPO),
        "COT_HPC_POLL_S": "2",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stage = run_dir / "generate"
    hit = SHARDS - 1
    per_shard = N_QUESTIONS // SHARDS
    try:
        lines_at_signal = None
        end = time.monotonic() + 420
        while proc.poll() is None and time.monotonic() < end:
            lines = line_count(S.shard_path(stage, hit))
            if lines >= HIT_AT and (run_dir / "launch.json").exists():
                assert not S.marker_path(stage, hit).exists(), "shard finished before the hit"
                assert lines < per_shard
                task = submissions(run_dir)[0]["shards"][str(hit)]
                subprocess.run(["scancel", "--signal=USR2", task], check=True, timeout=30)
                lines_at_signal = lines
                break
            time.sleep(0.05)
        if lines_at_signal is None:
            rc, stdout, stderr = finish(proc, 60)
            pytest.fail(f"the shard never got under way (launcher rc {rc}): {stderr[-3000:]}")
        rc, stdout, stderr = finish(proc, 600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        cancel_run(run_dir)
    assert rc == 0, stderr[-3000:]

    # Every (id, sample) once, in input order.
    want = [(json.loads(x)["id"], 0) for x in questions.read_text().splitlines()]
    got = [(r["id"], r["sample"]) for r in map(json.loads, out.read_text().splitlines())]
    assert got == want
    assert f"merged {N_QUESTIONS} of {N_QUESTIONS} records" in stdout

    # The preempted shard started twice; its first start stopped sending, recorded what had
    # finished, and nothing finished was written twice; at most CONCURRENCY were redone.
    assert len(attempts(stage, 0)) == 1
    assert len(attempts(stage, hit)) == 2
    first, second = request_events(stage, hit)
    assert first["done"] >= lines_at_signal
    in_flight = first["sent"] - first["done"]
    assert 0 <= in_flight <= CONCURRENCY, first
    assert first["done"] + second["done"] == per_shard, (first, second)
    assert second["sent"] == per_shard - first["done"]
    assert first["sent"] + second["sent"] - per_shard <= CONCURRENCY
    marker = json.loads(S.marker_path(stage, hit).read_text())
    assert (marker["records"], marker["errors"]) == (per_shard, 0)

    # Three servers were started (one per start) and every one of their groups is gone.
    pids = _server_pids(run_dir)
    assert len(pids) == SHARDS + 1, pids
    assert all(_group_members(p) == [] for p in pids)
    # The preempted start's server was stopped by the task itself, in checkpoint(), before
    # submitit asked Slurm for the requeue.
    first_log = next(p for p in (run_dir / "logs").glob(f"*_{hit}_0_log.out"))
    text = first_log.read_text(errors="replace")
    stopped = text.find(f"server (shard {hit}): stopped, process group")
    requeued = text.find("Requeued job")
    assert 0 <= stopped < requeued, text[-3000:]
