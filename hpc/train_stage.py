"""Launching training: validate, submit ONE job of nodes x tasks_per_node processes, wait, report.

1. Validate the data (file:line errors), the student folder and the DeepSpeed config before
   anything is submitted; a bad input exits non-zero with nothing queued.
2. Take the run lock, save the resolved config, skip a training that is already complete.
3. Submit one job through the Executor facade; every process runs :class:`jobs.train.Train`.
   On the local backend the same world size runs as processes on this machine.
4. With ``--wait`` (always locally) block until it ends, printing progress from metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpc import config as C
from hpc import executor as E
from hpc import runs
from hpc.stage import StageFailed, failure_line, job_payload, poll_interval

TRAIN_PATHS = ("student", "data", "out_dir", "deepspeed", "resume_from_checkpoint")


def resolve_paths(cfg: C.TrainConfig) -> C.TrainConfig:
    """Absolute run folder; out_dir defaults to RUN_DIR/train, data to generate's merge.

    A relative ``--deepspeed`` that is not under the current folder is looked up in the repo,
    so the shipped ``templates/ds_zero2.json`` default works from anywhere.
    """
    run_dir = Path(cfg.run_dir).resolve()
    out_dir = Path(cfg.out_dir).resolve() if cfg.out_dir else run_dir / "train"
    data = Path(cfg.data).resolve() if cfg.data else run_dir / "generate" / "merged.jsonl"
    ds = cfg.deepspeed
    if ds and not Path(ds).is_absolute() and not Path(ds).exists() and (C.REPO_ROOT / ds).exists():
        ds = str(C.REPO_ROOT / ds)
    return dataclasses.replace(
        cfg, run_dir=str(run_dir), out_dir=str(out_dir), data=str(data), deepspeed=ds
    )


def job_shape(cfg: C.TrainConfig) -> tuple[int, int]:
    """(tasks per node, GPUs per node): one process per GPU, or one CPU process per node."""
    gpus = cfg.gpus_per_node if cfg.gpus_per_node is not None else cfg.gpus_per_task
    tasks = cfg.tasks_per_node or (gpus if gpus > 0 else 1)
    if tasks < 1:
        raise C.ConfigError(f"--tasks-per-node must be >= 1, got {tasks}")
    if gpus and tasks > gpus:
        raise C.ConfigError(
            f"--tasks-per-node {tasks} exceeds --gpus-per-node {gpus}: "
            "training runs one process per GPU"
        )
    return tasks, gpus


def validate(cfg: C.TrainConfig, *, check_data: bool = True) -> int:
    """Check everything a job would trip over; returns the number of training records.

    ``check_data=False`` is for a pipeline, where the data is written by a job this one waits
    for; the job then checks it (file:line errors) when it starts.
    """
    from cot.models import check_model_dir, check_remote_code
    from cot.training import load_deepspeed_config, read_training_records

    assert cfg.data is not None
    n = len(read_training_records(cfg.data)) if check_data else 0
    check_remote_code(check_model_dir(cfg.student), cfg.trust_remote_code)
    load_deepspeed_config(cfg.deepspeed)
    if cfg.resume_from_checkpoint and not Path(cfg.resume_from_checkpoint).is_dir():
        raise C.ConfigError(
            f"--resume-from-checkpoint {cfg.resume_from_checkpoint}: no such folder"
        )
    job_shape(cfg)
    return n


def payload_of(cfg: C.TrainConfig) -> dict[str, Any]:
    """The config dict the job gets, with every path absolute (jobs start in another folder)."""
    d = job_payload(cfg)
    for key in TRAIN_PATHS:
        if d.get(key):
            d[key] = str(Path(d[key]).resolve())
    return d


def train_complete(cfg: C.TrainConfig) -> bool:
    """True when this run folder already holds a finished training into ``cfg``'s out_dir."""
    from jobs.train import finished

    cfg = resolve_paths(cfg)
    return finished(cfg.run_dir, str(cfg.out_dir)) is not None


