"""The shard loop shared by ``generate`` and ``evaluate``: resume, request, append, mark.

A task opens its engine once (the model in-process, or an inference server), skips the keys
already in its shard file (after dropping a torn last line), sends the rest as requests,
appends each completion as it finishes (flushed at once, fsync'd within a second), and writes
the completion marker last. Preemption costs at most the requests in flight: a batch for the
``hf`` engine, ``--concurrency`` requests for the ``server`` engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cot.engines import Completion, Engine, Prompt, Request
from cot.records import DurableAppender
from hpc import logs
from hpc import shards as S
from hpc.config import ShardedFields
from hpc.distributed import ignore_late_signals
from hpc.layout import RunLayout, StageLayout
from hpc.locks import Busy, FileLock, holder_text

log = logging.getLogger(__name__)

Item = tuple[dict[str, Any], int]  # (input record, sample index)
PROGRESS_EVERY_S = 5.0  # how often a task tells ``status`` its count (progress/<shard>)


def progress(total: int, initial: int, desc: str) -> Any:
    """tqdm that reads well in a SLURM log: one line per >= 30 s when stdout is not a TTY."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        mininterval=0.5 if tty else 30.0,
        dynamic_ncols=tty,
        ascii=not tty,
    )


def record_head(rec: dict[str, Any], sample: int) -> dict[str, Any]:
    """The fields every shard record opens with, in this order: the merge checks the
    ``{"id": ..., "sample": N,`` prefix of each line without parsing it."""
    return {
        "id": rec["id"],
        "sample": sample,
        "category": rec.get("category"),
        "question": rec["question"],
    }


def gold_of(rec: dict[str, Any]) -> tuple[str, bool] | None:
    """A record's gold answer reduced to its final answer when it is a worked solution (GSM8K's
    ``#### 18``, a ``Final Answer:`` line, ``\\boxed{}``), and whether it was; None when the
    record has no gold (missing, null or blank): it is then unscored, never wrong."""
    from cot.answers import reduce_gold

    gold = rec.get("answer")
    if gold is None or not str(gold).strip():
        return None
    return reduce_gold(str(gold))


def task_info() -> dict[str, Any]:
    """Who is running this attempt (logged in attempts/<shard>)."""
    env = os.environ
    return {
        "event": "start",
        "time": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID"),
        "array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
        "restart_count": int(env.get("SLURM_RESTART_COUNT", "0")),
    }


class Terminated(SystemExit):
    """SIGTERM arrived: Slurm is ending this attempt (a requeue, a cancel, a node going down)."""


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[Callable[[], bool]]:
    """Yield a check that turns true once SIGTERM has arrived; restore the handler after.

    Slurm sends SIGTERM, then SIGKILL ``KillWait`` seconds later, when it ends an attempt
    without the preemption signal (``scontrol requeue``, ``scancel``). submitit only logs it,
    so a task would go on computing records it cannot finish; checking between batches stops it
    at a record boundary instead, with everything before it on disk.
    """
    seen = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield seen.is_set
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: seen.set())
    try:
        yield seen.is_set
    finally:
        signal.signal(signal.SIGTERM, previous)


def request_seed(seed: int, key: S.Key) -> int:
    """A per-request 32-bit sampling seed that depends only on the run's seed and the record
    key (id, sample): the same in any batch, any shard count and after any resume."""
    h = hashlib.sha256(f"{seed}:{[key]}".encode()).hexdigest()
    return int(h[:8], 16)


# What a stage gives the loop: an engine opener (it loads the model or starts the server only
# when there is work) that yields the engine and the prompt builder, and a record builder.
Session = tuple[Engine, Callable[[dict[str, Any]], Prompt]]
OpenEngine = Callable[[], contextlib.AbstractContextManager[Session]]
ToRecord = Callable[[dict[str, Any], int, Completion], dict[str, Any]]


@dataclass(frozen=True)
class ShardWork:
    """What one shard task generates: its input (the plan holds its selection), seed, engine
    and record maker."""

    input_path: str
    seed: int
    open_engine: OpenEngine
    to_record: ToRecord


def run_shard(stage_dir: Path, shard: int, work: ShardWork) -> dict[str, Any]:
    """Run (or resume) one shard; returns counts. Idempotent once the marker exists.

    Each completion is appended as it finishes (flushed at once, fsync'd within a second), so a
    preemption loses at most the requests in flight; a resume skips every (id, sample) on disk.
    """
    if S.marker_path(stage_dir, shard).exists():
        return {"shard": shard, "status": "already complete"}
    info = task_info()
    with shard_lease(stage_dir, shard, info=info) as lease:
        if lease is None:  # another task finished the shard while this one waited
            return {"shard": shard, "status": "already complete"}
        return _run_leased(stage_dir, shard, lease, work, info)


