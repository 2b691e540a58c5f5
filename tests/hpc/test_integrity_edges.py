"""hpc.fingerprint: a model's weight files are pinned by their safetensors header and size alone,
so fingerprinting costs the same for 1 MB or 100 GB, even for a file whose header is garbage;
hpc.locks: the flock file a holder leaves, as another task reads it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

import pytest

from hpc import fingerprint, locks
from hpc.locks import Busy, FileLock, holder_text

_HEADER = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'


def _weights(folder: Path, tensors: bytes, header: bytes = _HEADER) -> bytes:
    """Write ``model.safetensors`` (8-byte length, JSON header, tensor bytes); returns it."""
    folder.mkdir(exist_ok=True)
    data = struct.pack("<Q", len(header)) + header + tensors
    (folder / "model.safetensors").write_bytes(data)
    return data


def test_weights_are_pinned_by_their_header_and_size_not_their_values(tmp_path: Path) -> None:
    """The hash covers the header (names, shapes, dtypes, offsets) and the file size: the same
    layout with other tensor values reads the same, another size does not."""
    model = tmp_path / "teacher"
    data = _weights(model, b"\x00" * 8)
    head = data[: 8 + len(_HEADER)]
    expected = hashlib.sha256(head + str(len(data)).encode()).hexdigest()
    pinned = {"path": str(model.resolve()), "files": {"model.safetensors": expected}}
    assert fingerprint.model(model) == pinned
    _weights(model, b"\x01\x02\x03\x04" * 2)  # other values, same layout and size
    assert fingerprint.model(model) == pinned
    bigger = _weights(model, b"\x00" * 16)  # one more tensor's worth of bytes
    assert fingerprint.model(model)["files"]["model.safetensors"] == (
        hashlib.sha256(head + str(len(bigger)).encode()).hexdigest()
    )


def test_a_header_claiming_exabytes_is_read_no_further_than_100_mib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A garbled or hostile length (here 2**64 - 1) costs one bounded read, never a read of the
    whole file (which for a 100 GB shard would stall the launcher for minutes)."""
    model = tmp_path / "m"
    model.mkdir()
    data = b"\xff" * 8 + b"garbage after a garbled length"
    (model / "model.safetensors").write_bytes(data)
    asked: list[Any] = []

    class Recorded:
        def __init__(self, fh: Any) -> None:
            self.fh = fh

        def __enter__(self) -> Recorded:
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()

        def read(self, n: Any = -1) -> bytes:
            asked.append(n)
            return self.fh.read(n)

    def recorded_open(p: Path, mode: str) -> Recorded:
        return Recorded(open(p, mode))

    monkeypatch.setattr(fingerprint, "open", recorded_open, raising=False)
    files = fingerprint.model(model)["files"]
    assert asked == [8, 100 << 20]
    assert files == {
        "model.safetensors": hashlib.sha256(data + str(len(data)).encode()).hexdigest()
    }


# --------------------------------------------------------------------------- locks (flock)


def test_a_flock_holder_writes_who_it_is_into_a_file_only_its_user_can_read(
    tmp_path: Path,
) -> None:
    """The lock file names host, pid and job (the lease of a shard); mode 0600 as the O_EXCL
    fallback's file, whatever the umask gives other files."""
    path = tmp_path / "shards" / "00003.lock"
    lock = FileLock(path, {"job_id": "7_3", "restart_count": 1}, use_flock=True).acquire()
    try:
        assert lock.kind == "flock"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert json.loads(path.read_text()) == {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job_id": "7_3",
            "restart_count": 1,
        }
        with pytest.raises(Busy) as e:
            FileLock(path, use_flock=True).acquire()
        assert e.value.path == path
        assert holder_text(e.value.holder) == (
            f"pid {os.getpid()} on {socket.gethostname()} (job 7_3, restart 1)"
        )
    finally:
        lock.release()
    lock.release()  # again, as a ``finally`` after an early release does: harmless
    FileLock(path, use_flock=True).acquire().release()  # and the lock is free


def test_a_flock_holder_caught_mid_write_is_shown_as_its_text(tmp_path: Path) -> None:
    """A holder's file read while it is being rewritten (torn in a character) still makes
    ``Busy`` with the readable part, never a UnicodeDecodeError."""
    path = tmp_path / "x.lock"
    lock = FileLock(path, use_flock=True).acquire()
    try:
        path.write_bytes(b'{"pid": 1, "host": "n\xc3\n')
        with pytest.raises(Busy) as e:
            FileLock(path, use_flock=True).acquire()
        assert e.value.holder == '{"pid": 1, "host": "n\ufffd'
        assert str(e.value) == f'{path} is held by {{"pid": 1, "host": "n\ufffd'
    finally:
        lock.release()


def test_which_lock_is_in_use_is_logged_once_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``COT_HPC_NO_FLOCK=1`` forces the O_EXCL fallback; each kind is named once (the
    fallback at INFO, since it changes how a killed holder is detected), never per lock."""
    monkeypatch.setattr(locks, "_said", set())  # as in a fresh process
    said: list[tuple[str, str]] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda r: said.append((r.levelname, r.getMessage()))  # type: ignore[method-assign]
    logger = logging.getLogger("hpc.locks")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    kinds = []
    try:
        for i, no_flock in enumerate(["", "", "1", "1", "0"]):
            monkeypatch.setenv("COT_HPC_NO_FLOCK", no_flock)
            lock = FileLock(tmp_path / f"{i}.lock").acquire()
            kinds.append(lock.kind)
            lock.release()
        monkeypatch.delenv("COT_HPC_NO_FLOCK")
        lock = FileLock(tmp_path / "unset.lock").acquire()
        kinds.append(lock.kind)
        lock.release()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert kinds == ["flock", "flock", "O_EXCL file", "O_EXCL file", "flock", "flock"]
    assert said == [
        ("DEBUG", "locks: flock"),
        ("INFO", "locks: O_EXCL file (this file system has no flock)"),
    ]


def test_an_o_excl_lock_of_another_host_is_stale_after_ten_minutes_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a heartbeat for 600 s (a shard task refreshes its lease far more often) the
    lock of a holder on another node is taken over; at 600 s it still holds."""
    lock = FileLock(tmp_path / "x.lock", use_flock=False)
    lock.excl_path.write_text(json.dumps({"host": "other-node", "pid": 1}))
    os.utime(lock.excl_path, (1_000_000_000, 1_000_000_000))
    monkeypatch.setattr(locks.time, "time", lambda: 1_000_000_600.0)
    with pytest.raises(Busy):
        lock.acquire()
    monkeypatch.setattr(locks.time, "time", lambda: 1_000_000_600.5)
    lock.acquire()
    assert json.loads(lock.excl_path.read_text()) == lock.info
    lock.release()
    assert not lock.excl_path.exists()
