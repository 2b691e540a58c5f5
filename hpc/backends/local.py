"""The local backend: the same calls as processes on this machine (submitit's local executor).

It runs at most ``local_parallelism`` calls at once, meets a dependency by waiting for it (and
refuses to run after a failed one, as SLURM's ``kill-on-invalid-dep`` does, unless the step
checks its own inputs: ``after_any``), and gives the jobs
their environment through submitit's setup lines: the launcher's own ``os.environ`` is never
changed. A multi-node shape runs all its processes on this one "node".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from hpc.backends.base import (
    Backend,
    Call,
    DependencyFailed,
    DoneHandle,
    Failure,
    Handle,
    Resources,
    Spec,
    env_exports,
    failure_line,
    failure_text,
)
from hpc.config import ClusterFields
from hpc.errors import StageFailed
from hpc.layout import RunLayout

LOCAL_POLL_S = 1.0
# The first poll comes after this, each next one after twice the last, up to LOCAL_POLL_S: a
# call that ends in a second is seen within ~50 ms, a long one costs one check a second.
LOCAL_FIRST_POLL_S = 0.05


def poll_delays() -> Iterator[float]:
    """Seconds to sleep between local polls: 0.05, 0.1, 0.2, ... then LOCAL_POLL_S for good."""
    delay = LOCAL_FIRST_POLL_S
    while True:
        yield delay
        delay = min(LOCAL_POLL_S, delay * 2)


class LocalHandle(Handle):
    """Local processes; :meth:`wait` also starts the calls still queued behind the slots."""

    def __init__(
        self,
        layout: RunLayout,
        calls: Sequence[Call],
        make_executor: Any,
        slots: int,
        on_submit: Callable[[list[int], list[str]], None] | None = None,
    ):
        self.layout, self.labels, self._on_submit = layout, [c.label for c in calls], on_submit
        self._pending = list(enumerate(calls))
        self._jobs: dict[int, Any] = {}
        self._make, self._slots = make_executor, slots
        self._ex: Any = None
        self._fill()

    def _running(self) -> int:
        return sum(1 for j in self._jobs.values() if not j.done())

    def _fill(self) -> None:
        while self._pending and self._running() < self._slots:
            if self._ex is None:
                self._ex = self._make()
            i, call = self._pending.pop(0)
            self._jobs[i] = self._ex.submit(call.fn, *call.args)
            if not self._pending and self._on_submit:  # every call has started: record them
                self._on_submit(sorted(self._jobs), self.job_ids)

    @property
    def job_ids(self) -> list[str]:
        return [str(self._jobs[i].job_id) for i in sorted(self._jobs)]

    @property
    def dependency(self) -> list[str]:
        return self.job_ids

    def states(self) -> dict[str, str]:
        out = {}
        for i, label in enumerate(self.labels):
            job = self._jobs.get(i)
            if job is None:
                out[label] = "PENDING"
            elif not job.done():
                out[label] = "RUNNING"
            else:
                out[label] = "FAILED" if job.exception() is not None else "COMPLETED"
        return out

    def wait(self, on_poll: Callable[[], None] | None = None) -> None:
        for delay in poll_delays():
            self._fill()
            if on_poll:
                on_poll()
            if not self._pending and self._running() == 0:
                return
            time.sleep(delay)

    def results(self) -> list[Any]:
        self.wait()
        failed = self.failures()
        if failed:  # the exception line, as SlurmHandle.results gives it
            raise StageFailed(failed[0].why)
        out = []
        for i in sorted(self._jobs):
            res = self._jobs[i].results()
            out.append(res[0] if isinstance(res, list) else res)
        return out

    def failures(self) -> list[Failure]:
        out = []
        for i, label in enumerate(self.labels):
            job = self._jobs.get(i)
            if job is None or not job.done():
                continue
            err = job.exception()
            if err is not None:
                log = self.layout.job_log(str(job.job_id))
                out.append(Failure(label, str(job.job_id), "FAILED", log, failure_line(str(err))))
        return out


class LocalBackend(Backend):
    """Run calls as local processes."""

    def __init__(self, layout: RunLayout, why: str = "as requested"):
        super().__init__(layout)
        self.kind, self.why, self.sequential = "local", why, True

    @property
    def poll_s(self) -> float:
        return LOCAL_POLL_S

    def placement(self, res: Resources) -> Resources:
        # One "node": the whole world runs here, so a 2-node shape gives the same ranks.
        return Resources(1, res.nodes * res.tasks_per_node, res.gpus_per_node)

    def _executor(self, cfg: ClusterFields, res: Resources) -> Any:
        import submitit

        res = self.placement(res)
        ex = submitit.AutoExecutor(folder=str(self.layout.logs), cluster="local")
        params: dict[str, Any] = {
            "timeout_min": cfg.time_min,
            "nodes": 1,
            "tasks_per_node": res.tasks_per_node,
            "cpus_per_task": cfg.cpus_per_task,
            "local_setup": env_exports(cfg),
        }
        if res.gpus_per_node:
            params["gpus_per_node"] = res.gpus_per_node
        ex.update_parameters(**params)
        return ex

    def _submit(self, calls: list[Call], spec: Spec) -> Handle:
        cfg, name, resources, after = spec.cfg, spec.name, spec.resources, spec.after
        inline, on_submit = spec.inline, spec.on_submit
        failed: list[Failure] = []
        for dep in after:
            dep.wait()
            failed += dep.failures()
            if failed and not spec.after_any:
                raise DependencyFailed(failure_text(name, failed), failed)
        if inline:
            try:
                results = [c.fn(*c.args) for c in calls]
            except Exception:
                if failed:  # the step found its inputs incomplete: say which tasks failed, why
                    raise DependencyFailed(failure_text(name, failed), failed) from None
                raise
            return DoneHandle(results, [c.label for c in calls], fresh=True)
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        self.layout.logs.chmod(0o700)  # it holds pickles of configs
        handle = LocalHandle(
            self.layout,
            calls,
            lambda: self._executor(cfg, resources),
            cfg.local_parallelism,
            on_submit,
        )
        return handle

    def attach(self, job_ids: Sequence[str], labels: Sequence[str]) -> Handle:
        # Local jobs die with the launcher that started them: an earlier launch left none alive.
        return DoneHandle([], labels)

    def live(self, job_ids: Sequence[str]) -> set[str]:
        return set()

    def states(self, job_ids: Sequence[str]) -> dict[str, str] | None:
        # Local jobs leave no scheduler record: their markers are the only truth.
        return {i: "-" for i in job_ids}
