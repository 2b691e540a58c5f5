"""The ``merge`` stage where it stands alone: ``python -m hpc.launch merge RUN_DIR`` by hand.

Normally the merge runs after a sharded stage's array (see :mod:`hpc.stages.sharded`); this
reruns it in the launcher, with the output and ``--keep`` the launch recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpc.backends import Backend, Call, DoneHandle, Handle
from hpc.layout import RunLayout
from hpc.stages.base import Stage

log = logging.getLogger(__name__)


class MergeStage(Stage):
    """Verify every shard of ``stage`` and write its merged file (and copy it to ``output``)."""

    def __init__(self, run_dir: Path, stage: str, output: str | None, keep: str):
        super().__init__(RunLayout(Path(run_dir)))
        self.name, self.stage, self.output, self.keep = "merge", stage, output, keep

    @classmethod
    def from_run(
        cls, run_dir: Path, stage: str, output: str | None, keep: str | None
    ) -> MergeStage:
        """Take ``output`` and ``keep`` from the run's resolved config unless given."""
        import yaml

        layout = RunLayout(Path(run_dir))
        resolved: dict[str, Any] = {}
        if layout.config.exists():
            resolved = yaml.safe_load(layout.config.read_text()) or {}
        stage_cfg = resolved.get(stage, {}) or {}
        return cls(
            run_dir, stage, output or stage_cfg.get("output"), keep or stage_cfg.get("keep", "all")
        )

    def outputs(self) -> list[Path]:
        return [self.layout.stage(self.stage).merged] + ([Path(self.output)] if self.output else [])

    def is_complete(self) -> bool:
        return self.layout.stage(self.stage).merge_summary.exists()

    def call(self) -> Call:
        """The merge as a call (a job, or run in the launcher)."""
        from jobs.merge import Merge

        outputs = [self.output] if self.output else []
        return Call(Merge(), (str(self.layout.root), self.stage, outputs, self.keep), "merge")

    def run_here(self) -> dict[str, Any]:
        """Merge in this process; returns the merge's counts."""
        c = self.call()
        result: dict[str, Any] = c.fn(*c.args)
        return result

    def submit(self, backend: Backend, after: Sequence[Handle]) -> Handle:
        """A merge by hand runs in this process, whatever backend ran the shards."""
        for dep in after:
            dep.wait()
        return DoneHandle([self.run_here()], ["merge"], fresh=True)
