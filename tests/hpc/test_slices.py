"""Plans in O(shards) and tasks that read only their slice of the input (issue: scale)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cot import records as R
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


@pytest.mark.parametrize("block", [R._SCAN_BLOCK, 7])
@pytest.mark.parametrize(
    "selection", [{}, {"start_index": 5}, {"start_index": 3, "num_samples": 11}]
)
def test_slices_give_exactly_the_records_of_reading_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int, selection: dict[str, int]
) -> None:
    path = _odd_file(tmp_path / "q.jsonl")
    monkeypatch.setattr(R, "_SCAN_BLOCK", block)  # 7 bytes: block edges inside characters
    whole = read_questions(path, **selection)  # type: ignore[arg-type]
    for shards in (1, 2, 5, len(whole)):
        plan = S.make_plan(path, shards, selection=selection)
        got = [r for i in range(shards) for r in plan.records(i)]
        assert got == whole, shards
        assert plan.num_records == len(whole)
        assert plan.input_sha256 == S.sha256_file(path)
        starts = [sl[0] for sl in plan.slices]
        assert starts == sorted(starts) and plan.slices[-1][1] <= path.stat().st_size


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
    start = plan.slices[1][0]
    path.write_bytes(data[:start] + data[start:].replace(b"3?", b"4?", 1))  # same length
    with pytest.raises(S.PlanError, match=r"shard 1: .*q\.jsonl.*changed since the launch"):
        plan.records(1)
    assert [plan.records(0), plan.records(2)] == [before[0], before[2]]
    path.write_bytes(data[:start])  # truncated: shard 1 and 2 are gone
    for shard in (1, 2):
        with pytest.raises(S.PlanError, match=r"q\.jsonl.*changed since the launch"):
            plan.records(shard)
    assert plan.records(0) == before[0]


def test_the_launch_scan_refuses_what_read_questions_refuses(tmp_path: Path) -> None:
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


def test_an_id_hash_collision_is_not_a_duplicate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every id hashing alike: the second pass tells real duplicates from collisions."""
    monkeypatch.setattr(R, "id_hash", lambda rid: b"\0" * 8)
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
    assert marker["bytes"] == shard.stat().st_size and marker["slice"] == plan.slices[0][5]


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
