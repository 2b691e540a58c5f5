"""Run a list of stages: one lock, one run folder, one validate -> plan -> submit -> wait path.

``generate``, ``train`` and ``evaluate`` each run a list of their own stages through here, and
``pipeline`` runs the list of all of them. Everything that can fail is checked for every stage
before the first submission, so bad input never leaves half a pipeline queued.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc import runs
from hpc.backends import Backend, Handle, choose_backend
from hpc.config import ClusterFields
from hpc.layout import RunLayout
from hpc.stages.base import Stage

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a run of stages did: the backend, each stage's handle and, once waited, result."""

    backend: Backend
    handles: dict[str, Handle] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def queued(self) -> bool:
        """True when jobs were left to the scheduler (nothing waited on them)."""
        return any(h.dependency for n, h in self.handles.items() if n not in self.results)


def run_stages(
    stages: Sequence[Stage],
    cluster: ClusterFields,
    *,
    wait: bool,
    before: Callable[[], None] | None = None,
    on_queued: Callable[[], None] | None = None,
    backend: Backend | None = None,
) -> Outcome:
    """Validate, plan and submit every stage in order; wait for them when asked.

    Args:
        stages: in dependency order; each waits on the handles of its ``after`` names.
        cluster: the settings that pick the backend (``cluster``), run folder and checks.
        wait: block until every stage is done (the local backend always does, stage by stage).
        before: work to do before validation (write the dataset, build the tiny models).
        on_queued: called once everything is submitted, when jobs were left in a queue.
        backend: a backend to use instead of choosing one from ``cluster.cluster``.
    """
    if before:
        before()
    # Validation reads only: bad input stops here, before the run folder even exists.
    produced: set[Path] = set()
    runs.check_run_dir(cluster.run_dir)
    for st in stages:
        st.validate(produced)
        produced |= set(st.outputs())
    layout = RunLayout(runs.make_run_dir(cluster.run_dir))
    backend = backend or choose_backend(cluster.cluster, layout)
    checked: list[ClusterFields] = []
    for cfg in [cluster, *(getattr(st, "cfg", cluster) for st in stages)]:
        if cfg not in checked:  # each stage's own limits: a pipeline file may give each its own
            backend.check(cfg)
            checked.append(cfg)
    out = Outcome(backend)
    with runs.run_lock(layout.root):
        for st in stages:  # every check before any write: a refusal changes nothing on disk
            st.refuse_changes()
        for st in stages:
            st.plan()
        for st in stages:
            after = [out.handles[n] for n in st.after if n in out.handles]
            out.handles[st.name] = st.submit(backend, after)
            if backend.sequential:
                out.results[st.name] = st.wait(backend, out.handles[st.name])
    if on_queued and out.queued:
        on_queued()
    if wait:
        for st in stages:
            if st.name not in out.results:
                out.results[st.name] = st.wait(backend, out.handles[st.name])
    return out
