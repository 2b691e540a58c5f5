"""Backends: where calls run (SLURM or this machine), behind one ``Backend`` interface.

This package is the only code that knows which backend runs; a test fails on a backend branch
anywhere else.
"""

from __future__ import annotations

import logging

from hpc.backends.base import (
    ACTIVE_STATES,
    FAILED_STATES,
    Backend,
    Call,
    DependencyFailed,
    DoneHandle,
    Failure,
    Handle,
    Resources,
    failure_line,
    failure_text,
    job_env,
    last_error,
    poll_interval,
)
from hpc.layout import RunLayout

log = logging.getLogger(__name__)

__all__ = [
    "ACTIVE_STATES",
    "FAILED_STATES",
    "Backend",
    "Call",
    "DependencyFailed",
    "DoneHandle",
    "Failure",
    "Handle",
    "Resources",
    "choose_backend",
    "failure_line",
    "failure_text",
    "for_kind",
    "job_env",
    "last_error",
    "poll_interval",
]


def choose_backend(requested: str, layout: RunLayout, *, announce: bool = True) -> Backend:
    """``auto|slurm|local`` -> a backend; ``auto`` is SLURM only when a controller answers."""
    from hpc.backends.local import LocalBackend
    from hpc.backends.slurm import SlurmBackend, controller_answers

    if requested == "auto":
        up = controller_answers()
        why = "a SLURM controller answers" if up else "no SLURM controller answers"
        backend: Backend = SlurmBackend(layout, why) if up else LocalBackend(layout, why)
    else:
        backend = for_kind(requested, layout)
    if announce:
        log.info(f"cluster: {backend.kind} ({backend.why})", extra={"stderr": True})
    return backend


def for_kind(kind: str | None, layout: RunLayout) -> Backend:
    """The backend that ran a recorded submission (``kind`` as written in ``launch.json``)."""
    from hpc.backends.local import LocalBackend
    from hpc.backends.slurm import SlurmBackend

    backends = {"slurm": SlurmBackend, "local": LocalBackend}
    return backends.get(kind or "local", LocalBackend)(layout)
