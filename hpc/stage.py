"""Launching a sharded stage (``generate``, ``evaluate``): validate, plan, submit, merge, wait.

1. Validate the input fully (file:line errors) and the model folder, before submitting anything.
2. Write the plan once, or refuse a relaunch with another input or shard count.
3. Submit only the shards with no marker and no live job, as one array per ``MaxArraySize``.
4. Merge: an ``afterok`` job on SLURM, inline when local.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cot.records import read_questions
from hpc import config as C
from hpc import executor as E
from hpc import runs
from hpc import shards as S

PATH_KEYS = ("teacher", "input", "output", "run_dir", "prompt_template", "base_model", "lora_model")


class StageFailed(RuntimeError):
    """Some shards or the merge failed for good; the message names them and their logs."""


def poll_interval() -> float:
    """Seconds between scheduler polls (COT_HPC_POLL_S; at least 30 s is polite on clusters)."""
    return float(os.environ.get("COT_HPC_POLL_S", "30"))


def job_payload(cfg: Any) -> dict[str, Any]:
    """The config as a plain dict with absolute paths, for the job pickles."""
    d = C.to_dict(cfg)
    for k in PATH_KEYS:
        if d.get(k):
            d[k] = str(Path(d[k]).resolve())
    return d


@dataclass
class Submitted:
    """What a stage launch did: on SLURM the jobs to depend on; locally, the finished merge."""

    stage: str
    kind: str
    run_dir: Path
    plan: S.Plan
    merge_job: Any | None = None
    array_ids: list[str] = dataclasses.field(default_factory=list)
    summary: dict[str, Any] | None = None

    @property
    def dependency(self) -> list[str]:
        """Job ids a later stage must wait for (none when the stage already finished)."""
        return [str(self.merge_job.job_id)] if self.merge_job is not None else []


def submit_sharded(
    stage: str,
    cfg: Any,
    worker: Any,
    *,
    check_models: Callable[[], None],
    keep: str = "all",
    samples: int = 1,
    dependency: Sequence[str] = (),
    kind: str | None = None,
    validate_input: bool = True,
) -> Submitted:
    """Plan and submit a sharded stage; locally it runs to the end (merge included).

    The caller holds the run lock. Bad input or a missing model stops here, before any job.
    """
    from jobs.merge import Merge, describe

    run_dir = Path(cfg.run_dir)
    records = read_questions(cfg.input, start_index=cfg.start_index, num_samples=cfg.num_samples)
    if validate_input:
        check_models()
    stage_dir = run_dir / stage
    selection = {"start_index": cfg.start_index, "num_samples": cfg.num_samples}
    plan = S.make_plan(cfg.input, [r["id"] for r in records], cfg.shards, samples, selection)
    if keep == "correct" and not any("answer" in r for r in records):
        raise C.ConfigError(f"{cfg.input}: --keep correct needs an `answer` field in the input")
    plan = S.write_or_check_plan(stage_dir, plan)
    C.save_resolved(run_dir, stage, cfg)
    payload = job_payload(cfg)
    outputs = [payload["output"]] if payload.get("output") else []
    todo = S.incomplete(stage_dir, plan)
    ex = E.Executor(cfg, run_dir / "logs", name=f"cot-{stage} {run_dir.name}", kind=kind)
    print(f"{stage}: {plan.shards} shards, {len(todo)} to run, run folder {run_dir}")
    done = Submitted(stage, ex.kind, run_dir, plan)
    if not todo:
        if not (stage_dir / "merge.json").exists() or outputs:
            done.summary = Merge()(str(run_dir), stage, outputs, keep)
            print(describe(done.summary))
        else:
            print(f"{stage}: already complete and merged")
        return done
    if ex.kind == "slurm":
        return _submit_slurm(done, ex, todo, worker, payload, outputs, keep, dependency)
    # Locally the executor starts jobs as slots free up; the list fills in while it drains.
    jobs = ex.submit_array([(worker, (payload, i, stage)) for i in todo])
    ex.drain_local()
    runs.record_launch(
        run_dir, stage, {"kind": "local", "shards": dict(zip(todo, _ids(jobs), strict=True))}
    )
    failed = _failed_local(jobs, todo)
    if failed:
        raise StageFailed(_failure_text(stage, failed))
    done.summary = Merge()(str(run_dir), stage, outputs, keep)
    print(describe(done.summary))
    return done


def launch_sharded(stage: str, cfg: Any, worker: Any, **kwargs: Any) -> int:
    """The ``generate``/``evaluate`` command: lock the run folder, submit, optionally wait."""
    run_dir = runs.make_run_dir(cfg.run_dir)
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    with runs.run_lock(run_dir):
        sub = submit_sharded(stage, cfg, worker, **kwargs)
    if sub.merge_job is not None and cfg.wait:
        wait_stage(sub)
    return 0


def submit_after(
    cfg: Any,
    run_dir: Path,
    name: str,
    fn: Any,
    args: tuple[Any, ...],
    dependency: Sequence[str],
    kind: str,
) -> tuple[Any | None, Any]:
    """Run a single-task step after ``dependency``: a SLURM job (afterok), or inline locally.

    Returns (job, None) on SLURM and (None, result) locally.
    """
    if kind != "slurm":
        return None, fn(*args)
    ex = E.Executor(cfg, run_dir / "logs", name=f"cot-{name} {run_dir.name}", kind=kind)
    job = ex.submit(fn, *args, dependency=dependency)
    runs.record_launch(run_dir, name, {"kind": kind, "job": str(job.job_id)})
    print(f"{name}: job {job.job_id} (afterok {', '.join(dependency) or 'nothing'})")
    return job, None


def _ids(jobs: list[Any]) -> list[str]:
    return [str(j.job_id) for j in jobs]


def _failed_local(jobs: list[Any], shards: list[int]) -> list[tuple[int, str, str]]:
    failed = []
    for shard, job in zip(shards, jobs, strict=True):
        try:
            job.result()
        except Exception as e:
            failed.append((shard, str(job.paths.stderr), failure_line(str(e))))
    return failed


def failure_line(text: str) -> str:
    """The exception line of a submitit failure (its traceback sits between dashed rules,
    followed by the log paths)."""
    parts = text.split("-" * 22)
    body = parts[1] if len(parts) >= 3 else text
    lines = [ln.strip() for ln in body.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "failed")[:300]


def _failure_text(stage: str, failed: list[tuple[int, str, str]]) -> str:
    lines = [f"{stage}: {len(failed)} shard(s) failed for good:"]
    for shard, log, why in failed:
        what = f"shard {S.shard_name(shard)}" if shard >= 0 else "merge"  # -1: the merge job
        cause = last_error(log)
        lines.append(f"  {what}: {why}" + (f"\n    cause: {cause}" if cause else ""))
        lines.append(f"    log: {log}")
    return "\n".join(lines)


def last_error(log: str | Path, tail_bytes: int = 65536) -> str | None:
    """The last line of a job log that says why it ended (an exception or submitit's verdict)."""
    try:
        with open(log, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - tail_bytes))
            text = fh.read().decode(errors="replace")
    except OSError:
        return None
    keys = ("Error", "Exception", "not requeued", "timed-out", "CANCELLED", "Killed")
    hits = [ln.strip() for ln in text.splitlines() if any(k in ln for k in keys)]
    return hits[-1][:300] if hits else None


