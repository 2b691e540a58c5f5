"""A torch-free shard worker for scale tests: the real shard protocol, a trivial "model".

It runs :func:`jobs.sharded.run_shard` exactly as generation does (resume, batches, fsync,
marker last); only the engine is replaced by string reversal, so 200 array tasks take seconds.

:class:`SlowLightShard` sleeps per batch, so that a shard's length is set by the clock (for time
limit tests). ``python -m tests.jobs.light_worker --sleep-s S [generate's flags]`` launches it
exactly as ``python -m hpc.launch generate`` launches the real worker (same run folder, same
``--wait``, same exit codes), for tests that need a launcher in a subprocess.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import submitit

from cot.engines import Completion, Engine, Request, never
from hpc.config import GenerateConfig, TrainConfig
from hpc.stages import GenerateStage, TrainStage
from jobs.sharded import Session, run_configured_shard
from jobs.train import Train


class ReverseEngine(Engine):
    """A torch-free engine: completions are the prompts reversed, in batches of ``batch_size``,
    with ``should_stop`` checked between batches as the hf engine does."""

    def __init__(self, batch_size: int, sleep_s: float = 0.0, asked: list[str] | None = None):
        self.batch_size, self.sleep_s, self.asked = max(1, batch_size), sleep_s, asked

    def run(
        self, requests: Sequence[Request], should_stop: Callable[[], bool] = never
    ) -> Iterator[tuple[Request, Completion]]:
        for i in range(0, len(requests), self.batch_size):
            if should_stop():
                return
            batch = requests[i : i + self.batch_size]
            if self.asked is not None:
                self.asked += [str(r.prompt) for r in batch]
            if self.sleep_s:
                time.sleep(self.sleep_s)
            for r in batch:
                yield r, Completion(str(r.prompt)[::-1], 0)


class LightShard(submitit.helpers.Checkpointable):
    """Reverse each question; records look like generation records."""

    sleep_s: float = 0.0
    asked: list[str] | None = None

    def __call__(self, cfg: GenerateConfig, shard: int, stage: str = "generate") -> dict[str, Any]:
        @contextlib.contextmanager
        def session() -> Iterator[Session]:
            engine = ReverseEngine(cfg.batch_size, self.sleep_s, self.asked)
            yield engine, lambda rec: rec["question"]

        return run_configured_shard(
            cfg,
            stage,
            shard,
            open_engine=session,
            to_record=lambda rec, s, c: {"id": rec["id"], "sample": s, "cot": c.text},
        )


class SlowLightShard(LightShard):
    """:class:`LightShard` that sleeps ``sleep_s`` seconds per batch (pickled with the job, so a
    requeued task sleeps the same)."""

    def __init__(self, sleep_s: float) -> None:
        self.sleep_s = sleep_s


class LingeringLightShard(LightShard):
    """:class:`LightShard` that stays alive ``linger_s`` seconds after it marked its shard
    complete (the window in which a preemption signal finds a task whose work is done)."""

    def __init__(self, linger_s: float) -> None:
        self.linger_s = linger_s

    def __call__(self, cfg: GenerateConfig, shard: int, stage: str = "generate") -> dict[str, Any]:
        out = super().__call__(cfg, shard, stage)
        if out["status"] == "complete":
            time.sleep(self.linger_s)
        return out


class DyingLightShard(LightShard):
    """:class:`LightShard` whose first attempt at shard ``shard`` dies (exit 3, no result)
    right after it marked the shard complete: a task that fails once its work is done."""

    def __init__(self, shard: int) -> None:
        self.dies = shard

    def __call__(self, cfg: GenerateConfig, shard: int, stage: str = "generate") -> dict[str, Any]:
        out = super().__call__(cfg, shard, stage)
        if shard == self.dies and out["status"] == "complete":
            os._exit(3)
        return out


class DyingTrain(Train):
    """The real training, whose process then dies (exit 3, no result) once it has written its
    completion marker: a training that fails after its work is done."""

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(DyingTrain(self.requeues + 1), *args, **kwargs)

    def __call__(self, cfg: TrainConfig) -> dict[str, Any]:
        out = super().__call__(cfg)
        if out.get("status") != "already complete":
            os._exit(3)
        return out


class DyingTrainStage(TrainStage):
    """The train stage with :class:`DyingTrain` as its job."""

    def make_job(self) -> Any:
        return DyingTrain()


class LightStage(GenerateStage):
    """The generate stage with a light worker and no model folder to check."""

    def check_models(self, produced: set[Path]) -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    """Launch :class:`SlowLightShard` as the ``generate`` stage; exit codes as ``hpc.launch``."""
    import argparse

    from hpc import config as C
    from hpc import logs
    from hpc.errors import StageFailed
    from hpc.launch import _add_dataclass_flags, overrides
    from hpc.stages import run_stages

    parser = argparse.ArgumentParser(prog="light_worker")
    parser.add_argument("--sleep-s", type=float, default=0.0, help="seconds per batch")
    _add_dataclass_flags(parser, C.GenerateConfig)
    ns = parser.parse_args(argv)
    cfg = C.load_config(C.GenerateConfig, "generate", None, overrides(ns, C.GenerateConfig))
    logs.setup()
    try:
        run_stages([LightStage(cfg, SlowLightShard(ns.sleep_s))], cfg, wait=cfg.wait)
        return 0
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
