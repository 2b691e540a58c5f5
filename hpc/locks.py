"""Exclusive locks on shared file systems: ``flock`` where it works, an ``O_EXCL`` file where not.

A run folder's launch lock and each shard's lease use :class:`FileLock`. ``flock`` is released
by the kernel when its holder dies, whatever the way, so it is the lock of choice. Lustre
mounted without ``-o flock`` (and some NFS setups) answer ``flock`` with ENOSYS, EOPNOTSUPP or
ENOLCK; there the lock is a file created with ``O_EXCL`` that holds its owner's host and pid.
Such a file outlives a holder killed with SIGKILL, so it is taken over when it is stale: its
holder was on this host and is gone, or its heartbeat (the file's mtime, refreshed by
:meth:`FileLock.refresh`) is older than ``stale_s``. Which of the two is in use is logged once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NO_FLOCK = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK}
_said: set[str] = set()


class Busy(Exception):
    """The lock is held by someone else; ``holder`` is what they wrote into it."""

    def __init__(self, path: Path, holder: dict[str, Any] | str):
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileLock:
    """An exclusive, non-blocking lock on ``path``; :meth:`acquire` raises :class:`Busy`.

    Args:
        path: the lock file (``RUN_DIR/.lock``, ``shards/00003.lock``).
        info: what the holder writes into it (job id, restart count), besides host and pid.
        stale_s: with the ``O_EXCL`` fallback, a lock whose heartbeat is older is taken over.
        use_flock: False forces the fallback (for tests; ``COT_HPC_NO_FLOCK=1`` does the same).
    """

    def __init__(
        self,
        path: Path,
        info: dict[str, Any] | None = None,
        *,
        stale_s: float = 600.0,
        use_flock: bool | None = None,
    ):
        self.path, self.stale_s = Path(path), stale_s
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), **(info or {})}
        if use_flock is None:
            use_flock = os.environ.get("COT_HPC_NO_FLOCK", "") != "1"
        self.use_flock = use_flock
        self.fd: int | None = None
        self.kind = ""

    # ------------------------------------------------------------------ flock
    def _flock(self) -> bool:
        """Take the flock; False when the file system has none."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise Busy(self.path, _parse(holder)) from None
        except OSError as e:
            os.close(fd)
            if e.errno in NO_FLOCK:
                return False
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.info).encode(), 0)
        os.fsync(fd)
        self.fd, self.kind = fd, "flock"
        return True

    # ------------------------------------------------------------------ O_EXCL fallback
    @property
    def excl_path(self) -> Path:
        return self.path.with_name(self.path.name + ".excl")

    def _excl(self) -> None:
        path = self.excl_path
        for _ in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder):
                    raise Busy(path, holder) from None
                log.warning(f"{path}: taking over a stale lock of {holder}")
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(self.info))
                fh.flush()
                os.fsync(fh.fileno())
            self.kind = "O_EXCL file"
            return
        raise Busy(path, self._holder())

    def _holder(self) -> dict[str, Any] | str:
        try:
            return _parse(self.excl_path.read_text(errors="replace"))
        except OSError:
            return "unknown"

    def _stale(self, holder: dict[str, Any] | str) -> bool:
        try:
            age = time.time() - self.excl_path.stat().st_mtime
        except FileNotFoundError:
            return True
        if isinstance(holder, dict) and holder.get("host") == socket.gethostname():
            pid = holder.get("pid")
            if isinstance(pid, int) and not _alive(pid):
                return True
        return age > self.stale_s

    # ------------------------------------------------------------------ API
    def acquire(self) -> FileLock:
        """Take the lock or raise :class:`Busy`; logs which kind is used, once per process."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not (self.use_flock and self._flock()):
            self._excl()
        if self.kind not in _said:
            _said.add(self.kind)
            if self.kind == "flock":
                log.debug("locks: flock")
            else:
                log.info(f"locks: {self.kind} (this file system has no flock)")
        return self

    def refresh(self) -> None:
        """Heartbeat of the ``O_EXCL`` fallback (a no-op with flock)."""
        if self.kind == "O_EXCL file":
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.excl_path)

    def release(self) -> None:
        """Let go (closing the flock's descriptor, or removing the ``O_EXCL`` file)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        elif self.kind == "O_EXCL file":
            try:
                if self._holder() == self.info:
                    self.excl_path.unlink()
            except FileNotFoundError:
                pass
        self.kind = ""

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder_text(holder: dict[str, Any] | str) -> str:
    """``pid 12 on n1 (job 7_3, restart 1)`` from what a holder wrote."""
    if not isinstance(holder, dict):
        return holder
    text = f"pid {holder.get('pid')} on {holder.get('host')}"
    if holder.get("job_id"):
        text += f" (job {holder['job_id']}, restart {holder.get('restart_count', 0)})"
    return text


def _parse(text: str) -> dict[str, Any] | str:
    try:
        data = json.loads(text)
    except ValueError:
        return text or "unknown holder"
    return data if isinstance(data, dict) else text
