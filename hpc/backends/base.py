"""The ``Backend`` interface: submit calls, get a ``Handle`` back, whatever runs them.

A stage never asks which backend it has. It builds :class:`Call` objects, hands them to
``backend.submit(calls, after=[handles])`` and gets a :class:`Handle` that it can wait on, poll,
read results from, and pass as ``after=`` to the next submission. How a dependency is met is the
backend's business: SLURM chains jobs (``afterok``, or ``afterany`` for a job that checks
its inputs itself, as every stage's jobs do), the local backend waits.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc.config import REPO_ROOT, ClusterFields
from hpc.errors import StageFailed
from hpc.layout import RunLayout

# Job states, in Slurm's words; every backend reports these.
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "RUNNING",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "RESIZING",
        "SUSPENDED",
        "CONFIGURING",
        "COMPLETING",
        "SIGNALING",
        "STAGE_OUT",
    }
)
FAILED_STATES = frozenset(
    {
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "OUT_OF_MEMORY",
        "NODE_FAIL",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
        "REVOKED",
    }
)


@dataclass(frozen=True)
class Call:
    """One task to run: ``fn(*args)``, named ``label`` in messages (``shard 00003``, ``merge``)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    label: str


@dataclass(frozen=True)
class Resources:
    """The shape of each job: nodes, processes per node, GPUs per node."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0


ONE_TASK = Resources()


@dataclass(frozen=True)
class Spec:
    """How to submit a list of calls (the options of :meth:`Backend.submit`)."""

    cfg: ClusterFields
    name: str
    resources: Resources
    after: list[Handle]
    inline: bool
    on_submit: Callable[[list[int], list[str]], None] | None
    after_any: bool = False


@dataclass(frozen=True)
class Failure:
    """A task that ended without finishing: what, which job, why, and where its log is."""

    label: str
    job_id: str
    state: str
    log: Path
    why: str


class DependencyFailed(StageFailed):
    """A submission's dependency failed, so it was not run (SLURM cancels it the same way)."""

    def __init__(self, message: str, failures: list[Failure]):
        super().__init__(message)
        self.failures = failures


class Handle(abc.ABC):
    """What a submission returns, for every backend."""

    labels: list[str]

    @property
    def new(self) -> bool:
        """True when this launch submitted (or ran) the work, False for jobs of an earlier one.

        A job of an earlier launch that waits on an earlier upstream job can never run once
        that upstream was resubmitted; a stage attaches to it only when nothing before it is new.
        """
        return True

    @property
    @abc.abstractmethod
    def job_ids(self) -> list[str]:
        """One id per call (an array task is ``<array>_<index>``)."""

    @property
    @abc.abstractmethod
    def dependency(self) -> list[str]:
        """The ids a later submission depends on; empty when there is nothing to wait for."""

    @abc.abstractmethod
    def states(self) -> dict[str, str]:
        """The state of every call by label (``UNKNOWN`` when the scheduler cannot say)."""

    @abc.abstractmethod
    def wait(self, on_poll: Callable[[], None] | None = None) -> None:
        """Block until every call has ended; ``on_poll`` runs at every poll (progress lines)."""

    @abc.abstractmethod
    def results(self) -> list[Any]:
        """The return values, one per call; raises StageFailed naming the failures."""

    @abc.abstractmethod
    def failures(self) -> list[Failure]:
        """The calls that ended without a result (after :meth:`wait`, or as far as seen now)."""

    @property
    def arrays(self) -> list[str]:
        """The scheduler's array ids this submission created (none when it ran no array)."""
        return []

    def state(self) -> str:
        """One state for the whole submission: FAILED beats active beats any state the scheduler
        could not name (UNKNOWN) beats COMPLETED, which needs every call COMPLETED."""
        values = set(self.states().values())
        if not values:
            return "COMPLETED"
        for s in sorted(values & FAILED_STATES):
            return s
        for s in sorted(values & ACTIVE_STATES):
            return s
        unsettled = sorted(values - {"COMPLETED"})
        return unsettled[0] if unsettled else "COMPLETED"


class DoneHandle(Handle):
    """A submission that ran in this process (or had nothing to run): already complete."""

    def __init__(
        self, results: Sequence[Any] = (), labels: Sequence[str] = (), *, fresh: bool = False
    ):
        self._results = list(results)
        self.labels = list(labels)
        self.fresh = fresh  # it did new work now (a later step must not be skipped)

    @property
    def new(self) -> bool:
        return self.fresh

    @property
    def job_ids(self) -> list[str]:
        return []

    @property
    def dependency(self) -> list[str]:
        return []

    def states(self) -> dict[str, str]:
        return {label: "COMPLETED" for label in self.labels}

    def wait(self, on_poll: Callable[[], None] | None = None) -> None:
        return None

    def results(self) -> list[Any]:
        return list(self._results)

    def failures(self) -> list[Failure]:
        return []


