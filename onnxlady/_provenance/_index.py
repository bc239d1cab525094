"""An index of model fingerprints: one SQLite file, built incrementally, searched in numpy.

Why SQLite (Python's own ``sqlite3``, no server):

- *one file* that can be copied, mailed or put next to the registry it describes;
- *incremental updates*: a rebuild touches only the rows of new or changed models, each row
  keyed by path, and an interrupted build keeps what it committed (results are committed in
  batches as workers finish);
- *transactional*: a crash or a full disk never leaves a half-written index; every batch is
  all or nothing;
- *concurrent readers*: any number of ``find`` processes can read while one build writes
  (write-ahead log), so a registry can be searched while it is being re-indexed.

Parquet would hold the vectors as compactly, but it cannot update one row in place, has no
transactions and would need a second file (or a rewrite) per incremental build. Search does
not happen in SQL: the search vectors of all models are packed into one float32 matrix (cached
in the index, rebuilt when a build changed anything) and ranked with numpy.

Layout (``PRAGMA user_version`` holds :data:`INDEX_FORMAT`; an index of a newer format is
refused rather than misread; ``PRAGMA application_id`` marks the file as an onnxlady index):

- ``models``: per model: path (absolute, or the URL it was read from), size, modification
  time (ns), sha256, its external data files (JSON: path, size, modification time), the
  fingerprint version, layer and parameter counts, the fingerprint
  (:meth:`~onnxlady._provenance._fingerprint.ModelFingerprint.to_bytes`: a JSON header and raw
  little-endian arrays, nothing pickled) and its search vector;
- ``errors``: files that could not be fingerprinted, with size, modification time and error;
  they are listed again by every build and read again once they change;
- ``search``: the packed search matrix, in parts, with the ``generation`` it was packed at;
- ``meta``: ``generation`` (bumped by every build that changed a row) and creation details.

Incremental rule per file: same size and modification time (and the same for each external
data file) as indexed, and a fingerprint of this :data:`FINGERPRINT_VERSION` -> skipped; same
size but another modification time -> its sha256 is compared and, when equal, only the time is
updated; anything else -> fingerprinted again. A file is first indexed without its sha256 (the
hash alone costs about as much as reading the model): the rule needs one only once a file's
time changes, so that file is then fingerprinted again with its hash, called "touched" when
its fingerprint is the one indexed, and compared by hash from then on.
Files under a scanned folder that disappeared are removed from the index.

Scale-out: ``engine="process"`` (the default) fans the files over a local process pool, of
which this process is one worker (:func:`_run_pool`);
``engine="dask"`` submits them to a Dask cluster (see :mod:`onnxlady._provenance._scale`), which
also reads ``fsspec`` URLs (``s3://``, ``gs://``, ``memory://``...).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxlady._errors import OnnxladyError
from onnxlady._io._files import file_sha256
from onnxlady._provenance._fingerprint import (
    FINGERPRINT_VERSION,
    SEARCH_WIDTH,
    ModelFingerprint,
    search_vector,
)
from onnxlady._provenance._read import (
    FileFingerprint,
    fingerprint_files,
    is_url,
    list_urls,
    sha256_url,
    stat_url,
)

__all__ = [
    "INDEX_FORMAT",
    "IndexBuildReport",
    "IndexProgress",
    "IndexedModel",
    "UnreadableFile",
    "add_fingerprints",
    "build_index",
    "list_models",
    "open_index",
    "unfingerprinted_models",
]

#: Format of the index file; a file of a newer format is refused.
INDEX_FORMAT = 1
#: ``PRAGMA application_id`` of an onnxlady index ("ONXL").
APPLICATION_ID = 0x4F4E584C
#: Results are committed in batches of at most this many files or this many seconds.
_BATCH_FILES = 64
_BATCH_SECONDS = 2.0
#: Rows per packed part of the search matrix (a SQLite blob holds at most 1 GB).
_SEARCH_PART_ROWS = 200_000
_MODEL_SUFFIX = ".onnx"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    data_files TEXT NOT NULL,
    version INTEGER NOT NULL,
    layers INTEGER NOT NULL,
    parameters INTEGER NOT NULL,
    fingerprint BLOB NOT NULL,
    vector BLOB NOT NULL,
    indexed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS errors (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    error TEXT NOT NULL,
    seen_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS search (
    part INTEGER PRIMARY KEY,
    generation INTEGER NOT NULL,
    ids BLOB NOT NULL,
    vectors BLOB NOT NULL
);
"""


