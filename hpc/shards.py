"""Shard plans, completion markers, resumable shard files and the verified streaming merge.

Protocol (shared by ``generate`` and ``evaluate``):

* ``plan.json`` is written once per stage folder: the input's sha256, the shard count and, per
  shard, its byte range of the input, record count, ids digest and the range's sha256. It is
  O(shards) whatever the record count. A relaunch with another input or shard count is refused.
* A task reads only its byte range and checks it against the plan. It appends finished records
  to ``shards/00003.jsonl`` (flushed at once, fsync'd within a second). On start it truncates a
  torn last line and skips the keys already there.
* When every assigned key is present, the shard is checked (each key once) and put in plan
  order (rewritten atomically only if it is not already), and only then ``completions/00003``
  is created, holding the record count, the file's byte count and crc32, and the sha256 of the
  slice it came from. A marker therefore always means a complete shard, and seals its bytes.
* The merge checks each shard's marker against the plan and copies the shards in plan order,
  checksumming every byte against its marker, into a fsync'd temp file renamed into place.
  Memory stays constant whatever the size of the shards: a few 8 MB blocks.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cot.records import RecordError, atomic_open, atomic_write_text, dumps, fsync_dir
from cot.sources import (
    QuestionIndex,
    ids_digest,
    piece_digests,
    read_pieces,
    scan_questions,
    sha256_file,
    slice_digest,
)
from hpc.errors import PlanError
from hpc.layout import StageLayout, shard_name

__all__ = ["PlanError", "sha256_file", "shard_name"]

Key = tuple[str, int]  # (record id, sample index)


PLAN_FORMAT = 2


@dataclass
class Plan:
    """Which records each shard owns; written once per stage folder.

    Its size is O(shards), whatever the record count. ``files`` lists the input's files as
    ``[label, kind, sha256]`` (label "" when the input is one file). Per shard, ``slices`` holds
    ``[records, ids_digest, pieces]``: how many records it owns, a digest of their ids in order
    (``cot.sources.ids_digest``) and the pieces of files it reads, ``[file, start, end, first,
    digest]``: a byte range and the line it starts on (JSONL) or a row range (Parquet), and
    128 bits of the sha256 of that piece.
    """

    input: str
    input_sha256: str
    num_records: int
    shards: int
    samples: int
    selection: dict[str, Any]
    files: list[list[Any]]
    slices: list[list[Any]]
    format: int = PLAN_FORMAT

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """Each shard's record range ``[lo, hi)`` within the selection."""
        out, lo = [], 0
        for sl in self.slices:
            out.append((lo, lo + sl[0]))
            lo += sl[0]
        return out

    def digest(self, shard: int) -> str:
        """The sha256 of what ``shard`` reads (its marker carries it)."""
        return slice_digest(self.slices[shard][2])

    def records(self, shard: int, path: str | Path | None = None) -> list[dict[str, Any]]:
        """The input records of ``shard``, reading only its pieces of the input (``path``, the
        planned input by default) and checked against the plan: PlanError naming the file
        when they changed since the launch."""
        count, ids, pieces = self.slices[shard]
        root = path or self.input
        try:
            recs = read_pieces(root, self.files, pieces)
        except RecordError as err:
            raise PlanError(f"shard {shard}: {err}") from None
        except OSError as err:  # a file replaced by a folder, unreadable, gone mid-read
            raise PlanError(
                f"shard {shard}: {root}: cannot read the planned input ({err})"
            ) from None
        if len(recs) != count or ids_digest(r["id"] for r in recs) != ids:
            raise PlanError(
                f"{root}: shard {shard} no longer holds its {count} planned records; "
                "relaunch into a new --run-dir"
            )
        return recs

    def keys(self, shard: int, records: list[dict[str, Any]] | None = None) -> list[Key]:
        """The (id, sample) keys of a shard, in output order (read from its slice unless its
        ``records`` are given)."""
        recs = self.records(shard) if records is None else records
        return [(r["id"], s) for r in recs for s in range(self.samples)]

    def to_json(self) -> str:
        """Canonical JSON text: the header indented, one line per shard."""
        head = {k: v for k, v in self.__dict__.items() if k != "slices"}
        body = ",\n".join("  " + json.dumps(sl) for sl in self.slices)
        return json.dumps(head, indent=1)[:-2] + ',\n "slices": [\n' + body + "\n ]\n}"

    @classmethod
    def from_json(cls, path: Path) -> Plan:
        """Read ``plan.json``; PlanError for one an older version wrote (it listed every id)."""
        try:
            fields = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise PlanError(f"{path}: unreadable plan ({err})") from None
        if not isinstance(fields, dict) or fields.get("format") != PLAN_FORMAT:
            found = fields.get("format", 1) if isinstance(fields, dict) else "?"
            raise PlanError(
                f"{path}: plan format {found}, written by an older cot-hpc (this one reads "
                f"format {PLAN_FORMAT}: byte ranges instead of every id). Finish that run with "
                "the version that launched it, or launch into a new --run-dir"
            )
        try:
            return cls(**fields)
        except TypeError as err:
            raise PlanError(f"{path}: not a plan this version can read ({err})") from None