@contextlib.contextmanager
def shard_lease(
    stage_dir: Path, shard: int, poll_s: float | None = None, info: dict[str, Any] | None = None
) -> Iterator[FileLock | None]:
    """Hold the shard's lease: the one task that may append to its file.

    Two live tasks for one shard (a relaunch that missed a queued job, a requeue racing a
    stuck node) must never write one file: the second one waits here, naming the holder, until
    the holder ends. It then yields None when the holder completed the shard, or the lease to
    resume what the holder left.
    """
    info = info or task_info()
    lease = FileLock(
        StageLayout(stage_dir).lease(shard),
        {k: info[k] for k in ("job_id", "restart_count")},
    )
    poll = poll_s if poll_s is not None else float(os.environ.get("COT_HPC_LEASE_POLL_S", "10"))
    said = False
    while True:
        try:
            lease.acquire()
            break
        except Busy as busy:
            if not said:
                log.warning(
                    f"shard {shard}: another task holds its lease ({holder_text(busy.holder)}); "
                    "waiting for it to end, this task writes nothing meanwhile"
                )
                said = True
            if S.marker_path(stage_dir, shard).exists():
                yield None
                return
            time.sleep(poll)
    try:
        if S.marker_path(stage_dir, shard).exists():
            yield None
        else:
            S.append_attempt(stage_dir, shard, {"event": "lease", **lease.info})
            yield lease
    finally:
        lease.release()


def _run_leased(
    stage_dir: Path, shard: int, lease: FileLock, work: ShardWork, info: dict[str, Any]
) -> dict[str, Any]:
    seed, to_record = work.seed, work.to_record
    plan = S.load_plan(stage_dir)
    # Only this shard's bytes are read, and checked against the sha256 the launch recorded.
    records = plan.records(shard, work.input_path)
    S.append_attempt(stage_dir, shard, {**info, "time": time.time()})  # work begins now
    path = S.shard_path(stage_dir, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = S.recover_shard(path)
    wanted = plan.keys(shard, records)
    by_id = {r["id"]: r for r in records}
    todo: list[Item] = [(by_id[rid], s) for rid, s in wanted if (rid, s) not in done]
    log.info(
        f"shard {shard}: {len(wanted)} records, {len(done)} already on disk, {len(todo)} to go"
    )
    S.append_attempt(stage_dir, shard, {"event": "resume", "on_disk": len(done), "todo": len(todo)})
    if todo:
        generated, tokens, t0 = 0, 0, time.time()
        S.write_progress(stage_dir, shard, len(done))
        told = time.monotonic()
        with work.open_engine() as (engine, prompt_of):
            items = {(it[0]["id"], it[1]): it for it in todo}
            requests = [
                Request(k, prompt_of(it[0]), request_seed(seed, k)) for k, it in items.items()
            ]
            bar = progress(len(wanted), len(wanted) - len(todo), f"shard {shard}")
            try:
                with stop_on_sigterm() as terminated, DurableAppender(path) as out:
                    for req, completion in engine.run(requests, should_stop=terminated):
                        rec, sample = items[req.key]
                        try:
                            out.write([to_record(rec, sample, completion)])
                        except OSError as e:
                            # The shard keeps every whole line written so far and gets no
                            # marker; the next start drops the torn tail and resumes there.
                            raise OSError(
                                e.errno,
                                f"{path}: writing shard {shard} failed ({e.strerror}); it stays "
                                "incomplete and resumes from its last whole record when "
                                "relaunched",
                            ) from e
                        generated += 1
                        tokens += completion.tokens
                        lease.refresh()
                        bar.update(1)
                        if time.monotonic() - told >= PROGRESS_EVERY_S:
                            S.write_progress(stage_dir, shard, len(done) + generated)
                            told = time.monotonic()
                    if terminated():
                        log.info(f"shard {shard}: SIGTERM, stopping at a record boundary")
                        raise Terminated(128 + signal.SIGTERM)
            finally:
                bar.close()
                S.write_progress(stage_dir, shard, len(done) + generated)
                S.append_attempt(
                    stage_dir,
                    shard,
                    {"event": "requests", "sent": getattr(engine, "sent", None), "done": generated},
                )
        dt = time.time() - t0
        log.info(f"shard {shard}: {generated} records, {tokens} tokens in {dt:.1f}s")
    n = S.finish_shard(stage_dir, plan, shard, wanted)
    return {"shard": shard, "status": "complete", "records": n, "generated": len(todo)}


def run_configured_shard(
    cfg: ShardedFields,
    stage: str,
    shard: int,
    *,
    open_engine: OpenEngine,
    to_record: ToRecord,
) -> dict[str, Any]:
    """:func:`run_shard` for a stage config: its run folder, input, selection and seed."""
    logs.setup()  # a job is a fresh process: the same plain-line log as the CLI
    work = ShardWork(cfg.input, cfg.seed, open_engine, to_record)
    out = run_shard(RunLayout(Path(cfg.run_dir)).stage(stage).dir, shard, work)
    ignore_late_signals()  # the marker is written: a USR2 now must not fail a finished task
    return out


def set_threads(cfg: ShardedFields) -> None:
    """Use the CPUs the task was given, no more (torch defaults to every core of the node)."""
    import torch

    torch.set_num_threads(max(1, int(cfg.cpus_per_task)))
