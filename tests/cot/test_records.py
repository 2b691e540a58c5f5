"""Input validation names file, line and field; writes are atomic."""

from __future__ import annotations

from pathlib import Path

import pytest

from cot.records import RecordError, append_durable, atomic_write_text, read_questions


def write(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "in.jsonl"
    p.write_bytes(data)
    return p


@pytest.mark.parametrize(
    ("data", "line", "needle"),
    [
        (b'{"question": "a"}\n{"question": "b"\n', 2, "invalid JSON"),
        (b'{"question": "a"}\n{"prompt": "b"}\n', 2, "field 'question': missing"),
        (b'{"question": 3}\n', 1, "field 'question': must be a non-empty string"),
        (b'{"question": "a"}\n\xff\xfe\n', 2, "invalid UTF-8"),
        (b'{"id": "x", "question": "a"}\n{"id": "x", "question": "b"}\n', 2, "duplicate id"),
        (b"[1, 2]\n", 1, "expected a JSON object"),
    ],
)
def test_bad_input_names_file_line_field(
    tmp_path: Path, data: bytes, line: int, needle: str
) -> None:
    p = write(tmp_path, data)
    with pytest.raises(RecordError) as e:
        read_questions(p)
    assert str(e.value).startswith(f"{p}:{line}: ")
    assert needle in str(e.value)


def test_empty_file(tmp_path: Path) -> None:
    p = write(tmp_path, b"\n\n")
    with pytest.raises(RecordError, match="empty"):
        read_questions(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="not found"):
        read_questions(tmp_path / "nope.jsonl")


def test_ids_default_to_line_numbers_and_selection(tmp_path: Path) -> None:
    p = write(tmp_path, b'{"question": "a"}\n\n{"question": "b", "answer": 3}\n{"question": "c"}\n')
    recs = read_questions(p)
    assert [r["id"] for r in recs] == ["L1", "L3", "L4"]
    assert recs[1]["answer"] == "3"
    assert [r["id"] for r in read_questions(p, start_index=1, num_samples=1)] == ["L3"]
    with pytest.raises(RecordError, match="selects no records"):
        read_questions(p, start_index=5)


def test_atomic_write_keeps_old_file_on_error(tmp_path: Path) -> None:
    p = tmp_path / "out.txt"
    atomic_write_text(p, "old")
    from cot.records import atomic_open

    with pytest.raises(RuntimeError), atomic_open(p) as fh:
        fh.write("new half")
        raise RuntimeError("disk full")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["out.txt"]  # no temp file left


def test_append_durable_one_line_per_record(tmp_path: Path) -> None:
    p = tmp_path / "s.jsonl"
    with open(p, "a", encoding="utf-8") as fh:
        assert append_durable(fh, [{"id": "a"}, {"id": "b", "t": "é"}]) == 2
    assert p.read_text(encoding="utf-8") == '{"id": "a"}\n{"id": "b", "t": "é"}\n'


def test_atomic_open_fsyncs_the_file_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import stat

    from cot import records

    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        calls.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(records.os, "fsync", fsync)
    monkeypatch.setattr(records.os, "replace", replace)
    records.atomic_write_text(tmp_path / "x.txt", "hello")
    assert calls == ["fsync file", "rename", "fsync dir"]
    assert (tmp_path / "x.txt").read_text() == "hello"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "\\ud800", "question": "q"}', "field 'id': contains a lone surrogate (\\ud800"),
        ('{"question": "why \\udfff"}', ":1: field 'question': contains a lone surrogate"),
        ('{"question": "q", "meta": {"x": ["\\ud834"]}}', ":1: field 'meta': contains a lone"),
        ('{"question": "q", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", ":1: invalid JSON"),
        ('{"id": ' + "7" * 5000 + ', "question": "q"}', ":1: invalid JSON"),
    ],
)
def test_input_that_would_crash_a_job_fails_at_read_with_file_and_line(
    tmp_path: Path, line: str, message: str
) -> None:
    p = tmp_path / "q.jsonl"
    p.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(RecordError) as e:
        read_questions(p)
    assert str(e.value).startswith(f"{p}:1: ") and message in str(e.value), str(e.value)
