"""The library: a SQLite index of delta folders (the folders stay the source of truth).

Every write is one ``BEGIN IMMEDIATE`` transaction on its own connection, so several threads or
processes can add, tag and remove at once: SQLite serialises the writers (each waits up to
``timeout`` seconds for the lock) and a reader never sees half an entry. The schema's version
is the database's ``user_version``; a newer one is refused with the fix.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.slot import check_delta_name
from ..errors import DeltaStateError, LibraryError
from .query import Query
from .record import CHANGED, CORRUPT, MISSING, OK, DeltaRecord, FileStamp, folder_status, read_record

SCHEMA_VERSION = 1
#: where the library lives when no ``--db`` / ``db`` is given
LIBRARY_ENV = "DELTATUNE_LIBRARY"
DEFAULT_DB = Path("~/.deltatune/library.db")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deltas (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL,
    method TEXT NOT NULL,
    task TEXT,
    fingerprint TEXT NOT NULL,
    model_class TEXT,
    model_type TEXT,
    num_parameters INTEGER,
    note TEXT NOT NULL DEFAULT '',
    added TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    delta_id INTEGER NOT NULL REFERENCES deltas(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    label TEXT NOT NULL,
    PRIMARY KEY (delta_id, position)
);
CREATE TABLE IF NOT EXISTS tags (
    delta_id INTEGER NOT NULL REFERENCES deltas(id) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    PRIMARY KEY (delta_id, tag)
);
CREATE TABLE IF NOT EXISTS metrics (
    delta_id INTEGER NOT NULL REFERENCES deltas(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (delta_id, key)
);
CREATE TABLE IF NOT EXISTS files (
    delta_id INTEGER NOT NULL REFERENCES deltas(id) ON DELETE CASCADE,
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    PRIMARY KEY (delta_id, file)
);
CREATE TABLE IF NOT EXISTS centroids (
    delta_id INTEGER PRIMARY KEY REFERENCES deltas(id) ON DELETE CASCADE,
    dims INTEGER NOT NULL,
    examples INTEGER NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS deltas_fingerprint ON deltas(fingerprint);
"""


def default_db() -> Path:
    """``$DELTATUNE_LIBRARY``, else ``~/.deltatune/library.db``."""
    return Path(os.environ.get(LIBRARY_ENV) or DEFAULT_DB).expanduser()