# -- results ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnreadableFile:
    """A file that could not be fingerprinted, and why (one line)."""

    path: str
    error: str


@dataclass(frozen=True)
class IndexProgress:
    """One step of a build, for a progress bar.

    Attributes:
        done: files settled so far (fingerprinted, skipped or failed).
        total: files found by the scan.
        path: the file just settled.
        action: ``"indexed"``, ``"unchanged"``, ``"touched"`` (same content, new time) or
            ``"error"``.
    """

    done: int
    total: int
    path: str
    action: str


@dataclass
class IndexBuildReport:
    """What a build did.

    Attributes:
        index: the index file.
        engine: ``"process"`` or ``"dask"``.
        workers: processes (or Dask workers) used.
        scanned: model files found under the given paths.
        indexed: files fingerprinted (new or changed).
        unchanged: files skipped (same size and modification time).
        touched: files whose time changed but whose content did not: same sha256 (not
            fingerprinted again), or, for a file indexed without one, the same fingerprint.
        removed: indexed files under a scanned folder that no longer exist.
        errors: files that could not be fingerprinted (this build's and still-unchanged
            earlier ones).
        models: models in the index after the build.
        seconds: wall time of the build.
        unfingerprinted: models in the index with no fingerprinted layer (no operator the
            fingerprint reads): kept, but ``find`` can call them neither derived nor unrelated.
    """

    index: str
    engine: str
    workers: int
    scanned: int = 0
    indexed: list[str] = field(default_factory=list)
    unchanged: int = 0
    touched: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    errors: list[UnreadableFile] = field(default_factory=list)
    models: int = 0
    seconds: float = 0.0
    unfingerprinted: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (``unfingerprinted`` only when there are some)."""
        document: dict[str, Any] = {
            "index": self.index,
            "engine": self.engine,
            "workers": self.workers,
            "scanned": self.scanned,
            "indexed": list(self.indexed),
            "unchanged": self.unchanged,
            "touched": list(self.touched),
            "removed": list(self.removed),
            "errors": [asdict(item) for item in self.errors],
            "models": self.models,
            "seconds": round(self.seconds, 3),
        }
        if self.unfingerprinted:
            document["unfingerprinted"] = list(self.unfingerprinted)
        return document


@dataclass(frozen=True)
class IndexedModel:
    """One row of the index (without its fingerprint)."""

    id: int
    path: str
    size: int
    mtime_ns: int
    sha256: str
    layers: int
    parameters: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- the index file ---------------------------------------------------------------------------
def _check_format(connection: sqlite3.Connection, path: Path, *, creating: bool) -> None:
    application = connection.execute("PRAGMA application_id").fetchone()[0]
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    tables = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if application == 0 and version == 0 and tables == 0:
        if not creating:
            raise OnnxladyError(f"{path}: not an onnxlady index (empty database)")
        return
    if application != APPLICATION_ID:
        raise OnnxladyError(f"{path}: not an onnxlady index (another SQLite database)")
    if version > INDEX_FORMAT:
        raise OnnxladyError(
            f"{path}: index format {version} is newer than this onnxlady reads ({INDEX_FORMAT}): upgrade onnxlady"
        )


@contextmanager
def open_index(path: str | os.PathLike[str], *, create: bool = False) -> Generator[sqlite3.Connection, None, None]:
    """Open an index file (creating it when ``create``), checking its format.

    Args:
        path: the index file.
        create: create the file and its tables when missing (a build does; a search does not).

    Yields:
        The connection (closed on exit).

    Raises:
        OnnxladyError: the file is missing (and not ``create``), not an onnxlady index, of a
            newer format, or unreadable.
    """
    path = Path(path)
    if not create and not path.is_file():
        raise OnnxladyError(f"{path}: no such index")
    if create and path.is_dir():
        raise OnnxladyError(f"{path}: is a folder, not an index file")
    try:
        connection = sqlite3.connect(str(path), timeout=30.0)
    except sqlite3.Error as exc:
        raise OnnxladyError(f"{path}: cannot open index ({exc})") from exc
    try:
        try:
            _check_format(connection, path, creating=create)
            if create:
                connection.execute("PRAGMA journal_mode=WAL")
                # In WAL mode a commit stays atomic and consistent without its own fsync (only
                # a power cut can lose the last batches, never corrupt the file); a build
                # commits every few seconds and would otherwise wait on the disk each time.
                connection.execute("PRAGMA synchronous=NORMAL")
                with connection:
                    connection.executescript(_SCHEMA)
                    connection.execute(f"PRAGMA application_id={APPLICATION_ID}")
                    if connection.execute("PRAGMA user_version").fetchone()[0] == 0:
                        connection.execute(f"PRAGMA user_version={INDEX_FORMAT}")
                        connection.execute(
                            "INSERT OR IGNORE INTO meta VALUES ('generation', '0'), ('created_at', ?)", (str(time.time()),)
                        )
        except sqlite3.DatabaseError as exc:
            raise OnnxladyError(f"{path}: not an onnxlady index ({exc})") from exc
        yield connection
    finally:
        connection.close()


def _generation(connection: sqlite3.Connection) -> int:
    row = connection.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
    return int(row[0]) if row else 0


def list_models(index_path: str | os.PathLike[str]) -> list[IndexedModel]:
    """Every model in an index, by id.

    Raises:
        OnnxladyError: see :func:`open_index`.
    """
    with open_index(index_path) as connection:
        rows = connection.execute(
            "SELECT id, path, size, mtime_ns, sha256, layers, parameters FROM models ORDER BY id"
        ).fetchall()
    return [IndexedModel(*row) for row in rows]


def unfingerprinted_models(connection: sqlite3.Connection) -> list[str]:
    """The paths of the indexed models with no fingerprinted layer, sorted."""
    return [row[0] for row in connection.execute("SELECT path FROM models WHERE layers = 0 ORDER BY path")]


# -- scanning ---------------------------------------------------------------------------------
def _scan(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[str], list[str], list[UnreadableFile]]:
    """(model files, scanned folders, errors) for the given paths.

    ``*.onnx`` under each folder, recursively, sorted; files named directly are taken whatever
    their suffix; URLs are listed by fsspec.
    """
    files: list[str] = []
    folders: list[str] = []
    errors: list[UnreadableFile] = []
    for item in paths:
        text = os.fspath(item)
        if is_url(text):
            try:
                found, folder = list_urls(text)
            except OnnxladyError as exc:
                errors.append(UnreadableFile(text, str(exc)))
                continue
            files.extend(found)
            if folder:
                folders.append(folder)
            continue
        path = Path(text).resolve()
        if path.is_dir():
            folders.append(str(path))
            files.extend(
                str(found) for found in sorted(path.rglob("*")) if found.suffix.lower() == _MODEL_SUFFIX and found.is_file()
            )
        elif path.is_file():
            files.append(str(path))
        else:
            errors.append(UnreadableFile(str(path), f"{path}: no such file or folder"))
    return list(dict.fromkeys(files)), folders, errors


def _data_files_unchanged(recorded: str) -> bool:
    return all(_stat(path) == (size, mtime_ns) for path, size, mtime_ns in json.loads(recorded))


def _stat(path: str) -> tuple[int, int] | None:
    if is_url(path):
        return stat_url(path)
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _sha256(path: str) -> str | None:
    if is_url(path):
        return sha256_url(path)
    try:
        return file_sha256(path)
    except OSError:
        return None


# -- building ---------------------------------------------------------------------------------
def build_index(
    paths: Sequence[str | os.PathLike[str]],
    index_path: str | os.PathLike[str],
    *,
    workers: int | None = None,
    engine: str = "process",
    progress: Callable[[IndexProgress], None] | None = None,
    scheduler: Any = None,
) -> IndexBuildReport:
    """Fingerprint the models under ``paths`` into the index at ``index_path``, incrementally.

    Folders are searched recursively for ``*.onnx``; files are taken as named. Only new or
    changed files are fingerprinted (see the module docstring); a file that cannot be read is
    listed in the report's ``errors`` and the build goes on.

    Args:
        paths: files, folders or (``engine="dask"``) fsspec URLs.
        index_path: the index file, created when missing.
        workers: processes fingerprinting, this one included (default: the machine's CPU
            count; 1 runs in this process alone, N starts a pool of N - 1); for Dask, the workers of the LocalCluster started when no
            ``scheduler`` is given.
        engine: ``"process"`` (local process pool) or ``"dask"`` (see
            :mod:`onnxlady._provenance._scale`).
        progress: called once per file settled.
        scheduler: for ``engine="dask"``: a ``distributed.Client``, or a scheduler address
            (``"tcp://host:8786"``); None starts a LocalCluster for the build.

    Returns:
        What the build did.

    Raises:
        OnnxladyError: the index is not an onnxlady index or is of a newer format, an
            unknown engine, or Dask asked for but not installed.
    """
    if engine not in ("process", "dask"):
        raise OnnxladyError(f"unknown engine {engine!r}: choose 'process' or 'dask'")
    if workers is not None and workers < 1:
        raise OnnxladyError(f"workers must be at least 1, not {workers}")
    start = time.perf_counter()
    count = workers if workers is not None else (os.cpu_count() or 1)
    report = IndexBuildReport(str(index_path), engine, count)
    files, folders, scan_errors = _scan(paths)
    report.scanned = len(files)
    report.errors.extend(scan_errors)
    with open_index(index_path, create=True) as connection:
        todo = _plan(connection, files, folders, report)
        total = len(files)
        done = total - len(todo)
        changed = bool(report.removed or report.touched)
        pending: list[FileFingerprint] = []
        last_commit = time.monotonic()
        for task, result in _run(todo, engine, count, scheduler):
            done += 1
            pending.append(result)
            if result.error:
                action = "error"
                report.errors.append(UnreadableFile(result.path, result.error))
            elif task.same_as is not None and result.fingerprint == task.same_as:
                action = "touched"  # stored again: its new time and its sha256
                report.touched.append(result.path)
            else:
                action = "indexed"
                report.indexed.append(result.path)
            if progress is not None:
                progress(IndexProgress(done, total, result.path, action))
            if len(pending) >= _BATCH_FILES or time.monotonic() - last_commit > _BATCH_SECONDS:
                _store(connection, pending)
                changed, pending, last_commit = True, [], time.monotonic()
        if pending:
            _store(connection, pending)
            changed = True
        if changed:
            with connection:
                connection.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
            _pack_search(connection)
        report.models = connection.execute("SELECT count(*) FROM models").fetchone()[0]
        report.unfingerprinted = unfingerprinted_models(connection)
    report.errors.sort(key=lambda item: item.path)
    report.seconds = time.perf_counter() - start
    return report


@dataclass(frozen=True)
class _Task:
    """One file to fingerprint.

    Attributes:
        path: the file or URL.
        size: its size at planning (0 when unknown), for batching.
        digest: compute its sha256 (a file whose time changed keeps one for the next time).
        same_as: the fingerprint indexed for it when it was touched but indexed without a
            sha256: equal fingerprints make it "touched", not "indexed".
    """

    path: str
    size: int = 0
    digest: bool = False
    same_as: bytes | None = None


def _plan(
    connection: sqlite3.Connection, files: list[str], folders: list[str], report: IndexBuildReport
) -> list[_Task]:
    """The files to fingerprint.

    Skipped, touched, removed and still-failing files are settled in ``report`` (and the index)
    here.
    """
    known = {
        row[0]: row[1:]
        for row in connection.execute("SELECT path, size, mtime_ns, sha256, data_files, version FROM models")
    }
    failed = {row[0]: row[1:] for row in connection.execute("SELECT path, size, mtime_ns, error FROM errors")}
    todo: list[_Task] = []
    touched: list[tuple[int, str]] = []
    for path in files:
        stat = _stat(path)
        if stat is None:
            todo.append(_Task(path))  # the worker reports why it cannot be read
            continue
        size, mtime_ns = stat
        if path in failed and failed[path][:2] == (size, mtime_ns):
            report.errors.append(UnreadableFile(path, failed[path][2]))
            continue
        row = known.get(path)
        if row is None or row[0] != size or row[4] != FINGERPRINT_VERSION or not _data_files_unchanged(row[3]):
            todo.append(_Task(path, size))  # new, changed, or fingerprinted by another version of the fields
        elif row[1] == mtime_ns:
            report.unchanged += 1
        elif not row[2]:  # indexed without a sha256: its fingerprint tells (and it gets one now)
            stored = connection.execute("SELECT fingerprint FROM models WHERE path = ?", (path,)).fetchone()[0]
            todo.append(_Task(path, size, digest=True, same_as=stored))
        elif _sha256(path) == row[2]:
            touched.append((mtime_ns, path))
            report.touched.append(path)
        else:
            todo.append(_Task(path, size, digest=True))
    present = set(files)
    gone = [
        path
        for path in known
        if path not in present and any(path == folder or path.startswith(folder.rstrip("/") + "/") for folder in folders)
    ]
    report.removed.extend(sorted(gone))
    with connection:
        connection.executemany("UPDATE models SET mtime_ns = ? WHERE path = ?", touched)
        connection.executemany("DELETE FROM models WHERE path = ?", [(path,) for path in gone])
        connection.executemany(
            "DELETE FROM errors WHERE path = ?",
            [(path,) for path in failed if path not in present and any(path.startswith(f.rstrip("/") + "/") for f in folders)],
        )
    return todo


#: A worker's task holds at most this many files and this many bytes of them (a file larger
#: than that goes alone): small files are fingerprinted together (see
#: :func:`~onnxlady._provenance._read.fingerprint_files`: the more files a task holds, the
#: fewer numpy calls each costs), and a pool still gets several tasks per worker to balance.
_TASK_FILES = 256
_TASK_BYTES = 16 << 20
#: Tasks per worker a pool aims at (when there are files enough); a build without a pool
#: (one worker) has nothing to balance and makes its tasks as large as the limits allow.
_TASKS_PER_WORKER = 4


def _batches(todo: list[_Task], workers: int) -> list[list[_Task]]:
    """``todo`` in tasks for ``workers`` workers: consecutive files up to :data:`_TASK_FILES` / :data:`_TASK_BYTES`."""
    wanted = 1 if workers == 1 else workers * _TASKS_PER_WORKER
    per_task = max(1, min(_TASK_FILES, -(-len(todo) // wanted)))
    batches: list[list[_Task]] = []
    current: list[_Task] = []
    size = 0
    for task in todo:
        if current and (len(current) >= per_task or size + task.size > _TASK_BYTES):
            batches.append(current)
            current, size = [], 0
        current.append(task)
        size += task.size
    if current:
        batches.append(current)
    return batches


#: What fingerprinting a file costs besides its bytes, in bytes of arithmetic (reading, parsing
#: and walking its graph: about 0.7 ms, the time of a quarter megabyte of weights).
_FILE_COST_BYTES = 1 << 18


def _task_cost(batch: list[_Task]) -> int:
    """A task's expected work, in bytes: its files' sizes plus a fixed cost per file."""
    return sum(task.size for task in batch) + _FILE_COST_BYTES * len(batch)


def _fingerprint_batch(paths: list[str], digests: list[bool]) -> list[FileFingerprint]:
    """A worker's task (module-level: a process pool pickles it by name)."""
    return fingerprint_files(paths, digest=digests)