def submit_train(
    cfg: C.TrainConfig,
    *,
    dependency: Sequence[str] = (),
    kind: str | None = None,
    validated: bool = False,
) -> tuple[Any | None, dict[str, Any] | None]:
    """Submit the training job; the caller holds the run lock (``launch_train``, the pipeline).

    Unless the caller has ``validated`` it already, the config is checked here, the data too
    when it exists; in a pipeline the data is written by a job this one depends on, and the job
    validates it (file:line errors) when it starts.
    Returns (job, None) on SLURM, and (None, summary) locally, where it runs to the end.
    """
    from cot.records import atomic_write_text
    from jobs.train import Train

    cfg = resolve_paths(cfg)
    if not validated:
        validate(cfg, check_data=Path(str(cfg.data)).exists() or not dependency)
    run_dir = Path(cfg.run_dir)
    out_dir = Path(str(cfg.out_dir))
    tasks, gpus = job_shape(cfg)
    C.save_resolved(run_dir, "train", cfg)
    atomic_write_text(out_dir / "config.yaml", yaml_dump(C.to_dict(cfg)))
    ex = E.Executor(cfg, run_dir / "logs", name=f"cot-train {run_dir.name}", kind=kind)
    # The local backend has one "node": run the whole world there, so results match SLURM.
    nodes, per_node = (cfg.nodes, tasks) if ex.kind == "slurm" else (1, cfg.nodes * tasks)
    job = ex.submit(
        Train(),
        payload_of(cfg),
        nodes=nodes,
        tasks_per_node=per_node,
        gpus=gpus,
        dependency=list(dependency),
    )
    runs.record_launch(
        run_dir,
        "train",
        {"kind": ex.kind, "job": str(job.job_id), "nodes": nodes, "tasks_per_node": per_node},
    )
    after = f" (afterok {', '.join(dependency)})" if dependency else ""
    print(
        f"train: job {job.job_id} on {ex.kind}{after}: {nodes} node(s) x {per_node} "
        f"process(es), out {out_dir}, logs {run_dir / 'logs'}",
        flush=True,
    )
    if ex.kind == "slurm":
        return job, None
    return None, wait_train(job, ex.kind, run_dir, out_dir)


def launch_train(cfg: C.TrainConfig) -> int:
    """Run (or submit) a training end to end; returns an exit code.

    Raises:
        RecordError, ModelError, ConfigError, ValueError: bad input, before any submission.
        StageFailed: the job failed; the message names its log files.
    """
    from jobs.train import finished

    cfg = resolve_paths(cfg)
    n_records = validate(cfg)
    print(f"train: {n_records} training records in {cfg.data}")
    run_dir = runs.make_run_dir(cfg.run_dir)
    with runs.run_lock(run_dir):
        done = finished(run_dir, str(cfg.out_dir))
        if done is not None:
            print(
                f"train: already complete ({done.get('global_step')} steps), adapter in "
                f"{done.get('adapter')}"
            )
            return 0
        kind = E.choose_cluster(cfg.cluster)
        live = _live_job(run_dir) if kind == "slurm" else None
        if live:
            print(f"train: job {live} is already queued or running for {run_dir}; not resubmitted")
            return 0
        job, _ = submit_train(cfg, kind=kind, validated=True)  # checked above, before the lock
        if job is None:
            return 0
        if not cfg.wait:
            print(f"  status: python -m hpc.launch status {run_dir}")
            return 0
        wait_train(job, kind, run_dir, Path(str(cfg.out_dir)))
        return 0


def yaml_dump(data: dict[str, Any]) -> str:
    """YAML text of a config dict, in field order."""
    import yaml

    return str(yaml.safe_dump(data, sort_keys=False))


def _live_job(run_dir: Path) -> str | None:
    """The run's previous training job when SLURM still has it queued or running."""
    jid = runs.latest_jobs(run_dir, "train").get("job")
    if not jid:
        return None
    states = E.job_states([jid]) or {}
    return jid if states.get(jid, "") in E.ACTIVE_STATES else None


def _progress(out_dir: Path) -> str | None:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return None
    lines = path.read_text(encoding="utf-8").strip().splitlines()
    try:
        row = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    if not row:
        return None
    return f"train: step {row['step']}  loss {row['loss']:.4f}  {row['tokens_per_s']:.0f} tok/s"


def wait_train(job: Any, kind: str, run_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Block until the job ends; print progress; raise StageFailed with the logs on failure."""
    interval = 1.0 if kind == "local" else poll_interval()
    last = None
    t0 = time.time()
    while not (job.done() if kind == "local" else job.done(force_check=True)):
        line = _progress(out_dir)
        if line and line != last:
            print(line, flush=True)
            last = line
        time.sleep(interval)
    try:
        # One result per process; rank 0's carries the summary.
        result = job.results()[0]
    except Exception as e:  # any job failure is reported with its logs
        logs = run_dir / "logs"
        raise StageFailed(
            f"train: job {job.job_id} failed: {failure_line(str(e))}\n"
            f"  log: {logs / f'{job.job_id}_0_log.err'} (every rank: {job.job_id}_*_log.err)"
        ) from None
    data = result.get("data", {})
    over = sum(data.get(k, 0) for k in ("truncated", "dropped_overlong", "dropped_no_answer"))
    print(
        f"train: complete in {time.time() - t0:.0f}s: {result.get('global_step')} steps, final "
        f"loss {result.get('final_loss')}, ZeRO stage {result.get('engine', {}).get('zero_stage')}"
        f"\n  data:    {data.get('kept')} of {data.get('records')} records trained on, "
        f"{over} over --max-length ({data.get('truncated', 0)} truncated, "
        f"{data.get('dropped_overlong', 0) + data.get('dropped_no_answer', 0)} dropped)"
        f"\n  adapter: {result.get('adapter')}\n  metrics: {out_dir / 'metrics.jsonl'}"
        f"\n  plot:    {out_dir / 'training_loss.png'}",
        flush=True,
    )
    return result
