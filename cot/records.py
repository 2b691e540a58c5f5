"""JSONL records: validation with file:line errors, atomic writes and durable appends.

Everything that reads user input goes through :func:`read_questions`, so a bad file is rejected
before any job is submitted, with the file, the line and the field in the message.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from cot.answers import MAX_DIGITS, too_many_digits
from cot.errors import InputError


class RecordError(InputError):
    """Bad input data. ``str(err)`` reads ``FILE:LINE: field 'x': what is wrong``."""

    def __init__(self, path: str | Path, line: int | None, message: str, field: str | None = None):
        self.path, self.line, self.field = str(path), line, field
        where = f"{path}:{line}" if line is not None else f"{path}"
        what = f"field '{field}': {message}" if field else message
        super().__init__(f"{where}: {what}")


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every folder, deepest first."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


@functools.lru_cache(maxsize=1)
def _renameat2() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc without it
        return None


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the kernel, libc or file system cannot (then nothing was changed).
    """
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a new folder, named uniquely beside ``dest``; on success put it in ``dest``'s place.

    Everything in it is fsync'd first, then ``_place`` moves it in. Two writers never share a
    temp folder and may place theirs at the same moment: both succeed and ``dest`` is wholly
    one of them. On any error the temp folder is removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; give it a new folder's mode
        fsync_tree(tmp)
        _place(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_TAKEN = (errno.ENOTEMPTY, errno.EEXIST)  # rename(2) onto a folder that has content


def _place(tmp: Path, dest: Path, attempts: int = 100) -> None:
    """Put folder ``tmp`` at ``dest`` without a moment where a reader sees a mix.

    Never "check, then rename": another writer may land ``dest`` in between. Each step is tried
    and its failure read instead. A rename wins where ``dest`` is absent; where it is taken,
    ``exchange`` swaps it out in one step (the old content is then deleted from ``tmp``); a file
    system without it gets the old folder renamed aside just before ours is renamed in. A
    writer that loses a step to another tries again; after ``attempts`` it gives up.
    """
    for _ in range(attempts):
        try:
            os.replace(tmp, dest)  # dest absent (or an empty folder): done
            return
        except OSError as err:
            if err.errno not in _TAKEN:
                raise
        try:
            if exchange(tmp, dest):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old content
                return
        except FileNotFoundError:
            continue  # another writer moved dest aside in between: rename again
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        try:
            os.replace(dest, old)  # a folder may replace an empty one
        except FileNotFoundError:
            old.rmdir()
            continue
        try:
            os.replace(tmp, dest)
        except OSError as err:
            if err.errno not in _TAKEN:
                # Put the old one back; should another writer have landed meanwhile, the old
                # folder stays beside it (never deleted) and this error is the one raised.
                with contextlib.suppress(OSError):
                    os.replace(old, dest)
                raise
            # another writer's whole folder landed in the gap; ours goes on to replace it
        shutil.rmtree(old, ignore_errors=True)
        if not tmp.exists():
            return
    raise OSError(errno.EBUSY, f"{dest}: other writers kept replacing it; gave up", str(dest))


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on success fsync it and rename it over ``path``.

    On any error the temp file is removed and ``path`` is left exactly as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename)."""
    with atomic_open(path) as fh:
        fh.write(text)


def atomic_write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSON lines atomically; returns the count."""
    n = 0
    with atomic_open(path) as fh:
        for rec in records:
            fh.write(dumps(rec) + "\n")
            n += 1
    return n


def dumps(record: dict[str, Any]) -> str:
    """One canonical JSON line (no trailing newline)."""
    return json.dumps(record, ensure_ascii=False)


def append_durable(fh: IO[str], records: Iterable[dict[str, Any]]) -> int:
    """Append records to an open text file in one write, then flush and fsync."""
    lines = [dumps(r) + "\n" for r in records]
    if lines:
        fh.write("".join(lines))
        fh.flush()
        os.fsync(fh.fileno())
    return len(lines)


