"""A torch-free shard worker for scale tests: the real shard protocol, a trivial "model".

It runs :func:`jobs.sharded.run_shard` exactly as generation does (resume, batches, fsync,
marker last); only the model is replaced by string reversal, so 200 array tasks take seconds.

:class:`SlowLightShard` sleeps per batch, so that a shard's length is set by the clock (for time
limit tests). ``python -m tests.jobs.light_worker --sleep-s S [generate's flags]`` launches it
exactly as ``python -m hpc.launch generate`` launches the real worker (same run folder, same
``--wait``, same exit codes), for tests that need a launcher in a subprocess.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import submitit

from hpc.config import GenerateConfig
from hpc.stages import GenerateStage
from jobs.sharded import run_configured_shard


class LightShard(submitit.helpers.Checkpointable):
    """Reverse each question; records look like generation records."""

    sleep_s: float = 0.0

    def __call__(self, cfg: GenerateConfig, shard: int, stage: str = "generate") -> dict[str, Any]:
        def generate(model: Any, tok: Any, prompts: list[str], seed: int) -> tuple[list[str], int]:
            if self.sleep_s:
                time.sleep(self.sleep_s)
            return [p[::-1] for p in prompts], 0

        return run_configured_shard(
            cfg,
            stage,
            shard,
            load=lambda: (None, lambda text: {"input_ids": text.split()}),
            prompt_of=lambda rec: rec["question"],
            generate=generate,
            to_record=lambda rec, s, text: {"id": rec["id"], "sample": s, "cot": text},
        )


class SlowLightShard(LightShard):
    """:class:`LightShard` that sleeps ``sleep_s`` seconds per batch (pickled with the job, so a
    requeued task sleeps the same)."""

    def __init__(self, sleep_s: float) -> None:
        self.sleep_s = sleep_s


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
