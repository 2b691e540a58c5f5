"""Plans in O(shards) and tasks that read only their slice of the input (issue: scale)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest

from cot import sources as R
from cot.records import RecordError, read_questions
from hpc import shards as S


def _odd_file(path: Path, n: int = 23) -> Path:
    """Blank lines, CRLF endings, ids missing (L<line>), multi-byte UTF-8, no final newline."""
    lines: list[bytes] = []
    for i in range(n):
        rec: dict[str, object] = {"question": f"{'é漢🙂' * (i % 4)} what is {i}?", "answer": i}
        if i % 3:
            rec["id"] = f"id-{i}-ü"
        text = json.dumps(rec, ensure_ascii=i % 2 == 0).encode()
        lines.append(text + (b"\r\n" if i % 5 == 0 else b"\n"))
        if i % 4 == 0:
            lines.append(b"   \n" if i % 8 else b"\n")
    path.write_bytes(b"".join(lines).rstrip(b"\n"))  # the last record has no newline
    return path


@pytest.mark.parametrize("block", [R._BLOCK, 7])
@pytest.mark.parametrize(
    "selection", [{}, {"start_index": 5}, {"start_index": 3, "num_samples": 11}]
)
def test_slices_give_exactly_the_records_of_reading_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int, selection: dict[str, int]
) -> None:
    path = _odd_file(tmp_path / "q.jsonl")
    monkeypatch.setattr(R, "_BLOCK", block)  # 7 bytes: block edges inside characters
    whole = read_questions(path, **selection)  # type: ignore[arg-type]
    for shards in (1, 2, 5, len(whole)):
        plan = S.make_plan(path, shards, selection=selection)
        got = [r for i in range(shards) for r in plan.records(i)]
        assert got == whole, shards
        assert plan.num_records == len(whole)
        assert plan.input_sha256 == S.sha256_file(path)
        pieces = [p for sl in plan.slices for p in sl[2]]
        assert [p[0] for p in pieces] == [0] * shards  # one file: one piece per shard
        assert all(a[2] == b[1] for a, b in itertools.pairwise(pieces))  # contiguous
        assert pieces[-1][2] <= path.stat().st_size


def test_plan_size_grows_with_shards_not_records(tmp_path: Path) -> None:
    sizes = []
    for n in (200, 20_000):
        path = tmp_path / f"q{n}.jsonl"
        path.write_text("".join(json.dumps({"question": f"q {i}?"}) + "\n" for i in range(n)))
        sizes.append(len(S.make_plan(path, 50).to_json()))
    assert abs(sizes[1] - sizes[0]) < 50 * 12, sizes  # longer offsets per shard, no more
    assert sizes[0] < 50 * 200


def test_a_changed_slice_is_refused_and_the_other_shards_still_read(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"r{i}", "question": f"{i}?"}) + "\n" for i in range(9))
    )
    plan = S.make_plan(path, 3)
    before = [plan.records(i) for i in range(3)]
    data = path.read_bytes()
    start = plan.slices[1][2][0][1]
    path.write_bytes(data[:start] + data[start:].replace(b"3?", b"4?", 1))  # same length
    with pytest.raises(S.PlanError, match=r"shard 1: .*q\.jsonl.*changed since the launch"):
        plan.records(1)
    assert [plan.records(0), plan.records(2)] == [before[0], before[2]]
    path.write_bytes(data[:start])  # truncated: shard 1 and 2 are gone
    for shard in (1, 2):
        with pytest.raises(S.PlanError, match=r"q\.jsonl.*changed since the launch"):
            plan.records(shard)
    assert plan.records(0) == before[0]


@pytest.mark.parametrize("small", [100_000, 2])
def test_the_launch_scan_refuses_what_read_questions_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small: int
) -> None:
    monkeypatch.setattr(R, "SMALL", small)
    path = tmp_path / "q.jsonl"
    path.write_text(
        '{"id": "a", "question": "x"}\n\n{"id": "b", "question": "y"}\n'
        '{"id": "a", "question": "z"}\n'
    )
    with pytest.raises(RecordError) as whole:
        read_questions(path)
    with pytest.raises(RecordError) as scan:
        S.make_plan(path, 1)
    assert str(scan.value) == str(whole.value)
    assert "q.jsonl:4: field 'id': duplicate id 'a' (first on line 1)" in str(scan.value)
    path.write_text('{"id": "a", "question": "x"}\n{"id": "b", "question": 3}\n')
    with pytest.raises(RecordError, match=r"q\.jsonl:2: field 'question': must be a non-empty"):
        S.make_plan(path, 1)


@pytest.mark.parametrize("small", [R.SMALL, 2])
def test_an_id_hash_collision_is_not_a_duplicate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small: int
) -> None:
    """Every id hashing alike: the second pass tells real duplicates from collisions (with the
    set of small inputs, and with numpy's sort of large ones)."""
    monkeypatch.setattr(R, "SMALL", small)
    monkeypatch.setattr(R, "id_hash", lambda rid: b"\1" * 8)
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "question": "?"}) + "\n" for i in range(5)))
    assert S.make_plan(path, 2).num_records == 5
    with open(path, "a") as fh:
        fh.write(json.dumps({"id": "r3", "question": "?"}) + "\n")
    with pytest.raises(RecordError, match=r"q\.jsonl:6: field 'id': duplicate id 'r3'"):
        S.make_plan(path, 2)


