"""A torch-free shard worker for scale tests: the real shard protocol, a trivial "model".

It runs :func:`jobs.sharded.run_shard` exactly as generation does (resume, batches, fsync,
marker last); only the model is replaced by string reversal, so 200 array tasks take seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import submitit

from jobs.sharded import run_shard


class LightShard(submitit.helpers.Checkpointable):
    """Reverse each question; records look like generation records."""

    def __call__(self, cfg: dict[str, Any], shard: int, stage: str = "generate") -> dict[str, Any]:
        def generate(model: Any, tok: Any, prompts: list[str], seed: int) -> tuple[list[str], int]:
            return [p[::-1] for p in prompts], 0

        return run_shard(
            Path(cfg["run_dir"]) / stage,
            shard,
            input_path=cfg["input"],
            start_index=cfg["start_index"],
            num_samples=cfg["num_samples"],
            batch_size=cfg["batch_size"],
            seed=cfg["seed"],
            load=lambda: (None, lambda text: {"input_ids": text.split()}),
            prompt_of=lambda rec: rec["question"],
            generate=generate,
            to_record=lambda rec, s, text: {"id": rec["id"], "sample": s, "cot": text},
        )
