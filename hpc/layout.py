"""``RunLayout``: the one owner of every path in a run folder (like submitit's ``JobPaths``).

No other module builds a run-folder path from strings: the shard protocol, the stages, the jobs,
``status`` and the tests all ask this class. The layout on disk is the one the README shows::

    runs/<name>/
      .cot-hpc-run  config.yaml  launch.json  .lock  logs/<job_id>_<task>_log.out|err
      <stage>/plan.json  shards/00003.jsonl  completions/00003  attempts/00003  progress/00003
      <stage>/servers/00003.log   (--engine server: the inference server each task started)
      <stage>/merged.jsonl  merge.json
      train/COMPLETE  train/checkpoints/  train/adapter/  train/metrics.jsonl
      results/report.md  report.json  accuracy_by_category.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["SHARDED_STAGES", "RunLayout", "StageLayout", "shard_name"]

SHARDED_STAGES = ("generate", "evaluate", "evaluate_base", "evaluate_teacher")


def shard_name(index: int) -> str:
    """Zero-padded shard name, e.g. ``00003``."""
    return f"{index:05d}"


@dataclass(frozen=True)
class StageLayout:
    """The paths of one sharded stage's folder (``RUN_DIR/generate``, ``RUN_DIR/evaluate``...)."""

    dir: Path

    @property
    def plan(self) -> Path:
        """``plan.json``: which records each shard owns, written once."""
        return self.dir / "plan.json"

    @property
    def shards(self) -> Path:
        """The folder of shard files."""
        return self.dir / "shards"

    @property
    def completions(self) -> Path:
        """The folder of completion markers."""
        return self.dir / "completions"

    @property
    def attempts_dir(self) -> Path:
        """The folder of per-shard attempt logs."""
        return self.dir / "attempts"

    def progress(self, i: int) -> Path:
        """``progress/00003``: how many records the running task has on disk (for ``status``;
        rewritten every few seconds, never fsync'd: a hint, the shard file is the truth)."""
        return self.dir / "progress" / shard_name(i)

    def shard(self, i: int) -> Path:
        """``shards/00003.jsonl``: appended per batch, rewritten in plan order at the end."""
        return self.shards / f"{shard_name(i)}.jsonl"

    def marker(self, i: int) -> Path:
        """``completions/00003``: written last, the shard is complete."""
        return self.completions / shard_name(i)

    def lease(self, i: int) -> Path:
        """``shards/00003.lock``: held by the one live task of shard ``i``."""
        return self.shards / f"{shard_name(i)}.lock"

    def attempts(self, i: int) -> Path:
        """``attempts/00003``: one line per start and per batch."""
        return self.attempts_dir / shard_name(i)

    def server_log(self, i: int) -> Path:
        """``servers/00003.log``: the output of the inference servers shard 3's tasks started."""
        return self.dir / "servers" / f"{shard_name(i)}.log"

    @property
    def merged(self) -> Path:
        """``merged.jsonl``: the verified merge."""
        return self.dir / "merged.jsonl"

    @property
    def merge_summary(self) -> Path:
        """``merge.json``: the merge's counts, written after ``merged.jsonl``."""
        return self.dir / "merge.json"


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run folder."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        """``config.yaml``: the resolved config of every stage."""
        return self.root / "config.yaml"

    @property
    def launch(self) -> Path:
        """``launch.json``: job ids per stage and submission."""
        return self.root / "launch.json"

    @property
    def lock(self) -> Path:
        """``.lock``: held by the launching process."""
        return self.root / ".lock"

    @property
    def logs(self) -> Path:
        """submitit's folder: pickles and ``<job_id>_<task>_log.out|err`` (mode 0700)."""
        return self.root / "logs"

    def job_log(self, job_id: str, task: int = 0, stream: str = "err") -> Path:
        """submitit's log of one task of a job: ``logs/<job_id>_<task>_log.<out|err>``."""
        return self.logs / f"{job_id}_{task}_log.{stream}"

    def stage(self, name: str) -> StageLayout:
        """The folder of a sharded stage."""
        return StageLayout(self.root / name)

    # ------------------------------------------------------------------ training
    @property
    def train_dir(self) -> Path:
        """``train/``: the default training output folder and home of its marker."""
        return self.root / "train"

    @property
    def train_marker(self) -> Path:
        """``train/COMPLETE``: written last by rank 0; the training is finished."""
        return self.train_dir / "COMPLETE"

    @property
    def train_data(self) -> Path:
        """What training reads by default: generate's merged output."""
        return self.stage("generate").merged

    # ------------------------------------------------------------------ results
    @property
    def results(self) -> Path:
        """``results/``: the evaluation report."""
        return self.root / "results"

    @property
    def report_md(self) -> Path:
        """``results/report.md``."""
        return self.results / "report.md"

    @property
    def report_json(self) -> Path:
        """``results/report.json``."""
        return self.results / "report.json"