def make_plan(
    input_path: str | Path,
    shards: int,
    samples: int = 1,
    selection: dict[str, Any] | None = None,
    *,
    index: QuestionIndex | None = None,
) -> Plan:
    """Contiguous, balanced ranges: shard i owns records [i*n//N, (i+1)*n//N).

    Streams the input once (``scan_questions``; or takes that scan's ``index``), then reads
    the selected records once more to take each shard's digest. Refuses duplicate ids.
    """
    selection = selection or {}
    if index is None:
        index = scan_questions(
            input_path,
            start_index=selection.get("start_index") or 0,
            num_samples=selection.get("num_samples"),
        )
    n = index.count
    if shards > n:
        raise RecordError(
            input_path, None, f"{shards} shards for {n} records: use --shards {n} or fewer"
        )
    ranges = [(i * n // shards, (i + 1) * n // shards) for i in range(shards)]
    pieces = [index.pieces(lo, hi) for lo, hi in ranges]
    ids = [index.ids_digest(lo, hi) for lo, hi in ranges]
    index.check_unique()
    files = [[f["source"].label, f["source"].kind, f["sha256"]] for f in index.files]
    first = {i: f["first"] for i, f in enumerate(index.files) if f["first"] is not None}
    piece_digests(input_path, files, pieces, first)
    return Plan(
        input=str(input_path),
        input_sha256=index.sha256,
        num_records=n,
        shards=shards,
        samples=samples,
        selection=selection,
        files=files,
        slices=[
            [hi - lo, ids_i, pcs] for (lo, hi), ids_i, pcs in zip(ranges, ids, pieces, strict=True)
        ],
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
        PlanError: naming what differs (input, shard count, selection, samples), or for a plan
            an older version wrote.
    """
    path = StageLayout(stage_dir).plan
    if path.exists():
        old = Plan.from_json(path)
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
    return Plan.from_json(path)


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


def finish_shard(stage_dir: Path, plan: Plan, shard: int, keys: list[Key] | None = None) -> int:
    """Check the shard holds every key once, put it in plan order, then write the marker.

    Streams: one pass indexes each key's byte offset (no line is kept in memory). A shard
    already in plan order, with nothing extra (the usual case), is left as it is; otherwise it
    is rewritten in plan order from those offsets, atomically. ``keys`` are the shard's keys in
    plan order (read from its input slice when not given).

    Returns the number of records. Raises PlanError when keys are missing (nothing is marked).
    The marker holds the record count, how many are error records, the file's byte count and
    crc32 (the merge verifies them) and the sha256 of the input slice it was made from.
    """
    path = shard_path(stage_dir, shard)
    wanted = plan.keys(shard) if keys is None else keys
    where: dict[Key, tuple[int, int]] = {}
    errors: set[Key] = set()
    in_order, size, crc = True, 0, 0
    if path.exists():
        with open(path, "rb") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.endswith(b"\n"):
                    # A whole JSON object without its newline: the merge would glue the next
                    # shard's first record onto it. Never mark such a shard complete.
                    raise PlanError(f"{path}:{lineno}: last line has no newline (torn write)")
                rec, key = _parsed(f"{path}:{lineno}", line)
                if key in where:
                    in_order = False  # a repeat: the rewrite keeps the first
                else:
                    pos = len(where)
                    in_order = in_order and pos < len(wanted) and wanted[pos] == key
                    where[key] = (size, len(line))
                    if rec.get("error") is not None:
                        errors.add(key)
                size += len(line)
                crc = zlib.crc32(line, crc)
    missing = [k for k in wanted if k not in where]
    if missing:
        raise PlanError(
            f"{path}: shard {shard} is missing {len(missing)} records, e.g. {missing[0]}"
        )
    if not (in_order and len(where) == len(wanted)):
        size = crc = 0
        with open(path, "rb") as src, atomic_open(path, "wb") as out:
            fd = src.fileno()
            for k in wanted:
                offset, length = where[k]
                line = os.pread(fd, length, offset)
                out.write(line)
                size += len(line)
                crc = zlib.crc32(line, crc)
    # Error records (a prompt the engine refused, with its reason) are counted for the merge.
    write_marker(
        stage_dir,
        shard,
        {
            "records": len(wanted),
            "errors": len(errors.intersection(wanted)),
            "bytes": size,
            "crc32": crc,
            "slice": plan.digest(shard),
        },
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


def _sealed(stage_dir: Path, plan: Plan, shard: int) -> tuple[int, int, int]:
    """(records, bytes, crc32) that shard's marker recorded at finish time, after checking the
    marker was written for this plan's slice; PlanError otherwise."""
    marker = read_marker(stage_dir, shard)
    size, crc, n = marker.get("bytes"), marker.get("crc32"), marker.get("records")
    if marker.get("slice") != plan.digest(shard) or not (
        type(size) is int and type(crc) is int and type(n) is int
    ):
        raise PlanError(
            f"{marker_path(stage_dir, shard)}: this marker was not written for this plan's "
            f"shard {shard} (another version or another input); remove it and relaunch the "
            "same command to redo the shard"
        )
    return n, size, crc


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
    """Stream (line, record) of every shard in plan order, checking each key once and in order
    (against the shard's input slice) and each shard's bytes against its marker.

    Raises:
        PlanError: listing shards without a marker, or naming a key out of place.
    """
    _check_markers(stage_dir, plan)
    for shard in range(plan.shards):
        _, *sealed = _sealed(stage_dir, plan, shard)
        expected = iter(plan.keys(shard))
        path = shard_path(stage_dir, shard)
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
        if [size, crc] != sealed:
            raise _changed(path, shard, (size, crc), (sealed[0], sealed[1]))


def _check_markers(stage_dir: Path, plan: Plan) -> None:
    missing = incomplete(stage_dir, plan)
    if missing:
        names = ", ".join(shard_name(i) for i in missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise PlanError(
            f"{stage_dir}: cannot merge, {len(missing)} of {plan.shards} shards are not complete "
            f"({names}{more}); relaunch the same command to run only these"
        )


_BLOCK = 8 << 20


class _BlockWriter:
    """Writes blocks from a background thread and starts their write-back at once.

    ``write`` and ``posix_fadvise`` release the GIL, so the disk works while the caller reads
    and checks the next block. POSIX_FADV_DONTNEED submits the dirty pages without waiting for
    them, which leaves the final fsync little to do. At most ``depth`` blocks wait in the queue.
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
    """Copy the shards block by block, each checked against its marker; returns the count."""
    writer = _BlockWriter(out)
    try:
        total = sum(_merge_shard(stage_dir, plan, shard, writer) for shard in range(plan.shards))
    finally:
        error = writer.close()
    if error is not None:
        raise error
    return total


def _merge_shard(stage_dir: Path, plan: Plan, shard: int, writer: _BlockWriter) -> int:
    """One shard of the fast merge: its marker (written by ``finish_shard`` once it had checked
    every key once and in plan order) seals its byte count and crc32, so the bytes are copied
    and checksummed, never parsed. Any byte changed since is caught and the shard named."""
    path = shard_path(stage_dir, shard)
    records, *sealed = _sealed(stage_dir, plan, shard)
    want = plan.slices[shard][0] * plan.samples
    if records != want:
        raise PlanError(
            f"{marker_path(stage_dir, shard)}: marks {records} records, the plan has {want}"
        )
    size = crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            size += len(block)
            crc = zlib.crc32(block, crc)
            writer.write(memoryview(block))
    if [size, crc] != sealed:
        raise _changed(path, shard, (size, crc), (sealed[0], sealed[1]))
    return records


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


def write_progress(stage_dir: Path, shard: int, on_disk: int) -> None:
    """Record how many of a shard's records are on disk, for ``status`` (a rename, no fsync:
    a crash may leave an older count, never a torn one)."""
    path = StageLayout(stage_dir).progress(shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(str(on_disk))
    os.replace(tmp, path)


def read_progress(stage_dir: Path, shard: int) -> int:
    """The last count ``write_progress`` left (0 when none, or unreadable)."""
    try:
        return int(StageLayout(stage_dir).progress(shard).read_text())
    except (OSError, ValueError):
        return 0


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
