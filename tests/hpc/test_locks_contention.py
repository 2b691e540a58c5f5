"""hpc.locks, O_EXCL fallback: what a live holder receives, how long a takeover fight lasts, and
how an unreadable holder is named (mutants that survived the fast suite)."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from hpc.locks import Busy, FileLock, holder_text
from tests.hpc.test_locks_fingerprint import _hold


def _pending(pid: int) -> set[int]:
    """The signals sent to ``pid`` and not yet delivered (it blocks them all)."""
    mask = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            mask |= int(line.split()[1], 16)
    return {n + 1 for n in range(64) if mask >> n & 1}


def test_judging_a_local_holder_alive_sends_it_no_signal_at_all(tmp_path: Path) -> None:
    """The liveness check is signal 0: the holder gets nothing, not even a SIGHUP it ignores."""
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the holder: blocks every signal, so any sent stays pending
        try:
            os.setsid()  # out of pytest's process group: no terminal signal reaches it
            signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
            os.write(ready_w, b"r")
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"r"
        lock = FileLock(tmp_path / "x.lock", use_flock=False)
        holder = {"host": socket.gethostname(), "pid": child}
        _hold(lock, holder)
        with pytest.raises(Busy) as e:
            lock.acquire()
        assert e.value.holder == holder
        assert _pending(child) == set(), "the liveness check signalled the holder"
    finally:
        os.close(ready_r)
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_lock_that_is_stale_again_after_each_takeover_is_given_up_after_three(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Takeovers are bounded: when each stale file removed is at once re-created (stale again)
    by another task, acquire gives up after three takeovers, Busy naming the last holder."""
    lock = FileLock(tmp_path / "x.lock", use_flock=False, stale_s=60)
    dead = {"host": "other-node", "pid": 1}
    _hold(lock, dead, mtime=1_000)  # its heartbeat stopped long ago
    real_unlink = Path.unlink
    takeovers: list[Path] = []

    def racing_unlink(self: Path, missing_ok: bool = False) -> None:
        real_unlink(self, missing_ok=missing_ok)
        if self == lock.excl_path:  # another task takes it first, and dies at once
            takeovers.append(self)
            _hold(lock, {**dead, "job_id": str(len(takeovers))}, mtime=1_000)

    monkeypatch.setattr(Path, "unlink", racing_unlink)
    with pytest.raises(Busy) as e:
        lock.acquire()
    assert len(takeovers) == 3
    assert e.value.holder == {**dead, "job_id": "3"}
    assert lock.kind == ""  # nothing held


def test_a_lock_file_that_cannot_be_read_is_busy_and_its_holder_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live holder's file we may not read (another user's, mode 0600) keeps the lock, and the
    message names its holder as "unknown"."""
    lock = FileLock(tmp_path / "x.lock", use_flock=False)
    _hold(lock, {"host": "other-node", "pid": 1})  # a fresh heartbeat: not stale
    real_read_text = Path.read_text

    def unreadable(self: Path, encoding: str | None = None, errors: str | None = None) -> str:
        if self == lock.excl_path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, encoding, errors)

    monkeypatch.setattr(Path, "read_text", unreadable)
    with pytest.raises(Busy) as e:
        lock.acquire()
    assert e.value.holder == "unknown"
    assert holder_text(e.value.holder) == "unknown"
    assert str(e.value) == f"{lock.excl_path} is held by unknown"
