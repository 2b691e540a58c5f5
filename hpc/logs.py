"""One logging handler for cot-hpc: plain lines, no colours, no timestamps to clutter SLURM logs.

The CLI calls :func:`setup` once; every job callable calls it too, because a job is a fresh
process. Progress and results go to stdout; warnings and errors, and records logged with
``extra={"stderr": True}`` (such as which backend was chosen), go to stderr.
"""

from __future__ import annotations

import logging
import sys

PACKAGES = ("hpc", "jobs", "cot", "tests")


class _PlainHandler(logging.Handler):
    """Writes each record's message as one line, to stdout or stderr by level."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            to_err = record.levelno >= logging.WARNING or getattr(record, "stderr", False)
            stream = sys.stderr if to_err else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # never let logging break a job
            self.handleError(record)


def setup(verbose: bool = False) -> None:
    """Install the handler on the cot-hpc loggers (idempotent)."""
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        if not any(isinstance(h, _PlainHandler) for h in logger.handlers):
            handler = _PlainHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
        logger.propagate = False
