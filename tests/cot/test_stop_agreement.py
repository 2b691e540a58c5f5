"""Ranks agree on a stop: a two-process gloo group where only one rank is signalled.

``scancel`` signals every rank at once, so the Slurm preemption tests cannot tell whether the
ranks all-reduce the stop flag. Here only rank 1 asks to stop, at step 3: both ranks must stop,
and ask for the save, at that same step.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from cot import training as T

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        step = [0]
        stop, *_ = T.make_callbacks(
            checkpoint_root=Path(out),
            keep=2,
            metrics_path=Path(out) / f"m{rank}.jsonl",
            stop_requested=lambda: rank == 1 and step[0] >= 3,
            world_size=2,
        )
        args = SimpleNamespace(device="cpu")
        for step[0] in range(1, 7):
            control = SimpleNamespace(should_save=False, should_training_stop=False)
            stop.on_step_end(args, SimpleNamespace(global_step=step[0]), control)
            if control.should_training_stop:
                break
        Path(out, f"rank{rank}").write_text(f"{stop.stopped_at} {control.should_save}")
        dist.barrier()  # neither rank tears gloo down while the other may still be using it
    finally:
        dist.destroy_process_group()


def test_only_one_rank_signalled_both_stop_and_save_at_the_same_step(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    # Imported once here, where other tests need them too; the forked ranks inherit them.
    from transformers import TrainerCallback  # noqa: F401

    # fork: the ranks start from this process with torch and transformers already imported
    # (spawn would import them again in each rank).
    mp.start_processes(
        _rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    got: list[Any] = [(tmp_path / f"rank{r}").read_text() for r in (0, 1)]
    assert got == ["3 True", "3 True"]
