"""Scale on the real test Slurm: 200 shards with MaxArraySize 50, each run exactly once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hpc import config as C
from hpc import shards as S
from hpc.backends import slurm as E
from hpc.stages import run_stages
from tests.jobs.light_worker import LightShard, LightStage

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_200_shards_with_max_array_size_50(slurm_cluster: Any, tmp_path: Path) -> None:
    n = 400
    inp = tmp_path / "q.jsonl"
    inp.write_text(
        "".join(json.dumps({"question": f"question number {i}"}) + "\n" for i in range(n))
    )
    run = tmp_path / "run"
    cfg = C.load_config(
        C.GenerateConfig,
        "generate",
        None,
        {
            "run_dir": str(run),
            "input": str(inp),
            "shards": 200,
            "cluster": "slurm",
            "time_min": 60,
            "cpus_per_task": 1,
            "batch_size": 1,
        },
    )
    with slurm_cluster.max_array_size_set(50):
        E.max_array_size.cache_clear()
        try:
            out = run_stages([LightStage(cfg, LightShard())], cfg, wait=True)
            (sub,) = json.loads((run / "launch.json").read_text())["stages"]["generate"][
                "submissions"
            ]
            assert len(sub["arrays"]) == 4  # ceil(200 / 50) arrays, not 200 jobs
            summary = out.results["generate"]
        finally:
            E.max_array_size.cache_clear()
    assert summary["total"] == n
    stage = run / "generate"
    assert S.completed(stage) == set(range(200))
    starts = [
        sum('"start"' in line for line in (stage / "attempts" / S.shard_name(i)).open())
        for i in range(200)
    ]
    assert starts == [1] * 200  # every shard ran exactly once
    merged = [json.loads(x)["id"] for x in (stage / "merged.jsonl").read_text().splitlines()]
    assert merged == [f"L{i + 1}" for i in range(n)]
