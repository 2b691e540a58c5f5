"""The cluster layer's errors, all under :class:`cot.errors.CotError` (one hierarchy).

Bad input (exit 2) derives from :class:`cot.errors.InputError`; work that failed (exit 1) from
:class:`Failed`. The CLI catches the base and prints one line.
"""

from __future__ import annotations

from cot.errors import CotError, InputError


class ConfigError(InputError):
    """A config key or value is wrong; the message names the key and where it came from."""


class PlanError(InputError):
    """The run folder holds a plan for another input or shard count, or shards are missing."""


class RunLockedError(CotError):
    """Another launch holds this run folder's lock."""


class Failed(CotError):
    """Work was submitted and did not finish; the message names what and where its log is."""

    exit_code = 1


class StageFailed(Failed):
    """Some shards, a job or a merge failed for good; the message names them and their logs."""


class SchedulerError(Failed):
    """The scheduler cannot answer a question that safety depends on (which jobs are alive)."""
