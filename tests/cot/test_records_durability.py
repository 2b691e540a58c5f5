"""cot.records: what a crash may lose (fsync order, the background fsync of appended lines), the
one-step folder swap, and the errors a caller reads (file, line, field)."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import pytest

from cot import records
from cot.records import DurableAppender, RecordError, exchange, fsync_tree, read_questions


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path fsync'd from now on, in order (the real fsync still runs)."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(records.os, "fsync", fsync)
    return synced


# --------------------------------------------------------------------------- fsync order


def test_fsync_tree_syncs_each_folder_after_everything_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deepest first: a folder's entry is made durable only once what it names is."""
    root = tmp_path / "adapter"
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "a.bin").write_text("a")
    (root / "sub" / "b.bin").write_text("b")
    (root / "sub" / "deep" / "c.bin").write_text("c")
    synced = _record_fsyncs(monkeypatch)
    fsync_tree(root)
    assert [os.path.relpath(p, root) for p in synced] == [
        "sub/deep/c.bin",
        "sub/deep",
        "sub/b.bin",
        "sub",
        "a.bin",
        ".",
    ]


# --------------------------------------------------------------------------- exchange


def test_exchange_of_relative_paths_swaps_them_from_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative paths are read from the current folder, as every other file call reads them;
    a missing one raises the OSError a caller expects, naming the errno, its text and the path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "from-a").touch()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "from-b").touch()
    assert exchange(Path("a"), Path("b")) is True
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["from-b"]
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["from-a"]
    with pytest.raises(FileNotFoundError) as e:
        exchange(Path("a"), Path("missing"))
    assert (e.value.errno, e.value.strerror, e.value.filename) == (
        errno.ENOENT,
        "No such file or directory",
        "missing",
    )
    assert str(e.value) == "[Errno 2] No such file or directory: 'missing'"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["from-b"]  # nothing changed


# --------------------------------------------------------------------------- DurableAppender


def test_appended_lines_are_flushed_at_once_and_fsynced_within_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed process loses nothing written (the line is in the page cache at once); a crashed
    node loses at most the last second (the default interval)."""
    synced = _record_fsyncs(monkeypatch)
    path = tmp_path / "shard.jsonl"
    out = DurableAppender(path)
    try:
        assert out.write([{"id": "1"}, {"id": "2"}]) == 2
        assert path.read_text() == '{"id": "1"}\n{"id": "2"}\n'  # another reader sees it now
        deadline = time.monotonic() + 1.3
        while str(path) not in synced and time.monotonic() < deadline:
            time.sleep(0.02)
        assert str(path) in synced, "no fsync within 1.3 s of a write"
    finally:
        out.close()


def test_appender_fsyncs_only_what_is_new_and_close_stops_its_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sync`` fsyncs what was written since the last one (an fsync on Lustre is not free),
    ``close`` fsyncs the rest once and is idempotent. The background thread never keeps a
    program alive (daemon) and is gone once ``close`` returns."""
    synced = _record_fsyncs(monkeypatch)
    path = tmp_path / "shard.jsonl"
    before = set(threading.enumerate())
    out = DurableAppender(path, interval_s=60)  # the test calls sync itself
    try:
        started = [t for t in threading.enumerate() if t not in before]
        # one daemon thread, named for a stack dump of a stuck writer
        assert [(t.name, t.daemon) for t in started] == [("fsync", True)]
        out.sync()
        assert synced == []  # nothing written: nothing to sync
        out.write([{"id": "1"}])
        out.sync()
        out.sync()
        assert synced == [str(path)]
        assert out.write([]) == 0
        out.sync()
        assert synced == [str(path)]
        with out:
            out.write([{"id": "2"}])
        assert synced == [str(path)] * 2
        out.close()
        out.sync()
        assert synced == [str(path)] * 2
    finally:  # a failed check must not leave the thread waiting out its 60 s
        out.close()
    assert not any(t.is_alive() for t in started)
    assert path.read_text() == '{"id": "1"}\n{"id": "2"}\n'


@pytest.mark.usefixtures("ascii_locale")
def test_appender_writes_utf8_whatever_the_locale(tmp_path: Path) -> None:
    """Records are UTF-8 lines even in a process whose locale encoding is ASCII (LANG=C on an
    old node): a question in any script is written, and read back, unchanged."""
    path = tmp_path / "shard.jsonl"
    with DurableAppender(path, interval_s=60) as out:
        out.write([{"question": "Combien font 2×3 ? — π≈3"}])
    assert path.read_bytes() == (
        json.dumps({"question": "Combien font 2×3 ? — π≈3"}, ensure_ascii=False) + "\n"
    ).encode("utf-8")


# --------------------------------------------------------------------------- errors a caller reads


def test_record_error_carries_file_line_and_field(tmp_path: Path) -> None:
    p = tmp_path / "q.jsonl"
    p.write_text('{"id": "x", "question": "a"}\n{"id": "x", "question": "b"}\n')
    with pytest.raises(RecordError) as e:
        read_questions(p)
    assert (e.value.path, e.value.line, e.value.field) == (str(p), 2, "id")
    assert str(e.value) == f"{p}:2: field 'id': duplicate id 'x' (first on line 1)"


def test_an_empty_file_or_selection_is_refused_saying_what_the_file_has(tmp_path: Path) -> None:
    p = tmp_path / "q.jsonl"
    p.write_text('{"question": "a"}\n{"question": "b"}\n')
    with pytest.raises(RecordError) as e:
        read_questions(p, start_index=5)
    assert str(e.value) == f"{p}: --start-index 5 selects no records (file has 2)"
    assert (e.value.path, e.value.line, e.value.field) == (str(p), None, None)
    p.write_text("\n  \n")  # blank lines only
    with pytest.raises(RecordError) as e:
        read_questions(p)
    assert str(e.value) == f"{p}: file is empty: no records"


@pytest.mark.parametrize(
    "meta",
    [
        '["\\ud800", {"k": 1}]',  # a surrogate in a list beside a dict
        '{"y": "\\ud800", "x": ["a"]}',  # a surrogate in a dict beside a list
        '[["a"], "\\udc00", {"k": ["b"]}]',
    ],
)
def test_a_lone_surrogate_anywhere_in_a_nested_field_is_refused(tmp_path: Path, meta: str) -> None:
    """``"\\ud800"`` is valid JSON that no UTF-8 file can hold: refused at read, naming the
    top-level field, however deep it sits and whatever sits beside it."""
    p = tmp_path / "q.jsonl"
    p.write_text('{"question": "ok"}\n{"question": "q", "meta": ' + meta + "}\n")
    with pytest.raises(RecordError) as e:
        read_questions(p)
    bad = "\\ud800" if "ud800" in meta else "\\udc00"
    assert str(e.value) == f"{p}:2: field 'meta': contains a lone surrogate ({bad})"


def test_close_returns_only_once_the_fsync_thread_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``close`` waits for its thread, even one slow to notice the stop: nothing of the appender
    runs after it returns."""

    class SlowToWake(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            woke = super().wait(timeout)
            if woke:
                time.sleep(0.2)
            return woke

    monkeypatch.setattr(threading, "Event", SlowToWake)
    before = set(threading.enumerate())
    out = DurableAppender(tmp_path / "shard.jsonl", interval_s=60)
    started = [t for t in threading.enumerate() if t not in before]
    out.close()
    assert started and not any(t.is_alive() for t in started)