def _run(todo: list[_Task], engine: str, workers: int, scheduler: Any) -> Iterator[tuple[_Task, FileFingerprint]]:
    """Fingerprint ``todo`` in batches, yielding (task, result) as batches complete."""
    if not todo:
        return
    batches = _batches(todo, workers)
    if engine == "dask":
        from onnxlady._provenance._scale import fingerprint_with_dask

        results = fingerprint_with_dask(
            [[task.path for task in batch] for batch in batches],
            [[task.digest for task in batch] for batch in batches],
            workers=workers,
            scheduler=scheduler,
        )
        for number, found in results:
            yield from zip(batches[number], found)
        return
    if workers == 1 or len(batches) == 1:  # no pool to start: this process does the work
        for batch in batches:
            yield from zip(batch, _fingerprint_here(batch))
        return
    yield from _run_pool(batches, min(workers, len(batches)))


#: Tasks queued per pool process beyond the one it works on: enough that it never waits for
#: this process (busy with a task of its own) to hand it the next, and no more: a task handed to
#: the pool cannot be taken back once its process has it, and at the end of a build this
#: process would wait for every task queued there instead of sharing them.
_QUEUED_PER_WORKER = 1


def _run_pool(batches: list[list[_Task]], workers: int) -> Iterator[tuple[_Task, FileFingerprint]]:
    """``batches`` over ``workers`` processes: this one and ``workers - 1`` pool processes.

    This process works too instead of waiting on a pool of ``workers``: it would otherwise sit
    idle while the pool worked (its own share of a build is the index writes, a few per cent),
    and every pool process costs a fork and a cold start. Tasks are handed out longest first: to
    the pool while it holds fewer than :data:`_QUEUED_PER_WORKER` beyond the one each of its
    processes works on, else to this process; once none is left to hand out, this process takes
    back those the pool has not started, so that neither waits long for the other at the end.
    """
    # Longest tasks first: the last minutes are then small tasks that even out across workers,
    # not one large model left to a single worker while the others idle.
    waiting = sorted(batches, key=_task_cost, reverse=True)
    waiting.reverse()  # popped from the end: longest first
    queued = (workers - 1) * (1 + _QUEUED_PER_WORKER)
    with ProcessPoolExecutor(max_workers=workers - 1) as pool:
        futures: dict[Future[list[FileFingerprint]], list[_Task]] = {}
        while waiting or futures:
            while waiting and len(futures) < queued:
                batch = waiting.pop()
                futures[pool.submit(_fingerprint_batch, *_arguments(batch))] = batch
            for future in [future for future in futures if future.done()]:
                yield from zip(futures.pop(future), future.result())
            if waiting and len(futures) >= queued:  # the pool has work enough: this process takes the next
                batch = waiting.pop()
                yield from zip(batch, _fingerprint_here(batch))
            elif futures and not waiting:
                # The last tasks: take back one the pool has not started (the latest, the
                # smallest), else wait for the pool.
                unstarted = next((f for f in reversed(list(futures)) if f.cancel()), None)
                if unstarted is not None:
                    batch = futures.pop(unstarted)
                    yield from zip(batch, _fingerprint_here(batch))
                    continue
                future = next(as_completed(futures))
                yield from zip(futures.pop(future), future.result())