class DurableAppender:
    """Appends records to a file as they finish: each line flushed at once, fsync'd within
    ``interval_s`` by a background thread, and once more at close.

    A killed process loses nothing it wrote (the page cache has every flushed line); a crashed
    node loses at most the last ``interval_s`` seconds. Only the last line can ever be torn.
    """

    def __init__(self, path: str | Path, interval_s: float = 1.0):
        self.path = Path(path)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._lock = threading.Lock()
        self._dirty = False
        self._stop = threading.Event()
        self._syncer = threading.Thread(
            target=self._sync_loop, args=(interval_s,), daemon=True, name="fsync"
        )
        self._syncer.start()

    def _sync_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.sync()

    def sync(self) -> None:
        """fsync what was written since the last sync."""
        with self._lock:
            if self._dirty and not self._fh.closed:
                os.fsync(self._fh.fileno())
                self._dirty = False

    def write(self, records: Iterable[dict[str, Any]]) -> int:
        """Append records as whole lines in one write and flush; returns how many."""
        lines = [dumps(r) + "\n" for r in records]
        if lines:
            with self._lock:
                self._fh.write("".join(lines))
                self._fh.flush()
                self._dirty = True
        return len(lines)

    def close(self) -> None:
        """Stop the syncer, fsync and close (idempotent)."""
        self._stop.set()
        if self._syncer.is_alive() and self._syncer is not threading.current_thread():
            self._syncer.join()
        if not self._fh.closed:
            try:
                self.sync()
            finally:
                self._fh.close()

    def __enter__(self) -> DurableAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; RecordError on anything malformed."""
    path = Path(path)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below; bytes so bad UTF-8 has a line number
    except FileNotFoundError:
        raise RecordError(path, None, "file not found") from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            obj = parse_line(path, lineno, raw)
            if obj is not None:
                yield lineno, obj


def parse_line(path: str | Path, lineno: int, raw: bytes) -> dict[str, Any] | None:
    """One JSONL line as an object (None for a blank line); RecordError naming ``path:lineno``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(path, lineno, f"invalid UTF-8 at byte {e.start}") from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(path, lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise RecordError(path, lineno, "invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise RecordError(path, lineno, f"invalid JSON: {e}"[:200]) from None
    if not isinstance(obj, dict):
        raise RecordError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
    if b"\\ud" in raw or b"\\uD" in raw:  # a lone surrogate can only come from an escape
        for key, value in obj.items():
            name = str(key).encode("utf-8", "backslashreplace").decode()  # printable, always
            _check_encodable(path, lineno, name, key)
            _check_encodable(path, lineno, name, value)
    return obj


def _check_encodable(path: str | Path, lineno: int, field: str, value: Any) -> None:
    """Refuse a lone surrogate (``"\\ud800"`` is valid JSON, but no UTF-8 file can hold it)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                bad = v[e.start].encode("unicode_escape").decode()
                what = f"contains a lone surrogate ({bad})"
                raise RecordError(path, lineno, what, field) from None
        elif isinstance(v, dict):
            stack += [*v.keys(), *v.values()]
        elif isinstance(v, list):
            stack += v


def read_questions(
    path: str | Path,
    *,
    text_field: str = "question",
    start_index: int = 0,
    num_samples: int | None = None,
) -> list[dict[str, Any]]:
    """Read and validate a question file; every record gets a stable string ``id``.

    Records without an ``id`` get ``L<line>`` (stable as long as the file is; launches pin the
    file's sha256). Optional ``answer`` and ``category`` are checked for type when present.

    Raises:
        RecordError: empty file, bad JSON or UTF-8, a missing or non-string field, duplicate ids,
            or an empty selection.
    """
    records: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        rec = question(path, lineno, obj, text_field)
        rid = rec["id"]
        if rid in seen:
            raise RecordError(path, lineno, duplicate_id(rid, f"line {seen[rid]}"), "id")
        seen[rid] = lineno
        records.append(rec)
    if not records:
        raise RecordError(path, None, "file is empty: no records")
    end = None if num_samples is None else start_index + num_samples
    selected = records[start_index:end]
    if not selected:
        raise RecordError(path, None, none_selected(start_index, len(records)))
    return selected


def duplicate_id(rid: str, first: str) -> str:
    """The message for a repeated id; ``first`` says where it first was (``line 3``)."""
    return f"duplicate id {rid!r} (first on {first})"


def none_selected(start_index: int, n: int, what: str = "file") -> str:
    """The message for a selection that holds no record of the ``n`` in the file (or input)."""
    return f"--start-index {start_index} selects no records ({what} has {n})"


def question(path: str | Path, lineno: int, obj: dict[str, Any], text_field: str) -> dict[str, Any]:
    """Check one parsed question record and give it its string ``id`` (``L<line>`` if none)."""
    if text_field not in obj:
        raise RecordError(path, lineno, "missing", field=text_field)
    if not isinstance(obj[text_field], str) or not obj[text_field].strip():
        got = type(obj[text_field]).__name__
        raise RecordError(path, lineno, f"must be a non-empty string, got {got}", text_field)
    for name in ("answer", "category"):
        if name in obj and not isinstance(obj[name], (str, int, float)):
            raise RecordError(path, lineno, "must be a string or number", field=name)
    rid = obj.get("id", f"L{lineno}")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise RecordError(path, lineno, "must be a string or integer", field="id")
    rec = dict(obj)
    rec["id"] = str(rid)
    if "answer" in rec:
        rec["answer"] = str(rec["answer"])
        if too_many_digits(rec["answer"]):
            raise RecordError(
                path,
                lineno,
                f"has more than {MAX_DIGITS} digits; gold answers are compared as exact "
                "numbers, which Python reads only up to that size",
                "answer",
            )
    return rec
