"""Training under a launcher instead of a scheduler: ``torchrun``/``accelerate launch`` entry.

``accelerate launch --config_file templates/accelerate_zero2.yaml -m hpc.torchrun FLAGS`` or
``torchrun --nproc-per-node 2 -m hpc.torchrun FLAGS``: every process parses the same ``train``
flags as ``python -m hpc.launch train`` and joins the launcher's rendezvous. It lives with the
CLI layer because it parses the CLI's flags; the job it runs (:class:`jobs.train.Train`) does not.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Validate the ``train`` flags like the CLI does, then run every rank's job in-process."""
    from hpc import config as C
    from hpc import logs
    from hpc.launch import build_parser, overrides
    from hpc.stages import TrainStage
    from jobs.train import Train

    logs.setup()
    ns = build_parser().parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    flags = overrides(ns, C.TrainConfig)
    stage = TrainStage(C.load_config(C.TrainConfig, "train", ns.config, flags))
    stage.validate(set())
    Path(stage.cfg.run_dir).mkdir(parents=True, exist_ok=True)
    summary = Train()(stage.cfg)
    print(f"train: {summary['status']}: adapter in {summary.get('adapter')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