def _arguments(batch: list[_Task]) -> tuple[list[str], list[bool]]:
    """The arguments of :func:`_fingerprint_batch` for a task."""
    return [task.path for task in batch], [task.digest for task in batch]


def _fingerprint_here(batch: list[_Task]) -> list[FileFingerprint]:
    """A task fingerprinted in this process."""
    return _fingerprint_batch(*_arguments(batch))


def _store(connection: sqlite3.Connection, results: list[FileFingerprint]) -> None:
    """Write one batch of results in one transaction."""
    now = time.time()
    good = [r for r in results if not r.error]
    bad = [r for r in results if r.error]
    with connection:
        connection.executemany(
            """INSERT INTO models (path, size, mtime_ns, sha256, data_files, version, layers, parameters,
                                   fingerprint, vector, indexed_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns,
                   sha256 = excluded.sha256, data_files = excluded.data_files, version = excluded.version,
                   layers = excluded.layers, parameters = excluded.parameters,
                   fingerprint = excluded.fingerprint, vector = excluded.vector, indexed_at = excluded.indexed_at""",
            [
                (r.path, r.size, r.mtime_ns, r.sha256, json.dumps(r.data_files), FINGERPRINT_VERSION, r.layers,
                 r.parameters, r.fingerprint, r.vector, now)
                for r in good
            ],
        )  # fmt: skip
        connection.executemany("DELETE FROM errors WHERE path = ?", [(r.path,) for r in good])
        connection.executemany(
            "INSERT OR REPLACE INTO errors (path, size, mtime_ns, error, seen_at) VALUES (?, ?, ?, ?, ?)",
            [(r.path, r.size, r.mtime_ns, r.error, now) for r in bad],
        )
        # A file that now fails is no longer the model the index held for it.
        connection.executemany("DELETE FROM models WHERE path = ?", [(r.path,) for r in bad])


