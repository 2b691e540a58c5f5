"""The ``Stage`` interface: what every stage of a run can do, whatever backend runs it.

A stage is built from its typed config. The runner (:mod:`hpc.stages.runner`) calls, for every
stage of a command, ``validate`` (everything that can fail before submission), then ``plan``
(write what the run folder must hold before any job starts), then ``submit(backend, after)``,
and, when asked or when the backend runs things one after another, ``wait``.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpc import fingerprint
from hpc.backends import FAILED_STATES, Backend, Handle
from hpc.layout import RunLayout

log = logging.getLogger(__name__)


class Stage(abc.ABC):
    """One stage of a run: generate, train, evaluate, evaluate_base, report.

    Attributes:
        name: the stage's folder and ``launch.json`` key.
        after: names of the stages (in the same run) whose handles this one depends on.
    """

    name: str = ""
    after: tuple[str, ...] = ()
    _fp: dict[str, Any] | None = None  # the fingerprint, computed once

    def __init__(self, layout: RunLayout):
        self.layout = layout

    @property
    def job_name(self) -> str:
        """The scheduler's job name: the stage and the run folder's name."""
        return f"cot-{self.name} {self.layout.root.name}"

    def validate(self, produced: set[Path]) -> None:  # noqa: B027 - optional hook
        """Check everything that can fail before submission (bad input exits with file:line).

        Args:
            produced: files earlier stages of this command will write; they may not exist yet.
        """

    def fingerprint(self) -> dict[str, Any] | None:
        """Everything that determines this stage's output (None: nothing to pin)."""
        return None

    def refuse_changes(self) -> None:
        """Refuse a relaunch whose settings differ from those pinned in the run folder.

        Reads only: the runner calls it for every stage before any stage writes anything, so a
        refused launch leaves ``config.yaml``, plans and fingerprints as they were.
        """
        fp = self.fingerprint()
        if fp is not None:
            fingerprint.check(self.layout.stage(self.name).dir, fp)

    def plan(self) -> None:  # noqa: B027 - optional hook
        """Write what must exist before any job starts (plan.json, the resolved config)."""

    def pin(self) -> None:
        """Write the stage's fingerprint once (a later launch is checked against it)."""
        fp = self.fingerprint()
        if fp is not None:
            fingerprint.pin(self.layout.stage(self.name).dir, fp)

    def in_run(self, path: str | Path | None) -> bool:
        """True when ``path`` lies in this run folder: an earlier stage's output, which that
        stage's own fingerprint pins (it may not exist yet when this stage is planned)."""
        if not path:
            return False
        return Path(path).resolve().is_relative_to(self.layout.root.resolve())

    @abc.abstractmethod
    def is_complete(self) -> bool:
        """True when this stage's outputs are all there (a rerun submits nothing)."""

    @abc.abstractmethod
    def outputs(self) -> list[Path]:
        """The files this stage writes that later stages read."""

    @abc.abstractmethod
    def submit(self, backend: Backend, after: Sequence[Handle]) -> Handle:
        """Submit what is not done yet, after ``after``; returns the handle to depend on."""

    def wait(self, backend: Backend, handle: Handle) -> Any:
        """Block until the stage is done; return its result (raise StageFailed if it failed)."""
        handle.wait()
        results = handle.results()
        return results[0] if results else None

    @classmethod
    def done_marker(cls, layout: RunLayout) -> Path | None:
        """The file whose existence means the stage is done, for ``status`` (None: no such)."""
        return None

    @classmethod
    def status(
        cls, layout: RunLayout, name: str, info: dict[str, Any], states: dict[str, str]
    ) -> dict[str, Any]:
        """The ``status`` row of a one-job stage: its state, COMPLETED once its marker exists."""
        jid = info.get("job")
        state = states.get(jid or "", "-")
        marker = cls.done_marker(layout)
        if marker is not None and marker.exists():
            state = "COMPLETED"
        return {
            "kind": info["kind"],
            "jobs": sorted(set(info["shards"].values())),
            "state": state,
            "job": jid,
            "log": str(layout.job_log(str(jid))) if jid else None,  # no job, no log
            "failed": int(state in FAILED_STATES),
        }
