"""The one error hierarchy of cot-hpc: every error a user can cause derives from CotError.

The CLI catches :class:`CotError` alone, prints its message (which names the file, line and
field where there is one) on one line and exits with its ``exit_code``: 2 for bad input found
before anything ran, 1 for work that failed. ``cot/`` defines the base so that the ML core can
raise it without importing the cluster layer.
"""

from __future__ import annotations


class CotError(Exception):
    """Base of every cot-hpc error; ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class InputError(CotError, ValueError):
    """Bad input (a file, a record, a setting, a model folder), found before any work starts."""
