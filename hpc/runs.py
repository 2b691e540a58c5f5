"""The run folder: its lock and ``launch.json`` (job ids per stage)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cot.records import atomic_write_text
from hpc.errors import ConfigError, RunLockedError
from hpc.layout import RunLayout
from hpc.locks import Busy, FileLock, holder_text

__all__ = [
    "RunLockedError",
    "Submission",
    "check_out_dir",
    "check_run_dir",
    "latest_jobs",
    "make_out_dir",
    "make_run_dir",
    "read_launch",
]

# Names that only a run folder of ours holds (the marker, and what launches before it wrote).
_RUN_FILES = (".cot-hpc-run", "launch.json", ".lock")
# What only a training output folder holds.
_TRAIN_FILES = (
    "config.yaml",
    "checkpoints",
    "adapter",
    "COMPLETE",
    "metrics.jsonl",
    "fingerprint.json",
)


def _check_own(p: Path, ours: tuple[str, ...], flag: str, what: str) -> None:
    """Refuse a file, or a non-empty folder that holds none of ``ours``: never adopt (and
    chmod, and write into) a folder such as ``~`` that a typo pointed at."""
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {p}: is a file, not a folder")
    if p.is_dir() and any(p.iterdir()) and not any((p / name).exists() for name in ours):
        raise ConfigError(
            f"{flag} {p}: the folder is not empty and is not {what}; "
            "give a new or empty folder (nothing was written)"
        )


def check_run_dir(path: str | Path) -> None:
    """Raise ConfigError unless ``path`` is new, empty or one of our run folders."""
    _check_own(Path(path).resolve(), _RUN_FILES, "--run-dir", "a cot-hpc run folder")


def make_run_dir(path: str | Path) -> Path:
    """Create (or reopen) the run folder, user-only (it holds pickles and logs).

    A non-empty folder that is not a run folder is refused; a new one gets ``.cot-hpc-run``.
    """
    p = Path(path).resolve()
    check_run_dir(p)
    p.mkdir(parents=True, exist_ok=True)
    os.chmod(p, 0o700)
    mark = p / _RUN_FILES[0]
    if not mark.exists():
        atomic_write_text(mark, "a cot-hpc run folder (see RUN_DIR/launch.json)\n")
    return p


def check_out_dir(path: str | Path) -> None:
    """Raise ConfigError unless ``path`` is new, empty or a training output folder."""
    _check_own(Path(path).resolve(), _TRAIN_FILES, "--out-dir", "a training output folder")


def make_out_dir(path: str | Path) -> Path:
    """Create (or reopen) a training output folder, user-only: it holds pickled checkpoints
    (optimizer and RNG states) even when it lies outside the run folder."""
    p = Path(path).resolve()
    check_out_dir(p)
    p.mkdir(parents=True, exist_ok=True)
    os.chmod(p, 0o700)
    return p


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``RUN_DIR/.lock`` for the duration; a second launch refuses at once.

    ``flock``, or an ``O_EXCL`` lock file where the file system has none (see hpc.locks).
    """
    lock = FileLock(RunLayout(run_dir).lock)
    try:
        lock.acquire()
    except Busy as e:
        raise RunLockedError(
            f"{run_dir} is locked by another launch ({holder_text(e.holder)}); "
            "wait for it to finish or use another --run-dir"
        ) from None
    try:
        yield
    finally:
        lock.release()


def read_launch(run_dir: Path) -> dict[str, Any]:
    """``launch.json`` as a dict (empty when absent)."""
    path = RunLayout(run_dir).launch
    if not path.exists():
        return {}
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def latest_jobs(run_dir: Path, stage: str) -> dict[str, Any]:
    """Merge all submissions of a stage: the newest job id of every shard, and of the merge."""
    subs = read_launch(run_dir).get("stages", {}).get(stage, {}).get("submissions", [])
    shards: dict[int, str] = {}
    out: dict[str, Any] = {"kind": None, "shards": shards, "merge": None, "job": None}
    for s in subs:
        out["kind"] = s.get("kind", out["kind"])
        for k, v in s.get("shards", {}).items():
            shards[int(k)] = v
        out["merge"] = s.get("merge") or out["merge"]
        out["job"] = s.get("job") or out["job"]
    return out


class Submission:
    """One launch's entry in ``launch.json``, written as soon as each part is submitted.

    A failed sbatch on a later array, or a Ctrl-C, must never leave running jobs unrecorded
    (the relaunch would start a second writer on their shards), so every part is recorded the
    moment it exists: ``update(shards=..., arrays=...)`` per array, then ``update(merge=...)``.
    """

    def __init__(self, run_dir: Path, stage: str, kind: str, **fields: Any):
        self.run_dir, self.stage = Path(run_dir), stage
        data = read_launch(self.run_dir)
        st = data.setdefault("stages", {}).setdefault(stage, {"submissions": []})
        st["submissions"].append({"time": time.time(), "kind": kind, **fields})
        self.index = len(st["submissions"]) - 1
        atomic_write_text(RunLayout(self.run_dir).launch, json.dumps(data, indent=1))

    def update(self, **fields: Any) -> None:
        """Add to this submission: ``shards`` and other dicts merge, ``arrays`` and lists extend."""
        data = read_launch(self.run_dir)
        entry = data["stages"][self.stage]["submissions"][self.index]
        for key, value in fields.items():
            if isinstance(value, dict):
                entry.setdefault(key, {}).update({str(k): v for k, v in value.items()})
            elif isinstance(value, list):
                entry.setdefault(key, []).extend(value)
            else:
                entry[key] = value
        atomic_write_text(RunLayout(self.run_dir).launch, json.dumps(data, indent=1))