def add_fingerprints(
    index_path: str | os.PathLike[str], entries: Iterable[tuple[str, ModelFingerprint]]
) -> int:
    """Store fingerprints computed elsewhere under the given names.

    There is no file behind them: size, time and sha256 are left empty, so a build never skips or
    removes them by file identity.

    Args:
        index_path: the index, created when missing.
        entries: (name, fingerprint) pairs; a name already indexed is replaced.

    Returns:
        How many fingerprints were stored.

    Raises:
        OnnxladyError: see :func:`open_index`.
    """
    stored = 0
    with open_index(index_path, create=True) as connection:
        batch: list[FileFingerprint] = []
        for name, fingerprint in entries:
            batch.append(
                FileFingerprint(
                    name, 0, 0, "", (), fingerprint.to_bytes(), search_vector(fingerprint).tobytes(),
                    fingerprint.layers, fingerprint.parameters,
                )
            )  # fmt: skip
            if len(batch) >= 10_000:
                _store(connection, batch)
                stored, batch = stored + len(batch), []
        if batch:
            _store(connection, batch)
            stored += len(batch)
        with connection:
            connection.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
        _pack_search(connection)
    return stored


# -- the search matrix ------------------------------------------------------------------------
def _pack_search(connection: sqlite3.Connection) -> None:
    """Pack every model's search vector into the ``search`` table (one read for ``find``)."""
    generation = _generation(connection)
    ids: list[int] = []
    vectors: list[bytes] = []
    with connection:
        connection.execute("DELETE FROM search")
        part = 0
        for model_id, vector in connection.execute("SELECT id, vector FROM models ORDER BY id"):
            ids.append(model_id)
            vectors.append(vector)
            if len(ids) == _SEARCH_PART_ROWS:
                _write_part(connection, part, generation, ids, vectors)
                part, ids, vectors = part + 1, [], []
        if ids or part == 0:
            _write_part(connection, part, generation, ids, vectors)