class Library:
    """An index of delta folders in one SQLite file.

    Args:
        db: the database file (created with its folder on first use); default :func:`default_db`.
        timeout: seconds a writer waits for another writer's transaction to end.

    Example:
        >>> library = Library("deltas.db")
        >>> library.add("runs/sentiment", tags=["english"], note="IMDB-style reviews")
        >>> [r.name for r in library.search(Query(metrics=("accuracy>=0.8",)))]
    """

    def __init__(self, db: str | Path | None = None, *, timeout: float = 60.0) -> None:
        self.db = Path(db).expanduser() if db is not None else default_db()
        self.timeout = timeout
        if self.db.is_dir():
            raise LibraryError(f"library database {self.db} is a folder; pass a file path (e.g. {self.db / 'library.db'})")
        self.db.parent.mkdir(parents=True, exist_ok=True)
        with self._write() as connection:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LibraryError(f"library {self.db} has schema version {version}, newer than this deltatune's "
                                   f"{SCHEMA_VERSION}; upgrade deltatune to use it")
            if version < SCHEMA_VERSION:
                for statement in filter(str.strip, _SCHEMA.split(";")):  # executescript would commit first
                    connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # --- connections -------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            connection = sqlite3.connect(self.db, timeout=self.timeout, isolation_level=None)
            connection.execute("PRAGMA foreign_keys = ON")
            connection.execute("PRAGMA journal_mode = WAL")
        except sqlite3.DatabaseError as error:
            raise LibraryError(f"{self.db} is not a deltatune library ({error}); pass another --db or remove the file") \
                from None
        return connection

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it or nothing."""
        connection = self._connect()
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
        finally:
            connection.close()

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        connection = self._connect()
        try:
            connection.execute("BEGIN")  # one snapshot for the whole read
            yield connection
            connection.execute("COMMIT")
        finally:
            connection.close()

    # --- writing -----------------------------------------------------------------------------

    def add(self, folder: str | Path, *, name: str | None = None, tags: Sequence[str] = (), note: str = "",
            replace: bool = False) -> DeltaRecord:
        """Index the delta in ``folder`` under ``name`` (default: its saved name).

        Raises:
            DeltaFileError: the folder holds no sound delta (nothing is written).
            LibraryError: the name is taken (pass ``replace=True`` to record the folder anew).
        """
        record = read_record(folder, name)
        try:
            check_delta_name(record.name)
        except DeltaStateError as error:
            raise LibraryError(f"{error}; pass another name (--name)") from None
        record.tags = sorted({str(t).strip() for t in tags if str(t).strip()})
        record.note = note
        record.added = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with self._write() as connection:
            row = connection.execute("SELECT id, path FROM deltas WHERE name = ?", (record.name,)).fetchone()
            if row is not None and not replace:
                raise LibraryError(f"the library already has a delta named {record.name!r} (from {row[1]}); pass "
                                   f"another name (--name), or --replace to record this folder under it")
            if row is not None:
                connection.execute("DELETE FROM deltas WHERE id = ?", (row[0],))
            cursor = connection.execute(
                "INSERT INTO deltas (name, path, method, task, fingerprint, model_class, model_type, num_parameters, "
                "note, added) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.name, record.path, record.method, record.task, record.fingerprint, record.model_class,
                 record.model_type, record.num_parameters, record.note, record.added))
            delta_id = cursor.lastrowid
            connection.executemany("INSERT INTO labels VALUES (?, ?, ?)",
                                   [(delta_id, i, label) for i, label in enumerate(record.labels or [])])
            connection.executemany("INSERT INTO tags VALUES (?, ?)", [(delta_id, tag) for tag in record.tags])
            connection.executemany("INSERT INTO metrics VALUES (?, ?, ?)",
                                   [(delta_id, key, value) for key, value in record.metrics.items()])
            connection.executemany("INSERT INTO files VALUES (?, ?, ?, ?, ?)",
                                   [(delta_id, file, s.sha256, s.size, s.mtime_ns) for file, s in record.files.items()])
        return record

    def remove(self, name: str) -> None:
        """Take ``name`` out of the index (its folder is left as it is)."""
        with self._write() as connection:
            if connection.execute("DELETE FROM deltas WHERE name = ?", (name,)).rowcount == 0:
                raise LibraryError(self._unknown(connection, name))

    def set_centroid(self, name: str, vector: torch.Tensor, examples: int) -> None:
        """Store the mean embedding of the delta's training examples (float32, no pickle)."""
        vector = torch.as_tensor(vector).detach().to("cpu", torch.float32).flatten().contiguous()
        if vector.numel() == 0 or not torch.isfinite(vector).all():
            raise LibraryError(f"the centroid of {name!r} must be a non-empty vector of finite numbers")
        with self._write() as connection:
            delta_id = self._id(connection, name)
            connection.execute("INSERT OR REPLACE INTO centroids VALUES (?, ?, ?, ?)",
                               (delta_id, vector.numel(), int(examples), vector.numpy().tobytes()))

    # --- reading -----------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._read() as connection:
            return [row[0] for row in connection.execute("SELECT name FROM deltas ORDER BY name")]

    def __contains__(self, name: object) -> bool:
        with self._read() as connection:
            return connection.execute("SELECT 1 FROM deltas WHERE name = ?", (name,)).fetchone() is not None

    def __len__(self) -> int:
        with self._read() as connection:
            return connection.execute("SELECT COUNT(*) FROM deltas").fetchone()[0]

    def get(self, name: str, *, deep: bool = False) -> DeltaRecord:
        """The record of ``name``, its folder's status looked at now.

        Raises:
            LibraryError: no delta of that name (the message lists some that exist).
        """
        with self._read() as connection:
            delta_id = self._id(connection, name)
            record = self._records(connection, [delta_id])[0]
        record.status, record.problem = folder_status(record, deep)
        return record

    def list(self, *, deep: bool = False) -> list[DeltaRecord]:
        """Every record, by name, each with its folder's status (a deleted or corrupt folder says so)."""
        return self.search(Query(), deep=deep)

    def search(self, query: Query, *, deep: bool = False) -> list[DeltaRecord]:
        """The records that pass every filter of ``query``, by name."""
        where, params = query.sql()
        with self._read() as connection:
            ids = [row[0] for row in connection.execute(f"SELECT d.id FROM deltas d WHERE {where} ORDER BY d.name",
                                                        params)]
            records = self._records(connection, ids)
        for record in records:
            record.status, record.problem = folder_status(record, deep)
        return records

    def verify(self) -> list[DeltaRecord]:
        """Every record with its files hashed again: ``ok``, ``changed``, ``missing`` or ``corrupt``."""
        return self.list(deep=True)

    def centroids(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The stored centroids of ``names`` (those that have one)."""
        with self._read() as connection:
            rows = connection.execute(
                f"SELECT d.name, c.dims, c.vector FROM centroids c JOIN deltas d ON d.id = c.delta_id "
                f"WHERE d.name IN ({','.join('?' * len(names))})", tuple(names)).fetchall()
        out = {}
        for name, dims, blob in rows:
            if len(blob) != 4 * dims:
                raise LibraryError(f"the stored centroid of {name!r} holds {len(blob)} bytes, not {dims} float32 values; "
                                   f"compute it again (deltatune library centroid {name} ...)")
            out[name] = torch.frombuffer(bytearray(blob), dtype=torch.float32).clone()
        return out

    # --- helpers -----------------------------------------------------------------------------

    def _id(self, connection: sqlite3.Connection, name: str) -> int:
        row = connection.execute("SELECT id FROM deltas WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise LibraryError(self._unknown(connection, name))
        return row[0]

    def _unknown(self, connection: sqlite3.Connection, name: str) -> str:
        known = [row[0] for row in connection.execute("SELECT name FROM deltas ORDER BY name LIMIT 21")]
        shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        return f"no delta named {name!r} in library {self.db}; it has [{shown}] (add it with deltatune library add)"

    def _records(self, connection: sqlite3.Connection, ids: list[int]) -> list[DeltaRecord]:
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows = connection.execute(
            f"SELECT id, name, path, method, task, fingerprint, model_class, model_type, num_parameters, note, added "
            f"FROM deltas WHERE id IN ({marks})", ids).fetchall()
        extra: dict[str, dict[int, Any]] = {"labels": {}, "tags": {}, "metrics": {}, "files": {}, "dims": {}}
        for delta_id, _, label in connection.execute(f"SELECT * FROM labels WHERE delta_id IN ({marks}) "
                                                     f"ORDER BY delta_id, position", ids):
            extra["labels"].setdefault(delta_id, []).append(label)
        for delta_id, tag in connection.execute(f"SELECT * FROM tags WHERE delta_id IN ({marks}) ORDER BY tag", ids):
            extra["tags"].setdefault(delta_id, []).append(tag)
        for delta_id, key, value in connection.execute(f"SELECT * FROM metrics WHERE delta_id IN ({marks})", ids):
            extra["metrics"].setdefault(delta_id, {})[key] = value
        for delta_id, file, sha, size, mtime in connection.execute(f"SELECT * FROM files WHERE delta_id IN ({marks})",
                                                                   ids):
            extra["files"].setdefault(delta_id, {})[file] = FileStamp(sha, size, mtime)
        for delta_id, dims in connection.execute(f"SELECT delta_id, dims FROM centroids WHERE delta_id IN ({marks})",
                                                 ids):
            extra["dims"][delta_id] = dims
        records = {}
        for (delta_id, name, path, method, task, fingerprint, model_class, model_type, parameters, note, added) in rows:
            records[delta_id] = DeltaRecord(
                name=name, path=path, method=method, task=task, labels=extra["labels"].get(delta_id),
                fingerprint=fingerprint, model_class=model_class, model_type=model_type, num_parameters=parameters,
                metrics=extra["metrics"].get(delta_id, {}), files=extra["files"].get(delta_id, {}),
                tags=extra["tags"].get(delta_id, []), note=note, added=added, centroid_dims=extra["dims"].get(delta_id, 0))
        return [records[i] for i in ids]


__all__ = ["CHANGED", "CORRUPT", "DEFAULT_DB", "LIBRARY_ENV", "Library", "MISSING", "OK", "SCHEMA_VERSION", "default_db"]