def test_a_plan_an_older_version_wrote_is_refused_not_misread(tmp_path: Path) -> None:
    stage_dir = tmp_path / "run" / "generate"
    stage_dir.mkdir(parents=True)
    old = {
        "input": "q.jsonl",
        "input_sha256": "0" * 64,
        "num_records": 2,
        "shards": 1,
        "samples": 1,
        "ranges": [[0, 2]],
        "ids": ["a", "b"],
        "selection": {},
    }
    (stage_dir / "plan.json").write_text(json.dumps(old))
    for read in (S.load_plan, lambda d: S.check_plan(d, None)):  # type: ignore[arg-type]
        with pytest.raises(S.PlanError, match=r"plan\.json: plan format 1, written by an older"):
            read(stage_dir)


def test_finish_leaves_a_shard_already_in_order_untouched(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "question": "?"}) + "\n" for i in range(6)))
    stage_dir = tmp_path / "run" / "generate"
    plan = S.write_or_check_plan(stage_dir, S.make_plan(path, 2, samples=2))
    shard = S.shard_path(stage_dir, 0)
    shard.parent.mkdir(parents=True)
    shard.write_text("".join(json.dumps({"id": r, "sample": s}) + "\n" for r, s in plan.keys(0)))
    inode = os.stat(shard).st_ino
    assert S.finish_shard(stage_dir, plan, 0) == 6
    assert os.stat(shard).st_ino == inode  # not rewritten
    marker = S.read_marker(stage_dir, 0)
    assert marker["bytes"] == shard.stat().st_size and marker["slice"] == plan.digest(0)


def test_the_merge_names_the_shard_with_one_flipped_byte(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "question": "?"}) + "\n" for i in range(30)))
    stage_dir = tmp_path / "run" / "generate"
    plan = S.write_or_check_plan(stage_dir, S.make_plan(path, 3))
    for i in range(3):
        shard = S.shard_path(stage_dir, i)
        shard.parent.mkdir(parents=True, exist_ok=True)
        shard.write_text(
            "".join(
                json.dumps({"id": r, "sample": s, "cot": "abcdef"}) + "\n" for r, s in plan.keys(i)
            )
        )
        S.finish_shard(stage_dir, plan, i)
    assert S.write_merged(stage_dir, plan, [])["total"] == 30
    good = (stage_dir / "merged.jsonl").read_bytes()
    shard = S.shard_path(stage_dir, 1)
    data = bytearray(shard.read_bytes())
    middle = data.index(b"abcdef", len(data) // 2) + 2
    data[middle] ^= 0x01  # "c" becomes "b": still valid JSON
    shard.write_bytes(bytes(data))
    with pytest.raises(S.PlanError, match=r"00001\.jsonl: changed after it was marked complete"):
        S.write_merged(stage_dir, plan, [])
    assert (stage_dir / "merged.jsonl").read_bytes() == good


# --------------------------------------------------------------------------- Parquet, folders


def _parquet(path: Path, rows: list[dict[str, object]], group: int = 4) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=group)
    return path


def _rows(n: int, ids: bool = True) -> list[dict[str, object]]:
    return [
        {
            "id": (f"p{i}" if i % 3 else None) if ids else None,
            "question": f"parquet question {i} é?",
            "answer": str(i),
            "category": None if i % 2 else "word",
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("batch", [R._TASK_ROWS, 3])
def test_parquet_slices_read_only_their_row_groups_and_match_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    monkeypatch.setattr(R, "_TASK_ROWS", batch)  # 3: a task streams a group in 3-row batches
    path = _parquet(tmp_path / "q.parquet", _rows(19), group=7)
    # Nulls count as absent; a row with no id is named by file and row (from 1).
    want = [
        {k: v for k, v in r.items() if v is not None} | {"id": r["id"] or f"q.parquet:{i + 1}"}
        for i, r in enumerate(_rows(19))
    ]
    for shards in (1, 3, 7, 19):
        plan = S.make_plan(path, shards)
        assert plan.files == [["", "parquet", S.sha256_file(path)]]
        assert [r for i in range(shards) for r in plan.records(i)] == want, shards
    plan = S.make_plan(path, 2, selection={"start_index": 5, "num_samples": 9})
    assert [r for i in range(2) for r in plan.records(i)] == want[5:14]


def test_parquet_refuses_bad_rows_by_row_and_field(tmp_path: Path) -> None:
    rows = _rows(6)
    rows[4]["question"] = None  # a null question is a missing one
    path = _parquet(tmp_path / "q.parquet", rows)
    with pytest.raises(RecordError, match=r"q\.parquet:5: field 'question': missing"):
        S.make_plan(path, 2)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(RecordError, match=r"bad\.parquet: not a readable Parquet file"):
        S.make_plan(tmp_path / "bad.parquet", 1)


def _folder(root: Path) -> list[dict[str, object]]:
    """a.jsonl (ids), b/c.parquet (some ids), d.jsonl (no ids, blank lines); a hidden file."""
    (root / "b").mkdir(parents=True)
    a = [{"id": f"a{i}", "question": f"a {i}?"} for i in range(5)]
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a))
    _parquet(root / "b" / "c.parquet", _rows(7))
    (root / "d.jsonl").write_text('{"question": "d 1?"}\n\n{"question": "d 2?"}\n')
    (root / ".hidden.jsonl").write_text('{"question": "never read"}\n')
    c = [
        {k: v for k, v in r.items() if v is not None} | {"id": r["id"] or f"b/c.parquet:{i + 1}"}
        for i, r in enumerate(_rows(7))
    ]
    d = [{"question": "d 1?", "id": "d.jsonl:L1"}, {"question": "d 2?", "id": "d.jsonl:L3"}]
    return [*a, *c, *d]