def _write_part(connection: sqlite3.Connection, part: int, generation: int, ids: list[int], vectors: list[bytes]) -> None:
    connection.execute(
        "INSERT INTO search (part, generation, ids, vectors) VALUES (?, ?, ?, ?)",
        (part, generation, np.asarray(ids, dtype=np.int64).tobytes(), b"".join(vectors)),
    )


def search_matrix(connection: sqlite3.Connection) -> tuple[np.ndarray, np.ndarray]:
    """(model ids, float32 matrix of their search vectors).

    From the packed cache when it is current, else from the rows themselves.
    """
    generation = _generation(connection)
    parts = connection.execute("SELECT part, generation, ids FROM search ORDER BY part").fetchall()
    if parts and all(part[1] == generation for part in parts):
        ids = np.concatenate([np.frombuffer(part[2], dtype=np.int64) for part in parts])
        vectors = [_search_vectors(connection, part[0]) for part in parts]
        # One part (up to _SEARCH_PART_ROWS models) is read as it is, not copied once more.
        matrix = np.frombuffer(vectors[0] if len(vectors) == 1 else b"".join(vectors), dtype=np.float32)
    else:
        rows = connection.execute("SELECT id, vector FROM models ORDER BY id").fetchall()
        ids = np.array([row[0] for row in rows], dtype=np.int64)
        matrix = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32)
    return ids, matrix.reshape(-1, SEARCH_WIDTH)