def failure_line(text: str) -> str:
    """The exception line of a submitit failure (its traceback sits between dashed rules,
    followed by the log paths)."""
    parts = text.split("-" * 22)
    body = parts[1] if len(parts) >= 3 else text
    lines = [ln.strip() for ln in body.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "failed")[:300]


def last_error(log: str | Path, tail_bytes: int = 65536) -> str | None:
    """The last line of a job log that says why it ended (an exception or submitit's verdict)."""
    try:
        with open(log, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - tail_bytes))
            text = fh.read().decode(errors="replace")
    except OSError:
        return None
    keys = ("Error", "Exception", "not requeued", "timed-out", "CANCELLED", "Killed")
    hits = [ln.strip() for ln in text.splitlines() if any(k in ln for k in keys)]
    return hits[-1][:300] if hits else None


def failure_text(stage: str, failed: Sequence[Failure]) -> str:
    """The StageFailed message: every failed task, its cause from the log, and the log path."""
    lines = [f"{stage}: {len(failed)} shard(s) failed for good:"]
    for f in failed:
        cause = last_error(f.log)
        lines.append(f"  {f.label}: {f.why}" + (f"\n    cause: {cause}" if cause else ""))
        lines.append(f"    log: {f.log}")
    return "\n".join(lines)


def poll_interval() -> float:
    """Seconds between scheduler polls (COT_HPC_POLL_S; at least 30 s is polite on clusters)."""
    return float(os.environ.get("COT_HPC_POLL_S", "30"))


def job_env(cfg: ClusterFields) -> dict[str, str]:
    """Environment every job gets: unbuffered logs, offline hub, thread count, importable repo."""
    env = {
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",  # jobs never go online, whatever the submitting shell says
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(cfg.cpus_per_task),
    }
    if "DS_ACCELERATOR" in os.environ:  # never force DeepSpeed's CPU backend onto GPU nodes
        env["DS_ACCELERATOR"] = os.environ["DS_ACCELERATOR"]
    return env


def env_exports(cfg: ClusterFields) -> list[str]:
    """:func:`job_env` as shell lines run before the job (the launcher's own env is untouched)."""
    import shlex

    lines = [f"export {k}={shlex.quote(v)}" for k, v in job_env(cfg).items()]
    lines.append(f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}")
    return lines


@dataclass
class Backend(abc.ABC):
    """Runs calls somewhere; the only code that knows where.

    Args:
        layout: the run folder (submitit's pickles and logs go to ``layout.logs``).
    """

    layout: RunLayout
    kind: str = field(init=False, default="")
    why: str = field(init=False, default="")
    # True when calls run one after another in the launcher's lifetime (the local backend):
    # the runner then waits for each stage before it submits the next.
    sequential: bool = field(init=False, default=False)

    def submit(
        self,
        calls: Sequence[Call],
        *,
        cfg: ClusterFields,
        name: str,
        resources: Resources = ONE_TASK,
        after: Sequence[Handle] = (),
        inline: bool = False,
        on_submit: Callable[[list[int], list[str]], None] | None = None,
        after_any: bool = False,
    ) -> Handle:
        """Run ``calls`` (one array when several) once every handle in ``after`` succeeds.

        ``inline`` marks a short step (a merge, a report): a backend may run it in this
        process instead of as a job. ``on_submit(indices, job_ids)`` gets the job ids of each
        group of calls as soon as it is submitted, so that they are recorded before the next.
        ``after_any`` runs the calls once every handle in ``after`` has ended, however it
        ended: for a step that checks its inputs itself (a merge reads completion markers,
        which are the truth; a task can die of a signal after its marker is written).
        """
        spec = Spec(cfg, name, resources, list(after), inline, on_submit, after_any)
        return self._submit(list(calls), spec)

    @abc.abstractmethod
    def _submit(self, calls: list[Call], spec: Spec) -> Handle:
        """:meth:`submit`, with its options in one object."""

    @abc.abstractmethod
    def attach(self, job_ids: Sequence[str], labels: Sequence[str]) -> Handle:
        """A handle on jobs submitted by an earlier launch (to wait on or depend on)."""

    @abc.abstractmethod
    def live(self, job_ids: Sequence[str]) -> set[str]:
        """Which of ``job_ids`` are still queued or running."""

    @abc.abstractmethod
    def states(self, job_ids: Sequence[str]) -> dict[str, str] | None:
        """States by job id, in one scheduler call; None when the scheduler cannot say."""

    @property
    @abc.abstractmethod
    def poll_s(self) -> float:
        """Seconds between polls while waiting."""

    def placement(self, res: Resources) -> Resources:
        """Where the processes of a job shape actually run (the shape, on a real cluster)."""
        return res

    def check(self, cfg: ClusterFields) -> None:
        """Everything about ``cfg`` this backend would trip over, before any submission."""
        return None
