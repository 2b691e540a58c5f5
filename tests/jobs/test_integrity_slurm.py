"""The integrity promises of #12 on the real test Slurm: a signal or a death at any moment of a
task's life, relaunches while jobs are queued, values that must never reach an sbatch script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hpc import config as C
from hpc import runs
from hpc import shards as S
from hpc.layout import RunLayout
from hpc.stages import run_stages
from tests.jobs.light_worker import DyingLightShard, DyingTrainStage, LightStage
from tests.slurm_helpers import REPO, finish, sacct_states, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _questions(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"question": f"question {i}"}) + "\n" for i in range(n)))
    return path


def _cfg(run: Path, inp: Path, shards: int, **more: Any) -> C.GenerateConfig:
    return C.load_config(
        C.GenerateConfig,
        "generate",
        None,
        {
            "run_dir": str(run),
            "input": str(inp),
            "shards": shards,
            "cluster": "slurm",
            "time_min": 60,
            "cpus_per_task": 1,
            "batch_size": 1,
            **more,
        },
    )


def _squeue_state(task: str) -> str:
    """The state squeue shows (sacct may lag behind a job that started a second ago)."""
    out = subprocess.run(
        ["squeue", "-h", "-o", "%T", "-j", task], capture_output=True, text=True, timeout=30
    )
    return out.stdout.strip()


def test_a_task_that_dies_after_its_marker_does_not_fail_the_stage(
    slurm_cluster: Any, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    cfg = _cfg(run, _questions(tmp_path / "q.jsonl", 8), 4)
    out = run_stages([LightStage(cfg, DyingLightShard(shard=2))], cfg, wait=True)
    task = str(runs.latest_jobs(run, "generate")["shards"][2])
    assert wait_for(lambda: sacct_states([task]).get(task), 60, "sacct") == "FAILED"
    assert out.results["generate"]["total"] == 8  # the merge ran, and found every shard
    stage_dir = run / "generate"
    merged = [json.loads(x)["id"] for x in (stage_dir / "merged.jsonl").read_text().splitlines()]
    assert merged == [f"L{i + 1}" for i in range(8)]


def test_a_training_that_dies_after_its_marker_does_not_cancel_the_evaluation(
    slurm_cluster: Any, tiny_models: Path, tmp_path: Path, dataset_dir: Path
) -> None:
    """The train job writes its adapter and COMPLETE, then its process dies (exit 3). The
    evaluation depends on it with afterany and checks the adapter itself: it runs and scores."""
    from hpc.stages import EvaluateStage

    run = tmp_path / "run"
    data = tmp_path / "train.jsonl"
    rows = (dataset_dir / "raw_questions.jsonl").read_text().splitlines()[:16]
    data.write_text(
        "".join(
            json.dumps(
                {"question": json.loads(r)["question"], "cot": json.loads(r)["reference_cot"]}
            )
            + "\n"
            for r in rows
        )
    )
    test = tmp_path / "test.jsonl"
    test.write_text("".join((dataset_dir / "test_questions.jsonl").open().readlines()[:4]))
    common = {"run_dir": str(run), "cluster": "slurm", "time_min": 60, "cpus_per_task": 1}
    train = C.load_config(
        C.TrainConfig,
        "train",
        None,
        {**common, "student": str(tiny_models / "student"), "data": str(data), "max_steps": 2},
    )
    evaluate = C.load_config(
        C.EvaluateConfig,
        "evaluate",
        None,
        {
            **common,
            "base_model": str(tiny_models / "student"),
            "lora_model": str(run / "train" / "adapter"),
            "input": str(test),
            "shards": 1,
            "max_new_tokens": 16,
        },
    )
    out = run_stages([DyingTrainStage(train), EvaluateStage(evaluate)], train, wait=True)
    job = str(runs.latest_jobs(run, "train")["job"])
    assert wait_for(lambda: sacct_states([job]).get(job), 60, "sacct") == "FAILED"
    assert (run / "train" / "COMPLETE").exists()
    assert out.results["evaluate"]["total"] == 4  # the evaluation ran on the adapter
    assert len((run / "evaluate" / "merged.jsonl").read_text().splitlines()) == 4


def test_usr2_as_a_finished_task_exits_keeps_it_completed(
    slurm_cluster: Any, tiny_models: Path, tmp_path: Path, dataset_dir: Path
) -> None:
    """The real teacher worker: USR2 at the moment its marker appears (the process then unloads
    the model and exits). The task must end COMPLETED and the launch exit 0."""
    inp = tmp_path / "q.jsonl"
    inp.write_text("".join((dataset_dir / "test_questions.jsonl").open().readlines()[:8]))
    run = tmp_path / "run"
    argv = [
        sys.executable, "-m", "hpc.launch", "generate", "--cluster", "slurm",
        "--teacher", str(tiny_models / "teacher"), "--input", str(inp), "--run-dir", str(run),
        "--shards", "4", "--batch-size", "1", "--max-new-tokens", "96", "--cpus-per-task", "1",
        "--time-min", "60", "--wait",
    ]  # fmt: skip
    env = {**os.environ, "COT_HPC_POLL_S": "2", "PYTHONPATH": str(REPO), **slurm_cluster.env}
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    stage_dir = run / "generate"
    done = wait_for(lambda: sorted(S.completed(stage_dir)), 300, "a first completion marker")
    task = str(runs.latest_jobs(run, "generate")["shards"][done[0]])
    assert _squeue_state(task) in ("RUNNING", "COMPLETING")  # the signal finds it alive
    subprocess.run(["scancel", "--signal=USR2", task], check=True, timeout=30)
    rc, _, err = finish(proc, 420)
    assert rc == 0, err[-3000:]
    assert sacct_states([task])[task] == "COMPLETED"
    assert len((stage_dir / "merged.jsonl").read_text().splitlines()) == 8


def _pipeline_argv(run: Path) -> list[str]:
    from tests.hpc.test_pipeline_slurm import SMALL

    return ["pipeline", "--cluster", "slurm", "--no-wait", "--run-dir", str(run),
            "--time-min", "60", *SMALL]  # fmt: skip


def _jobs_named(name: str) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i|%j"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    return [line.split("|")[0] for line in out.splitlines() if line.split("|", 1)[1] == name]


def test_pipeline_rerun_while_the_merge_is_queued_submits_no_second_writer(
    slurm_cluster: Any, tiny_models: Path, tmp_path: Path
) -> None:
    """Every shard is complete and the merge job still waits in the queue (held here, as a busy
    scheduler or an admin would hold it). The rerun must not merge a second time in the
    launcher nor submit a second training: both would be second writers."""
    from tests.slurm_helpers import cancel_run, cli

    run = tmp_path / "run"
    try:
        first = cli(_pipeline_argv(run))
        assert first.returncode == 0, first.stderr[-3000:]
        merge = str(runs.latest_jobs(run, "generate")["merge"])
        subprocess.run(["scontrol", "hold", merge], check=True, timeout=30)
        wait_for(lambda: S.completed(run / "generate") == {0, 1}, 300, "both shards", 0.5)
        again = cli(_pipeline_argv(run))
        assert again.returncode == 0, again.stderr[-3000:]
        assert not (run / "generate" / "merge.json").exists(), again.stderr[-3000:]
        subs = runs.read_launch(run)["stages"]
        assert len(subs["generate"]["submissions"]) == 1
        assert len(subs["train"]["submissions"]) == 1, again.stderr[-3000:]
        assert len(_jobs_named(f"cot-train {run.name}")) == 1
        assert len(subs["evaluate"]["submissions"]) == 1
        assert len(subs["report"]["submissions"]) == 1
    finally:
        cancel_run(run)


@pytest.mark.parametrize(
    ("flag", "field"),
    [("--partition", "partition"), ("--account", "account"), ("--qos", "qos"),
     ("--run-dir", "run_dir")],
)  # fmt: skip
@pytest.mark.parametrize("bad", ["debug\necho INJECTED #", "a\rb", "a\x00b"])
def test_a_newline_in_any_value_that_reaches_sbatch_is_refused_before_submission(
    slurm_cluster: Any, tmp_path: Path, flag: str, field: str, bad: str
) -> None:
    from tests.slurm_helpers import all_job_ids, cli, counting_env

    env, calls = counting_env(tmp_path)
    run = tmp_path / "run"
    value = str(tmp_path / bad) if flag == "--run-dir" else bad
    argv = ["generate", "--cluster", "slurm", "--input", str(_questions(tmp_path / "q.jsonl", 4)),
            "--shards", "2", "--run-dir", str(run), flag, value]  # fmt: skip
    if "\x00" in value:  # no argv can hold a NUL: it comes from a config file instead
        cfg = tmp_path / "run.yaml"
        section = "cluster" if field == "run_dir" else "generate"
        cfg.write_text(json.dumps({section: {field: value}}))
        argv = [*argv[:-2], "--config", str(cfg)]
    before = all_job_ids()
    out = cli(argv, env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"'{field}' must not contain a newline" in out.stderr
    assert "Traceback" not in out.stderr
    assert not calls.exists()
    assert not any(tmp_path.glob("**/*submission*.sh"))
    assert all_job_ids() == before


def test_a_second_live_task_for_a_shard_waits_and_never_writes(
    slurm_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """launch.json loses the record of a running array (a crash between sbatch and the record,
    a hand edit); the relaunch then submits the shard again while its first task runs. The
    second task must wait on the shard's lease and write nothing: every record once."""
    from tests.jobs.light_worker import SlowLightShard
    from tests.slurm_helpers import cancel_run

    monkeypatch.setenv("COT_HPC_LEASE_POLL_S", "1")  # sbatch passes it on to the tasks
    run = tmp_path / "run"
    cfg = _cfg(run, _questions(tmp_path / "q.jsonl", 6), 1)
    stage_dir = run / "generate"
    try:
        run_stages([LightStage(cfg, SlowLightShard(2.0))], cfg, wait=False)
        first = _task_of_shard(run, 0)
        shard = stage_dir / "shards" / "00000.jsonl"
        wait_for(lambda: shard.exists() and shard.read_text().count("\n") >= 1, 120, "a record")
        (run / "launch.json").unlink()  # the first task is now unrecorded
        stage = LightStage(cfg, SlowLightShard(2.0))
        out = run_stages([stage], cfg, wait=False)
        second = _task_of_shard(run, 0)
        assert second != first
        summary = stage.wait(out.backend, out.handles["generate"])
        assert summary["total"] == 6
        states = wait_for(
            lambda: (s := sacct_states([first, second])) and len(s) == 2
            and all(v in ("COMPLETED", "FAILED") for v in s.values()) and s,
            120, "both tasks to end",
        )  # fmt: skip
        assert states == {first: "COMPLETED", second: "COMPLETED"}
        events = [json.loads(x) for x in (stage_dir / "attempts" / "00000").open()]
        assert sum(e["done"] for e in events if e["event"] == "requests") == 6
        assert sum(e["event"] == "start" for e in events) == 1  # the second never started work
        assert "holds its lease" in RunLayout(run).job_log(second).read_text()
    finally:
        cancel_run(run)


def _task_of_shard(run: Path, shard: int) -> str:
    return str(runs.latest_jobs(run, "generate")["shards"][shard])