def _search_vectors(connection: sqlite3.Connection, part: int) -> bytes:
    """The packed search vectors of one part of the ``search`` table.

    Read through SQLite's blob handle where Python has one (3.11): a 100,000-model index packs
    68 MB of vectors per part, which a query result takes about twice as long to hand out.
    """
    blobopen = getattr(connection, "blobopen", None)
    if blobopen is None:
        return bytes(connection.execute("SELECT vectors FROM search WHERE part = ?", (part,)).fetchone()[0])
    with blobopen("search", "vectors", part, readonly=True) as blob:
        return bytes(blob.read())


def read_fingerprints(connection: sqlite3.Connection, ids: Iterable[int]) -> dict[int, tuple[str, ModelFingerprint]]:
    """(path, fingerprint) of each model id in ``ids``."""
    found: dict[int, tuple[str, ModelFingerprint]] = {}
    wanted = [int(i) for i in ids]
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for model_id, path, blob in connection.execute(
            f"SELECT id, path, fingerprint FROM models WHERE id IN ({marks})", chunk
        ):
            fingerprint = ModelFingerprint.from_bytes(blob)
            if fingerprint.version < FINGERPRINT_VERSION:
                # Its layers may be read in another order or form than a suspect's today: a
                # comparison would be wrong, not merely less precise.
                raise OnnxladyError(
                    f"the index holds fingerprints of version {fingerprint.version}, older than this "
                    f"onnxlady's {FINGERPRINT_VERSION} ({path}): run `onnxlady index build` with its paths and `-o` "
                    "this index again to update it"
                )
            found[model_id] = (path, fingerprint)
    return found
