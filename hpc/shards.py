"""Shard plans, completion markers, resumable shard files and the verified streaming merge.

Protocol (shared by ``generate`` and ``evaluate``):

* ``plan.json`` is written once per stage folder: the input's sha256, the shard count and each
  shard's record range. A relaunch with another input or shard count is refused.
* A task appends finished records to ``shards/00003.jsonl`` (one write + fsync per batch).
  On start it truncates a torn last line and skips the keys already there.
* When every assigned key is present, the shard is rewritten in plan order (atomically) and only
  then ``completions/00003`` is created, holding the record count and the file's byte count
  and crc32. A marker therefore always means a complete shard, and seals its bytes.
* The merge streams the shards in plan order, checks every key once and each shard's bytes
  against its marker, and renames a fsync'd temp file into place. Memory stays constant
  whatever the size of the shards: a few 8 MB blocks.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import threading
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cot.records import RecordError, atomic_open, atomic_write_text, dumps, fsync_dir
from hpc.errors import PlanError
from hpc.layout import StageLayout, shard_name

__all__ = ["PlanError", "shard_name"]

Key = tuple[str, int]  # (record id, sample index)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Plan:
    """Which records each shard owns; written once per stage folder."""

    input: str
    input_sha256: str
    num_records: int
    shards: int
    samples: int
    ranges: list[tuple[int, int]]
    ids: list[str]
    selection: dict[str, Any]

    def keys(self, shard: int) -> list[Key]:
        """The (id, sample) keys of a shard, in output order."""
        lo, hi = self.ranges[shard]
        return [(rid, s) for rid in self.ids[lo:hi] for s in range(self.samples)]

    def to_json(self) -> str:
        """Canonical JSON text."""
        return json.dumps(self.__dict__, indent=1)


def make_plan(
    input_path: str | Path,
    ids: list[str],
    shards: int,
    samples: int = 1,
    selection: dict[str, Any] | None = None,
) -> Plan:
    """Contiguous, balanced ranges: shard i owns records [i*n//N, (i+1)*n//N)."""
    n = len(ids)
    if shards > n:
        raise RecordError(
            input_path, None, f"{shards} shards for {n} records: use --shards {n} or fewer"
        )
    ranges = [(i * n // shards, (i + 1) * n // shards) for i in range(shards)]
    return Plan(
        input=str(input_path),
        input_sha256=sha256_file(input_path),
        num_records=n,
        shards=shards,
        samples=samples,
        ranges=ranges,
        ids=ids,
        selection=selection or {},
    )


def write_or_check_plan(stage_dir: Path, plan: Plan) -> Plan:
    """Write ``plan.json`` once; on relaunch refuse a different input, selection or shard count."""
    old = check_plan(stage_dir, plan)
    if old is not None:
        return old
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(StageLayout(stage_dir).plan, plan.to_json())
    return plan


def check_plan(stage_dir: Path, plan: Plan) -> Plan | None:
    """The plan on disk when it matches ``plan`` (None when there is none); refuse otherwise.

    Raises:
        PlanError: naming what differs (input, shard count, selection, samples).
    """
    path = StageLayout(stage_dir).plan
    if path.exists():
        old = Plan(**json.loads(path.read_text(encoding="utf-8")))
        old.ranges = [tuple(r) for r in old.ranges]  # type: ignore[misc]
        problems = []
        if old.input_sha256 != plan.input_sha256:
            problems.append(
                f"input {plan.input} (sha256 {plan.input_sha256[:12]}) differs from the planned "
                f"input {old.input} (sha256 {old.input_sha256[:12]})"
            )
        if old.shards != plan.shards:
            problems.append(f"--shards {plan.shards} differs from the planned {old.shards}")
        if old.samples != plan.samples or old.selection != plan.selection:
            problems.append("the record selection or samples per question differ from the plan")
        if problems:
            raise PlanError(
                f"{path}: refusing to relaunch into this run folder: {'; '.join(problems)}. "
                "Use a new --run-dir, or the original settings."
            )
        return old
    return None


def load_plan(stage_dir: Path) -> Plan:
    """Read a stage's plan."""
    path = StageLayout(stage_dir).plan
    if not path.exists():
        raise PlanError(f"{path}: no plan here; was the stage launched into this run folder?")
    plan = Plan(**json.loads(path.read_text(encoding="utf-8")))
    plan.ranges = [tuple(r) for r in plan.ranges]  # type: ignore[misc]
    return plan


def shard_path(stage_dir: Path, shard: int) -> Path:
    """``shards/00003.jsonl``."""
    return StageLayout(stage_dir).shard(shard)


def marker_path(stage_dir: Path, shard: int) -> Path:
    """``completions/00003``."""
    return StageLayout(stage_dir).marker(shard)


def completed(stage_dir: Path) -> set[int]:
    """Shards with a completion marker."""
    folder = StageLayout(stage_dir).completions
    if not folder.exists():
        return set()
    return {int(p.name) for p in folder.iterdir() if p.name.isdigit()}


def incomplete(stage_dir: Path, plan: Plan) -> list[int]:
    """Shards still to run, in order."""
    done = completed(stage_dir)
    return [i for i in range(plan.shards) if i not in done]


def record_key(rec: dict[str, Any]) -> Key:
    """(id, sample) of a record."""
    return str(rec["id"]), int(rec.get("sample", 0))


def _parsed(where: str, line: bytes | str) -> tuple[dict[str, Any], Key]:
    """(record, key) of one shard line; PlanError naming ``where`` (``FILE:LINE``) otherwise."""
    try:
        rec = json.loads(line)
    except ValueError as err:
        raise PlanError(f"{where}: not a valid JSON record ({err})") from None
    try:
        return rec, record_key(rec)
    except (KeyError, TypeError, AttributeError, ValueError):
        raise PlanError(f"{where}: record has no 'id' field") from None


def recover_shard(path: Path) -> dict[Key, int]:
    """Truncate a torn last line, then return the keys already written (key -> line number).

    A line is torn when the writer died mid-write: it has no final newline, or is not valid
    JSON. Only the last line can be torn, because each batch is one append followed by fsync.
    """
    if not path.exists():
        return {}
    keys: dict[Key, int] = {}
    good_end = 0
    with open(path, "rb+") as fh:
        for lineno, raw in enumerate(iter(fh.readline, b""), start=1):
            if not raw.endswith(b"\n"):
                break
            try:
                rec = json.loads(raw)
                key = record_key(rec)
            except (ValueError, KeyError, TypeError):
                break
            keys.setdefault(key, lineno)
            good_end = fh.tell()
        size = fh.seek(0, os.SEEK_END)
        if size != good_end:
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
    return keys


def finish_shard(stage_dir: Path, plan: Plan, shard: int) -> int:
    """Check the shard holds every key, rewrite it in plan order, then write the marker.

    Returns the number of records. Raises PlanError when keys are missing (nothing is marked).
    The marker holds the record count, how many are error records, and the rewritten file's
    byte count and crc32, which the merge verifies.
    """
    path = shard_path(stage_dir, shard)
    wanted = plan.keys(shard)
    by_key: dict[Key, bytes] = {}
    errors: set[Key] = set()
    if path.exists():
        with open(path, "rb") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.endswith(b"\n"):
                    # A whole JSON object without its newline: the merge would glue the next
                    # shard's first record onto it. Never mark such a shard complete.
                    raise PlanError(f"{path}:{lineno}: last line has no newline (torn write)")
                rec, key = _parsed(f"{path}:{lineno}", line)
                if key not in by_key:
                    by_key[key] = line
                    if rec.get("error") is not None:
                        errors.add(key)
    missing = [k for k in wanted if k not in by_key]
    if missing:
        raise PlanError(
            f"{path}: shard {shard} is missing {len(missing)} records, e.g. {missing[0]}"
        )
    size = crc = 0
    with atomic_open(path, "wb") as out:
        for k in wanted:
            line = by_key[k]
            out.write(line)
            size += len(line)
            crc = zlib.crc32(line, crc)
    # Error records (a prompt the engine refused, with its reason) are counted for the merge.
    write_marker(
        stage_dir,
        shard,
        {"records": len(wanted), "errors": len(errors & set(wanted)), "bytes": size, "crc32": crc},
    )
    return len(wanted)


def write_marker(stage_dir: Path, shard: int, fields: dict[str, Any]) -> None:
    """Create ``completions/NNNNN`` with ``O_EXCL``, fsync'd: of two writers of one shard, only
    one may ever mark it complete."""
    marker = marker_path(stage_dir, shard)
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise PlanError(f"{marker}: shard {shard} is already marked complete") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(fields))
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(marker.parent)


def read_marker(stage_dir: Path, shard: int) -> dict[str, Any]:
    """A marker's fields; ``{}`` for an unreadable one (markers of older versions hold less)."""
    try:
        fields = json.loads(marker_path(stage_dir, shard).read_text())
    except (OSError, ValueError):
        return {}
    return fields if isinstance(fields, dict) else {}


def _sealed(marker: dict[str, Any]) -> tuple[int, int] | None:
    """(bytes, crc32) the marker recorded at finish time, or None for an older marker."""
    size, crc = marker.get("bytes"), marker.get("crc32")
    if type(size) is int and type(crc) is int:
        return size, crc
    return None


def _changed(path: Path, shard: int, found: tuple[int, int], sealed: tuple[int, int]) -> PlanError:
    """The error for a shard whose bytes differ from its marker; names the first bad line when
    one does not parse (the slow scan runs only on this failure path)."""
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            try:
                _parsed(f"{path}:{lineno}", line)
            except PlanError as err:
                return err
    return PlanError(
        f"{path}: changed after it was marked complete ({found[0]} bytes, crc32 {found[1]:08x}; "
        f"its marker says {sealed[0]} bytes, crc32 {sealed[1]:08x}). Remove it and "
        f"completions/{shard_name(shard)}, then relaunch the same command to redo this shard"
    )


def iter_merged(stage_dir: Path, plan: Plan) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream (line, record) of every shard in plan order, checking each key once and in order,
    and each shard's bytes against its marker.

    Raises:
        PlanError: listing shards without a marker, or naming a key out of place.
    """
    _check_markers(stage_dir, plan)
    for shard in range(plan.shards):
        expected = iter(plan.keys(shard))
        path = shard_path(stage_dir, shard)
        sealed = _sealed(read_marker(stage_dir, shard))
        size = crc = 0
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                size += len(raw)
                crc = zlib.crc32(raw, crc)
                rec, key = _parsed(f"{path}:{lineno}", raw)
                want = next(expected, None)
                if key != want:
                    raise PlanError(f"{path}:{lineno}: expected record {want}, found {key}")
                yield raw.decode("utf-8"), rec
        left = next(expected, None)
        if left is not None:
            raise PlanError(f"{path}: shard {shard} ends before record {left}")
        if sealed is not None and (size, crc) != sealed:
            raise _changed(path, shard, (size, crc), sealed)


def _check_markers(stage_dir: Path, plan: Plan) -> None:
    missing = incomplete(stage_dir, plan)
    if missing:
        names = ", ".join(shard_name(i) for i in missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise PlanError(
            f"{stage_dir}: cannot merge, {len(missing)} of {plan.shards} shards are not complete "
            f"({names}{more}); relaunch the same command to run only these"
        )


# Our writers put "id" first and "sample" second, so each line of a shard must start with
# `{"id": "<id>", "sample": <n>,` in plan order. A block is split into lines and all those
# prefixes are checked by one C-level `map(bytes.startswith, ...)`: no JSON is parsed. A block
# that doesn't fit (hand-edited shards, other key orders, ASCII-escaped ids) is checked line by
# line with json.loads instead, which also names the first bad line.
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]')
_BLOCK = 8 << 20


def _line_prefixes(plan: Plan, shard: int) -> list[bytes]:
    """The bytes each line of ``shard`` starts with, as our writer (``cot.records.dumps``) spells
    them. Built with one join and one split per sample index, not one format per record."""
    lo, hi = plan.ranges[shard]
    if lo == hi:
        return []
    ids = plan.ids[lo:hi]
    if _NEEDS_ESCAPE.search("".join(ids)):  # one scan; escape per id only when some need it
        ids = [json.dumps(i, ensure_ascii=False)[1:-1] for i in ids]
    # An escaped id never holds a raw newline, so "\n" can stand for "between two records".
    joined = "\n".join(ids).encode()
    out: list[bytes] = [b""] * ((hi - lo) * plan.samples)
    for s in range(plan.samples):
        tail = b'", "sample": %d,' % s
        out[s :: plan.samples] = (
            b'{"id": "' + joined.replace(b"\n", tail + b'\n{"id": "') + tail
        ).split(b"\n")
    return out


def _check_lines(path: Path, first: int, lines: list[bytes], keys: list[Key]) -> None:
    """Slow path: parse each line and compare its key with the plan's ``keys[first + k]``."""
    for k, line in enumerate(lines):
        where = f"{path}:{first + k + 1}"
        _, found = _parsed(where, line)
        want = keys[first + k] if first + k < len(keys) else None
        if found != want:
            raise PlanError(f"{where}: expected record {want}, found {found}")


class _BlockWriter:
    """Writes verified blocks from a background thread and starts their write-back at once.

    ``write`` and ``posix_fadvise`` release the GIL, so the disk works while the caller checks
    the next block. POSIX_FADV_DONTNEED submits the dirty pages without waiting for them, which
    leaves the final fsync little to do. At most ``depth`` blocks wait in the queue.
    """

    def __init__(self, out: IO[bytes], depth: int = 2) -> None:
        self._out = out
        self._queue: queue.Queue[memoryview | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._offset = 0
        self._thread = threading.Thread(target=self._run, name="merge-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fadvise = getattr(os, "posix_fadvise", None)
        while (view := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so that put() never blocks forever
            try:
                size = self._out.write(view)
                if fadvise is not None:
                    self._out.flush()
                    fadvise(self._out.fileno(), self._offset, size, os.POSIX_FADV_DONTNEED)
                self._offset += size
            except BaseException as err:  # re-raised in the caller's thread
                self._error = err

    def write(self, view: memoryview) -> None:
        """Queue ``view``; raises the error of an earlier write, if any."""
        if self._error is not None:
            raise self._error
        self._queue.put(view)

    def close(self) -> BaseException | None:
        """Wait until every queued block is written; returns the first write error."""
        self._queue.put(None)
        self._thread.join()
        return self._error


def _merge_fast(stage_dir: Path, plan: Plan, out: IO[bytes]) -> int:
    """Copy shards block by block, checking every key in order; returns the record count."""
    writer = _BlockWriter(out)
    try:
        total = sum(_merge_shard(stage_dir, plan, shard, writer) for shard in range(plan.shards))
    finally:
        error = writer.close()
    if error is not None:
        raise error
    return total


def _merge_shard(stage_dir: Path, plan: Plan, shard: int, writer: _BlockWriter) -> int:
    path = shard_path(stage_dir, shard)
    want = _line_prefixes(plan, shard)
    # A marker written by this version seals the shard's byte count and crc32: the prefixes
    # check the keys, the checksum everything else. An older marker gets every line parsed.
    sealed = _sealed(read_marker(stage_dir, shard))
    keys: list[Key] | None = None  # built only if a block needs the slow path
    pos = size = crc = 0
    with open(path, "rb") as fh:
        rest = b""
        while block := fh.read(_BLOCK):
            size += len(block)
            crc = zlib.crc32(block, crc)
            data = rest + block if rest else block
            lines = data.split(b"\n")
            rest = lines.pop()  # the partial line carried into the next block
            n = len(lines)
            if (
                sealed is None
                or n > len(want) - pos
                or not all(map(bytes.startswith, lines, want[pos : pos + n]))
            ):
                keys = keys if keys is not None else plan.keys(shard)
                _check_lines(path, pos, lines, keys)
            if n:  # a line longer than a block just carries on into the next one
                writer.write(memoryview(data)[: len(data) - len(rest)])
            pos += n
        if rest:
            raise PlanError(f"{path}:{pos + 1}: torn last line in a complete shard")
    if sealed is not None and (size, crc) != sealed:
        raise _changed(path, shard, (size, crc), sealed)
    if pos != len(want):
        raise PlanError(f"{path}: shard {shard} ends before record {plan.keys(shard)[pos]}")
    return pos


def write_merged(
    stage_dir: Path,
    plan: Plan,
    outputs: Iterable[Path],
    keep: Any = None,
) -> dict[str, Any]:
    """Merge shards into ``stage_dir/merged.jsonl`` atomically and copy it to each output.

    Args:
        keep: optional filter, called with the records of one question (its samples, in plan
            order: they are adjacent in the merged order) and returning one bool per record;
            records it rejects are left out (and counted per category). Without it the merge
            copies verified blocks and never parses JSON.

    Returns:
        counts: total, kept, errors (records the engine could not produce, with their reason),
        and kept/total per category (with ``keep``).
    """
    merged = StageLayout(stage_dir).merged
    total = kept = 0
    per_cat: dict[str, list[int]] = {}
    if keep is None:
        _check_markers(stage_dir, plan)
        with atomic_open(merged, "wb") as out:
            total = kept = _merge_fast(stage_dir, plan, out)
    else:
        with atomic_open(merged) as out:
            for group in _questions(iter_merged(stage_dir, plan)):
                verdicts = keep([rec for _, rec in group])
                for (line, rec), ok in zip(group, verdicts, strict=True):
                    total += 1
                    cat = per_cat.setdefault(str(rec.get("category", "all")), [0, 0])
                    cat[1] += 1
                    if ok:
                        out.write(line)
                        kept += 1
                        cat[0] += 1
    for dest in outputs:
        _copy_atomic(merged, Path(dest))
    return {
        "total": total,
        "kept": kept,
        "errors": marked_errors(stage_dir, plan),
        "per_category": per_cat,
    }


def _questions(
    lines: Iterable[tuple[str, dict[str, Any]]],
) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Group merged lines by question: the samples of one id are adjacent in plan order."""
    group: list[tuple[str, dict[str, Any]]] = []
    for item in lines:
        if group and item[1]["id"] != group[0][1]["id"]:
            yield group
            group = []
        group.append(item)
    if group:
        yield group


def marked_errors(stage_dir: Path, plan: Plan) -> int:
    """Error records over every complete shard, as their markers count them."""
    n = 0
    for shard in range(plan.shards):
        errors = read_marker(stage_dir, shard).get("errors", 0)
        n += errors if type(errors) is int else 0
    return n


def _copy_atomic(src: Path, dest: Path, chunk: int = 1 << 20) -> None:
    with open(src, "rb") as fin, atomic_open(dest, "wb") as fout:
        while block := fin.read(chunk):
            fout.write(block)


def append_attempt(stage_dir: Path, shard: int, info: dict[str, Any]) -> int:
    """Append one event (a start, a resume, the requests sent) to a shard's attempt log;
    returns how many lines the log has."""
    path = StageLayout(stage_dir).attempts(shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(dumps(info) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    with open(path, encoding="utf-8") as fh:
        return sum(1 for _ in fh)