def _submit_slurm(
    done: Submitted,
    ex: E.Executor,
    todo: list[int],
    worker: Any,
    payload: dict[str, Any],
    outputs: list[str],
    keep: str,
    dependency: Sequence[str],
) -> Submitted:
    from jobs.merge import Merge

    stage, run_dir = done.stage, done.run_dir
    known = runs.latest_jobs(run_dir, stage)["shards"]
    alive = E.live_jobs([known[i] for i in todo if i in known])
    live = {i: known[i] for i in todo if known.get(i) in alive}
    if live:
        print(
            f"{stage}: {len(live)} shard(s) already queued or running, not resubmitted: "
            + ", ".join(f"{S.shard_name(i)} (job {j})" for i, j in sorted(live.items()))
        )
    submit = [i for i in todo if i not in live]
    calls = [(worker, (payload, i, stage)) for i in submit]
    jobs = ex.submit_array(calls, dependency=dependency) if submit else []
    # A live shard of an earlier array is waited on by its task id (``12_3``): ``afterok`` on the
    # whole earlier array could never be met once one of its tasks has failed for good.
    deps = E.job_ids(jobs) + sorted(set(live.values()))
    merge = ex.submit(Merge(), str(run_dir), stage, outputs, keep, dependency=deps)
    done.merge_job, done.array_ids = merge, E.job_ids(jobs)
    runs.record_launch(
        run_dir,
        stage,
        {
            "kind": "slurm",
            "shards": dict(zip(submit, _ids(jobs), strict=True)),
            "merge": str(merge.job_id),
            "arrays": done.array_ids,
        },
    )
    arrays = ", ".join(done.array_ids) or "none"
    print(
        f"{stage}: submitted {len(submit)} shard(s) as array job(s) {arrays}; "
        f"merge job {merge.job_id} (afterok)"
    )
    print(f"  status: python -m hpc.launch status {run_dir}")
    return done


def wait_stage(sub: Submitted) -> dict[str, Any]:
    """Block until the merge job ends, printing shard progress; raise if a shard failed for good."""
    from jobs.merge import describe

    stage, run_dir, plan, merge = sub.stage, sub.run_dir, sub.plan, sub.merge_job
    assert merge is not None, "wait_stage needs a submitted merge job"
    stage_dir = run_dir / stage
    interval = poll_interval()
    last = -1
    while True:
        done = len(S.completed(stage_dir))
        if done != last:
            print(f"{stage}: {done}/{plan.shards} shards complete", flush=True)
            last = done
        info = runs.latest_jobs(run_dir, stage)
        ids = [*info["shards"].values(), str(merge.job_id)]
        states = E.job_states(ids) or {}
        merge_state = states.get(str(merge.job_id), "UNKNOWN")
        if merge_state == "COMPLETED":
            summary: dict[str, Any] = merge.result()
            print(describe(summary))
            return summary
        missing = S.incomplete(stage_dir, plan)
        dead = [
            (i, info["shards"][i])
            for i in missing
            if states.get(info["shards"].get(i, ""), "") in E.FAILED_STATES
        ]
        if dead or merge_state in E.FAILED_STATES:
            failed = [(i, _log_of(run_dir, jid), f"job {jid} {states.get(jid)}") for i, jid in dead]
            if not failed:
                failed = [(-1, _log_of(run_dir, str(merge.job_id)), f"merge {merge_state}")]
            raise StageFailed(_failure_text(stage, failed))
        time.sleep(interval)


def _log_of(run_dir: Path, job_id: str) -> str:
    return str(run_dir / "logs" / f"{job_id}_0_log.err")
