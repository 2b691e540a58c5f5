"""The shard loop shared by ``generate`` and ``evaluate``: resume, batch, append, mark.

A task loads its model once, skips the keys already in its shard file (after dropping a torn
last line), generates the rest in length-grouped batches, appends each batch with fsync, and
writes the completion marker last. Preemption costs at most the batch in flight.
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
from pathlib import Path
from typing import Any

from cot.records import append_durable, read_questions
from hpc import logs
from hpc import shards as S
from hpc.config import ShardedFields
from hpc.layout import RunLayout

log = logging.getLogger(__name__)

Item = tuple[dict[str, Any], int]  # (input record, sample index)


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


def batch_seed(seed: int, keys: list[S.Key]) -> int:
    """A sampling seed that depends only on the batch's keys, so a rerun samples the same."""
    h = hashlib.sha256(f"{seed}:{keys}".encode()).hexdigest()
    return int(h[:8], 16)


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


def run_shard(
    stage_dir: Path,
    shard: int,
    *,
    input_path: str,
    start_index: int,
    num_samples: int | None,
    batch_size: int,
    seed: int,
    load: Callable[[], tuple[Any, Any]],
    prompt_of: Callable[[dict[str, Any]], str],
    generate: Callable[[Any, Any, list[str], int], tuple[list[str], int]],
    to_record: Callable[[dict[str, Any], int, str], dict[str, Any]],
) -> dict[str, Any]:
    """Run (or resume) one shard; returns counts. Idempotent once the marker exists."""
    if S.marker_path(stage_dir, shard).exists():
        return {"shard": shard, "status": "already complete"}
    plan = S.load_plan(stage_dir)
    if S.sha256_file(input_path) != plan.input_sha256:
        raise S.PlanError(
            f"{input_path}: the input changed since the launch (sha256 differs from "
            f"{stage_dir / 'plan.json'}); relaunch into a new --run-dir"
        )
    S.append_attempt(stage_dir, shard, task_info())
    path = S.shard_path(stage_dir, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = S.recover_shard(path)
    lo, hi = plan.ranges[shard]
    records = read_questions(input_path, start_index=start_index, num_samples=num_samples)[lo:hi]
    wanted = plan.keys(shard)
    by_id = {r["id"]: r for r in records}
    todo: list[Item] = [(by_id[rid], s) for rid, s in wanted if (rid, s) not in done]
    log.info(
        f"shard {shard}: {len(wanted)} records, {len(done)} already on disk, {len(todo)} to go"
    )
    if todo:
        model, tokenizer = load()
        prompts = {id(item): prompt_of(item[0]) for item in todo}
        lengths = {k: len(tokenizer(p)["input_ids"]) for k, p in prompts.items()}
        from cot.generation import length_grouped

        batches = length_grouped(todo, lambda it: lengths[id(it)], batch_size)
        bar = progress(len(wanted), len(wanted) - len(todo), f"shard {shard}")
        tokens, t0 = 0, time.time()
        with stop_on_sigterm() as terminated, open(path, "a", encoding="utf-8") as out:
            for batch in batches:
                if terminated():
                    log.info(f"shard {shard}: SIGTERM, stopping at a record boundary")
                    raise Terminated(128 + signal.SIGTERM)
                keys = [(it[0]["id"], it[1]) for it in batch]
                S.append_attempt(stage_dir, shard, {"event": "batch", "n": len(batch)})
                texts, n_tok = generate(
                    model, tokenizer, [prompts[id(it)] for it in batch], batch_seed(seed, keys)
                )
                tokens += n_tok
                recs = [to_record(it[0], it[1], t) for it, t in zip(batch, texts, strict=True)]
                try:
                    append_durable(out, recs)
                except OSError as e:
                    # The shard keeps every whole line written so far and gets no marker; the
                    # next start drops the torn tail and resumes from there.
                    raise OSError(
                        e.errno,
                        f"{path}: writing shard {shard} failed ({e.strerror}); it stays "
                        "incomplete and resumes from its last whole record when relaunched",
                    ) from e
                bar.update(len(batch))
        bar.close()
        dt = time.time() - t0
        log.info(f"shard {shard}: {len(todo)} records, {tokens} tokens in {dt:.1f}s")
    n = S.finish_shard(stage_dir, plan, shard)
    return {"shard": shard, "status": "complete", "records": n, "generated": len(todo)}


def run_configured_shard(
    cfg: ShardedFields,
    stage: str,
    shard: int,
    *,
    load: Callable[[], tuple[Any, Any]],
    prompt_of: Callable[[dict[str, Any]], str],
    generate: Callable[[Any, Any, list[str], int], tuple[list[str], int]],
    to_record: Callable[[dict[str, Any], int, str], dict[str, Any]],
) -> dict[str, Any]:
    """:func:`run_shard` for a stage config: its run folder, input, selection, batch and seed."""
    logs.setup()  # a job is a fresh process: the same plain-line log as the CLI
    return run_shard(
        RunLayout(Path(cfg.run_dir)).stage(stage).dir,
        shard,
        input_path=cfg.input,
        start_index=cfg.start_index,
        num_samples=cfg.num_samples,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        load=load,
        prompt_of=prompt_of,
        generate=generate,
        to_record=to_record,
    )


def set_threads(cfg: ShardedFields) -> None:
    """Use the CPUs the task was given, no more (torch defaults to every core of the node)."""
    import torch

    torch.set_num_threads(max(1, int(cfg.cpus_per_task)))
