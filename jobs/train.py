"""``Train``: every rank of the one training job runs this callable (a submitit Checkpointable).

Preemption (USR2 from SLURM ``--signal``, ``scancel --signal=USR2`` or ``job._interrupt()``):
the handler only sets a flag. At the next optimizer step the ranks all-reduce it, save a
checkpoint together, rank 0 writes the checkpoint's marker last, and then rank 0 hands over to
submitit's own USR2 handler, which calls :meth:`Train.checkpoint`, requeues (keeping the
``max_num_timeout`` accounting) and exits; the other ranks exit too. The restart reruns this
callable, which resumes from the newest *complete* checkpoint on disk. A bare
``scontrol requeue`` skips all of that and lands in the same on-disk resume.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import submitit

from cot.errors import InputError
from hpc.config import TrainConfig
from hpc.layout import RunLayout

log = logging.getLogger(__name__)


def finished(run_dir: str | Path, out_dir: str | Path) -> dict[str, Any] | None:
    """The completion record when this run already trained into ``out_dir``, else None."""
    try:
        marker = RunLayout(Path(run_dir)).train_marker
        data: dict[str, Any] = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("out_dir") != str(Path(out_dir).resolve()):
        return None
    return data


class Train(submitit.helpers.Checkpointable):
    """Train the LoRA adapter described by ``cfg`` (a resolved, path-absolute TrainConfig).

    Args:
        requeues: how many times ``checkpoint()`` requeued this callable. It makes the local
            backend's restarts (which have no ``SLURM_RESTART_COUNT``) pick a fresh port too.
    """

    def __init__(self, requeues: int = 0) -> None:
        self.requeues = requeues

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Requeue the same work; all state is on disk, only the attempt counter moves."""
        return submitit.helpers.DelayedSubmission(Train(self.requeues + 1), *args, **kwargs)

    def __call__(self, cfg: TrainConfig) -> dict[str, Any]:
        from hpc import distributed as D
        from hpc import logs

        logs.setup()  # a job is a fresh process: the same plain-line log as the CLI

        flag = D.PreemptionFlag().install()  # first: a signal during loading must not kill us
        renv = D.from_submitit(self.requeues)
        D.export(renv)
        assert cfg.out_dir is not None, "the Train stage resolves out_dir"
        out_dir = Path(cfg.out_dir)
        done = finished(cfg.run_dir, out_dir)
        if done is not None:
            D.ignore_late_signals()
            return {**done, "status": "already complete"}
        if not Path(str(cfg.data)).is_file():  # the job runs after its upstream ends, however
            raise InputError(
                f"training data {cfg.data} does not exist: the stage that writes it did not "
                f"finish (see python -m hpc.launch status {cfg.run_dir})"
            )
        log.info(
            f"train: rank {renv.rank}/{renv.world_size} (local {renv.local_rank}) on "
            f"{socket.gethostname()} node {renv.node_rank}/{renv.num_nodes}, rendezvous "
            f"{renv.master_addr}:{renv.master_port}, attempt {renv.attempt}"
        )
        import torch

        torch.set_num_threads(max(1, int(cfg.cpus_per_task)))
        if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") == "cpu":
            # The launcher's default (it cannot see this node's GPUs); DeepSpeed must not run
            # its CPU accelerator next to CUDA tensors. Set before deepspeed is imported.
            os.environ["DS_ACCELERATOR"] = "cuda"
        from cot.training import TrainHParams, TrainOutputs, barrier, run_training

        out_dir.mkdir(parents=True, exist_ok=True)
        result = run_training(TrainHParams.pick(cfg), out_dir=out_dir, stop_requested=flag)
        if result.preempted:
            log.info(f"train: preempted at step {result.global_step}; requeueing")
            flag.requeue_and_exit(renv.rank, barrier=barrier)
        summary = {
            **result.to_dict(),
            "status": "complete",
            "out_dir": str(out_dir.resolve()),
            "adapter": str(TrainOutputs(out_dir.resolve()).adapter),
            "time": time.time(),
            "attempt": renv.attempt,
        }
        if renv.is_main:
            from cot.records import atomic_write_text

            atomic_write_text(
                RunLayout(Path(cfg.run_dir)).train_marker, json.dumps(summary, indent=1)
            )
        D.ignore_late_signals()  # the adapter is saved: a USR2 now must not fail the job
        _shutdown()
        return summary


def _shutdown() -> None:
    """Leave the process group cleanly once every rank is done (no stray gloo warnings)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
