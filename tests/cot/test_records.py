"""Input validation names file, line and field; writes are atomic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cot.answers import answers_match
from cot.records import RecordError, append_durable, atomic_write_text, dumps, read_questions


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
        ('{"question": "q", "\\ud800": 1}', ":1: field '\\ud800': contains a lone surrogate"),
        ('{"question": "q", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", ":1: invalid JSON"),
        ('{"id": ' + "7" * 5000 + ', "question": "q"}', ":1: invalid JSON"),
        ('{"question": "q", "answer": "' + "7" * 4301 + '"}', ":1: field 'answer': has more than"),
        ('{"question": "q", "answer": "' + "999," * 1400 + '0"}', ":1: field 'answer': has more"),
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


# Lines a question file may hold: JSON of any shape (lone surrogates, deep nesting, huge numbers
# included, as json.dumps writes them) and arbitrary text or bytes.
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "id": _JSON | st.text(max_size=10),
        "question": _JSON | st.text(max_size=30),
        "answer": _JSON | st.integers(10**10) | st.text("0123456789,./", max_size=30),
        "category": _JSON,
    },
)
_LINE = st.one_of(
    _FIELDS.map(json.dumps).map(str.encode),
    _JSON.map(json.dumps).map(str.encode),
    st.sampled_from(
        [
            "[" * 3000 + "]" * 3000,
            '{"id": ' + "7" * 5000 + "}",
            '{"question": "q", "answer": "' + "7" * 4400 + '"}',
            '{"question": "q", "category": "$\\\\frac{$"}',
        ]
    ).map(str.encode),
    st.binary(max_size=40),
)


@settings(max_examples=300, deadline=None, database=None)
@given(lines=st.lists(_LINE, max_size=6))
def test_reader_accepts_or_refuses_with_file_and_line_and_what_it_accepts_can_be_written(
    tmp_path_factory: pytest.TempPathFactory, lines: list[bytes]
) -> None:
    """Whatever a file holds, reading it returns records or raises RecordError naming the file;
    never anything else. Every record it returns can be written and read back."""
    p = tmp_path_factory.mktemp("q") / "q.jsonl"
    p.write_bytes(b"".join(line.replace(b"\n", b" ") + b"\n" for line in lines))
    try:
        records = read_questions(p)
    except RecordError as e:
        assert str(e).startswith(f"{p}"), str(e)
        return
    out = p.with_name("out.jsonl")
    out.write_text("".join(dumps(r) + "\n" for r in records), encoding="utf-8")
    assert [r["id"] for r in read_questions(out)] == [r["id"] for r in records]
    for r in records:
        answers_match(r.get("answer"), str(r.get("answer", "")))


# --------------------------------------------------------------------------- atomic folders


@pytest.mark.parametrize("can_exchange", [True, False])
def test_atomic_dir_replaces_a_folder_whole_and_fsyncs_it_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, can_exchange: bool
) -> None:
    from cot import records

    if not can_exchange:  # a file system without renameat2(RENAME_EXCHANGE), e.g. older Lustre
        monkeypatch.setattr(records, "exchange", lambda a, b: False)
    dest = tmp_path / "adapter"
    dest.mkdir()
    (dest / "old.bin").write_text("old")
    from tests.cot.test_records_durability import _record_fsyncs

    synced = _record_fsyncs(monkeypatch)
    with records.atomic_dir(dest) as tmp:
        assert tmp.parent == tmp_path and tmp != dest and not list(tmp.iterdir())
        (tmp / "sub").mkdir()
        (tmp / "a.bin").write_text("a")
        (tmp / "sub" / "b.bin").write_text("b")
        assert (dest / "old.bin").read_text() == "old"  # untouched until the block ends
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == [
        "a.bin",
        "sub",
        "sub/b.bin",
    ]
    for name in ("a.bin", "sub/b.bin", "sub", ""):  # every file and folder, before the swap
        assert str(tmp / name).rstrip("/") in synced, (name, synced)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp or old left


def test_atomic_dir_failure_leaves_the_old_folder_and_no_temp(tmp_path: Path) -> None:
    from cot.records import atomic_dir

    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "w.bin").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(dest) as tmp:
        (tmp / "w.bin").write_text("half")
        raise RuntimeError("killed mid-save")
    assert (dest / "w.bin").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("can_exchange", [True, False])
def test_atomic_dir_two_writers_placing_at_once_both_succeed_and_one_wins_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, can_exchange: bool
) -> None:
    """Two writers that reach the placement step together, over and over (a fresh ``dest``
    and an existing one): neither fails, ``dest`` is wholly one of them, nothing is left
    beside it. A check-then-rename leaves the loser with ENOTEMPTY."""
    import threading

    from cot import records

    if not can_exchange:
        monkeypatch.setattr(records, "exchange", lambda a, b: False)
    real_fsync_tree = records.fsync_tree
    gate = threading.Barrier(2, timeout=10)

    def fsync_tree(root: Path) -> None:
        real_fsync_tree(root)
        gate.wait()  # both writers leave fsync and place their folder at the same moment

    monkeypatch.setattr(records, "fsync_tree", fsync_tree)
    for round_ in range(40):
        dest = tmp_path / f"r{round_}" / "adapter"
        if round_ % 2:  # odd rounds: an older folder is already there
            dest.mkdir(parents=True)
            (dest / "w.bin").write_text("old")
        errors: list[BaseException] = []

        def write(who: str, dest: Path = dest, errors: list[BaseException] = errors) -> None:
            try:
                with records.atomic_dir(dest) as tmp:
                    (tmp / "w.bin").write_text(who)
                    (tmp / "c.json").write_text(who)
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=write, args=(w,)) for w in ("first", "second")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [], (round_, errors)
        contents = {p.name: p.read_text() for p in dest.iterdir()}
        assert set(contents) == {"w.bin", "c.json"}, (round_, contents)
        assert len(set(contents.values())) == 1 and "old" not in contents.values(), contents
        assert [p.name for p in dest.parent.iterdir()] == ["adapter"], round_


def test_exchange_swaps_two_folders_in_one_step_here(tmp_path: Path) -> None:
    """Linux renameat2(RENAME_EXCHANGE): both names exist at every moment."""
    from cot.records import exchange

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "from-a").touch()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "from-b").touch()
    assert exchange(tmp_path / "a", tmp_path / "b") is True
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["from-b"]
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["from-a"]
    with pytest.raises(FileNotFoundError):
        exchange(tmp_path / "a", tmp_path / "missing")
