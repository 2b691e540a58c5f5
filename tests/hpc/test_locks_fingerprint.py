"""hpc.locks: the O_EXCL fallback's holder, staleness and heartbeat as a user sees them; and
hpc.fingerprint: the differing fields a refused relaunch names, as they are printed."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time
from pathlib import Path

import pytest

from hpc import fingerprint, locks
from hpc.locks import Busy, FileLock, holder_text

# --------------------------------------------------------------------------- locks


def _hold(lock: FileLock, holder: dict | bytes, mtime: float | None = None) -> None:
    """Leave an O_EXCL lock file as another holder wrote it (``mtime``: its last heartbeat)."""
    data = holder if isinstance(holder, bytes) else json.dumps(holder).encode()
    lock.excl_path.parent.mkdir(parents=True, exist_ok=True)
    lock.excl_path.write_bytes(data)
    if mtime is not None:
        os.utime(lock.excl_path, (mtime, mtime))


def test_a_live_holder_on_this_host_keeps_its_lock_and_is_never_signalled(
    tmp_path: Path,
) -> None:
    """Looking whether a holder is alive must not disturb it (signal 0 only)."""
    child = os.fork()
    if child == 0:  # pragma: no cover - the holder: sleeps until killed
        try:
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        lock = FileLock(tmp_path / "x.lock", use_flock=False)
        holder = {"host": socket.gethostname(), "pid": child, "job_id": "7_3"}
        _hold(lock, holder)
        with pytest.raises(Busy) as e:
            lock.acquire()
        assert (e.value.path, e.value.holder) == (lock.excl_path, holder)
        assert str(e.value) == f"{lock.excl_path} is held by {holder}"
        assert json.loads(lock.excl_path.read_text()) == holder  # left as it was
        assert os.waitpid(child, os.WNOHANG) == (0, 0), "the holder was killed"
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_holder_on_another_host_is_judged_by_its_heartbeat_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its pid means nothing here (even one that no process here has); the lock is stale only
    once its heartbeat is older than ``stale_s``, and the takeover is logged naming the holder."""
    free_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no process here has it
    lock = FileLock(tmp_path / "x.lock", {"job_id": "9"}, use_flock=False, stale_s=60)
    holder = {"host": "other-node", "pid": free_pid}
    _hold(lock, holder, mtime=1_000_000_000)
    monkeypatch.setattr(locks.time, "time", lambda: 1_000_000_060.0)  # exactly stale_s old
    with pytest.raises(Busy):
        lock.acquire()
    monkeypatch.setattr(locks.time, "time", lambda: 1_000_000_061.0)  # older: stale
    lock.acquire()
    err = capsys.readouterr().err
    assert f"{lock.excl_path}: taking over a stale lock of {holder}\n" in err
    assert json.loads(lock.excl_path.read_text()) == lock.info
    assert lock.info == {"host": socket.gethostname(), "pid": os.getpid(), "job_id": "9"}
    assert stat.S_IMODE(lock.excl_path.stat().st_mode) == 0o600  # as the flock file
    lock.release()
    assert not lock.excl_path.exists()


@pytest.mark.parametrize(
    ("content", "holder"),
    [
        (b'{"pid": 1, "host": "n\xc3', '{"pid": 1, "host": "n\ufffd'),  # torn mid-character
        (b"[1, 2]", "[1, 2]"),  # JSON, but not what a holder writes
        (b"", "unknown holder"),
    ],
)
def test_a_garbled_lock_file_is_busy_and_shown_as_its_text(
    tmp_path: Path, content: bytes, holder: str
) -> None:
    lock = FileLock(tmp_path / "x.lock", use_flock=False)
    _hold(lock, content)
    with pytest.raises(Busy) as e:
        lock.acquire()
    assert e.value.holder == holder
    assert holder_text(e.value.holder) == holder
    assert lock.excl_path.read_bytes() == content


def test_a_holder_that_lets_go_while_we_look_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file existed at our O_EXCL create and is gone by the time we look: take the lock."""
    lock = FileLock(tmp_path / "x.lock", use_flock=False)
    real_open = os.open
    raced: list[str] = []

    def racing_open(path: str | Path, flags: int, *args: int) -> int:
        if Path(path) == lock.excl_path and not raced:
            raced.append(str(path))
            raise FileExistsError(17, "File exists", str(path))  # ...and then it was released
        return real_open(path, flags, *args)

    monkeypatch.setattr(locks.os, "open", racing_open)
    lock.acquire()
    assert raced and lock.kind == "O_EXCL file"
    assert json.loads(lock.excl_path.read_text()) == lock.info
    lock.release()


def test_a_heartbeat_after_the_lock_file_was_taken_away_does_not_fail(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / "x.lock", use_flock=False).acquire()
    lock.excl_path.unlink()  # judged stale and removed by another task
    lock.refresh()
    assert not lock.excl_path.exists()  # a heartbeat never re-creates it
    lock.release()


def test_holder_text_of_a_job_without_a_restart_count_reads_restart_0() -> None:
    assert holder_text({"pid": 12, "host": "n1", "job_id": "7_3"}) == (
        "pid 12 on n1 (job 7_3, restart 0)"
    )


# --------------------------------------------------------------------------- fingerprint


def test_differences_print_each_field_as_a_user_reads_it() -> None:
    """Empty sections, fields that appear as null, hashes (short) and long values (cut at 120
    characters), with every field's full dotted name."""
    h_old, h_new = "0123456789abcdef" * 4, "fedcba9876543210" * 4
    old = {
        "teacher": {"files": {}, "path": "/m/a"},
        "prompt": {"LaTeX": {}},
        "data": {"sha256": h_old},
        "note": "x" * 120,
        "engine": {"flags": "y" * 121},
    }
    new = {
        "teacher": {"files": {"config.json": h_new}, "path": "/m/a"},
        "prompt": {"LaTeX": False},
        "data": {"sha256": h_new},
        "note": "z" * 120,
        "engine": {"flags": "w" * 121},
        "adapter": None,
    }
    assert fingerprint.differences(old, new) == [
        "adapter: (none) -> null",
        "data.sha256: sha256 0123456789ab -> sha256 fedcba987654",
        f"engine.flags: {'y' * 117}... -> {'w' * 117}...",
        f"note: {'x' * 120} -> {'z' * 120}",
        "prompt.LaTeX: {} -> false",
        "teacher.files: {} -> (none)",
        "teacher.files.config.json: (none) -> sha256 fedcba987654",
    ]
    assert fingerprint.differences(new, new) == []