def test_a_folder_is_planned_across_its_files_without_concatenating_them(tmp_path: Path) -> None:
    want = _folder(tmp_path / "in")
    for shards in (1, 2, 4, len(want)):
        plan = S.make_plan(tmp_path / "in", shards)
        assert [f[:2] for f in plan.files] == [
            ["a.jsonl", "jsonl"],
            ["b/c.parquet", "parquet"],
            ["d.jsonl", "jsonl"],
        ]
        assert [r for i in range(shards) for r in plan.records(i)] == want, shards
    plan = S.make_plan(tmp_path / "in", 2)
    assert [len(sl[2]) for sl in plan.slices] == [2, 2]  # each shard spans two files
    again = S.make_plan(tmp_path / "in", 2)
    assert again.to_json() == plan.to_json()  # stable: ids and digests the same on relaunch


def test_a_changed_file_in_a_folder_stops_only_the_shards_that_read_it(tmp_path: Path) -> None:
    _folder(tmp_path / "in")
    plan = S.make_plan(tmp_path / "in", 4)
    readers = [i for i, sl in enumerate(plan.slices) if any(p[0] == 2 for p in sl[2])]
    assert readers == [3]
    d = tmp_path / "in" / "d.jsonl"
    d.write_text(d.read_text().replace("d 2?", "d 9?"))
    with pytest.raises(S.PlanError, match=r"shard 3: .*d\.jsonl.*changed since the launch"):
        plan.records(3)
    for i in range(3):
        plan.records(i)
    assert S.make_plan(tmp_path / "in", 4).input_sha256 != plan.input_sha256


def test_a_duplicate_id_across_files_names_both(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.jsonl").write_text('{"id": "x", "question": "?"}\n')
    (root / "b.jsonl").write_text('{"id": "y", "question": "?"}\n{"id": "x", "question": "?"}\n')
    with pytest.raises(
        RecordError, match=r"b\.jsonl:2: field 'id': duplicate id 'x' \(first on .*a\.jsonl:1\)"
    ):
        S.make_plan(root, 1)
    (root / "a.jsonl").unlink()
    (root / "b.jsonl").unlink()
    with pytest.raises(RecordError, match=r"in: folder holds no \.jsonl or \.parquet file"):
        S.make_plan(root, 1)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_changed_slice_that_no_longer_validates_is_reported_as_changed(
    tmp_path: Path, kind: str
) -> None:
    """An edit that also breaks a record says the input changed (relaunch), not "fix line N"."""
    rows = [{"id": f"r{i}", "question": f"{i}?"} for i in range(6)]
    if kind == "jsonl":
        path = tmp_path / "q.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path = _parquet(tmp_path / "q.parquet", rows)  # type: ignore[arg-type]
    plan = S.make_plan(path, 2)
    if kind == "jsonl":
        path.write_text(path.read_text().replace('"4?"', "4444"))  # question becomes a number
    else:
        rows[4]["question"] = None  # type: ignore[assignment]
        _parquet(path, rows)  # type: ignore[arg-type]
    with pytest.raises(S.PlanError, match=r"shard 1: .*q\.\w+: the input changed since the launch"):
        plan.records(1)
    assert [r["id"] for r in plan.records(0)] == ["r0", "r1", "r2"]


def test_a_file_name_that_is_not_utf8_is_refused_by_name(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.jsonl").write_text('{"question": "?"}\n')
    bad = os.fsencode(root) + b"/\xff.jsonl"
    with open(bad, "w") as fh:
        fh.write('{"question": "?"}\n')
    with pytest.raises(RecordError, match=r"file name is not valid UTF-8"):
        S.make_plan(root, 1)


def test_parquet_values_json_cannot_hold_become_text_at_any_depth(tmp_path: Path) -> None:
    import datetime

    from cot.records import dumps

    day = datetime.date(2026, 12, 6)
    path = _parquet(tmp_path / "q.parquet", [{"question": "?", "when": day, "log": [day]}])
    (rec,) = S.make_plan(path, 1).records(0)
    assert rec["when"] == "2026-12-06" and rec["log"] == ["2026-12-06"]
    assert json.loads(dumps(rec)) == rec  # a shard task can write it
