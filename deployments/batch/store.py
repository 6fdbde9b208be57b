"""Where the Batch API's files and batches live: SQLite for records, ``pyarrow.fs`` for contents.

Every state change is one SQLite transaction, and a line's result is a row keyed by (batch, line),
written once: a runner that restarts reads which lines are done and runs only the others, so each
``custom_id`` reaches the output or error file exactly once. File contents are written whole before
their record exists, so a listed file always has its bytes. The methods block (SQLite, file I/O):
the runner calls them off its event loop.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyarrow import fs

from deployments.errors import NotFound
from deployments.protocol.batches import BatchStatus, new_id

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL, completion_window TEXT NOT NULL,
    status TEXT NOT NULL, metadata TEXT, errors TEXT, output_file_id TEXT, error_file_id TEXT,
    total INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER, expired_at INTEGER,
    cancelling_at INTEGER, cancelled_at INTEGER);
CREATE TABLE IF NOT EXISTS results (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT NOT NULL, ok INTEGER NOT NULL,
    output BLOB NOT NULL, PRIMARY KEY (batch_id, line)) WITHOUT ROWID;
"""
# When each status was entered (OpenAI's ``*_at`` fields).
_ENTERED_AT = {
    BatchStatus.IN_PROGRESS: "in_progress_at",
    BatchStatus.FINALIZING: "finalizing_at",
    BatchStatus.COMPLETED: "completed_at",
    BatchStatus.FAILED: "failed_at",
    BatchStatus.EXPIRED: "expired_at",
    BatchStatus.CANCELLING: "cancelling_at",
    BatchStatus.CANCELLED: "cancelled_at",
}
_BATCH_FIELDS = ("output_file_id", "error_file_id", "total", "errors")


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a list call: OpenAI's ``{"object": "list", "data", "first_id", "last_id", "has_more"}``."""

    data: list[dict[str, Any]]
    has_more: bool

    def body(self) -> dict[str, Any]:
        ids = [item["id"] for item in self.data]
        return {
            "object": "list",
            "data": self.data,
            "first_id": ids[0] if ids else None,
            "last_id": ids[-1] if ids else None,
            "has_more": self.has_more,
        }


class Store:
    def __init__(self, database: Path, files_uri: str) -> None:
        database.parent.mkdir(parents=True, exist_ok=True)
        # One connection, used under a lock: the runner's calls come from its thread pool.
        self._db = sqlite3.connect(database, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash of the process loses nothing committed
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._fs, self._root = fs.FileSystem.from_uri(files_uri)
        self._fs.create_dir(self._root, recursive=True)

    # -- files ---------------------------------------------------------------------------

    def add_file(self, filename: str, purpose: str, chunks: Iterable[bytes], file_id: str | None = None) -> dict:
        """Write a file's contents, then its record (``file_id``: replace that file, as a rerun
        finalization does)."""
        file_id = file_id or new_id("file-")
        size = 0
        with self._fs.open_output_stream(self._path(file_id)) as out:
            for chunk in chunks:
                out.write(chunk)
                size += len(chunk)
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", (file_id, filename, purpose, size, _now())
            )
        return self.file(file_id)

    def file(self, file_id: str) -> dict[str, Any]:
        with self._lock:
            row = self._db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            raise NotFound(f"no file with id {file_id!r}", code="file_not_found")
        return _file_object(row)

    def files(self, purpose: str | None, after: str | None, limit: int, order: str) -> Page:
        where, args = [], []
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        if after is not None:
            where.append(f"rowid {'<' if order == 'desc' else '>'} (SELECT rowid FROM files WHERE id = ?)")
            args.append(after)
        sql = "SELECT * FROM files" + (" WHERE " + " AND ".join(where) if where else "")
        sql += f" ORDER BY rowid {'DESC' if order == 'desc' else 'ASC'} LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, limit + 1)).fetchall()
        return Page([_file_object(row) for row in rows[:limit]], len(rows) > limit)

    def read_chunks(self, file_id: str, chunk_bytes: int = 2**20) -> Iterator[bytes]:
        """The file's contents, a chunk at a time (NotFound at once, not at the first chunk)."""
        self.file(file_id)
        return self._chunks(self._path(file_id), chunk_bytes)

    def _chunks(self, path: str, chunk_bytes: int) -> Iterator[bytes]:
        with self._fs.open_input_stream(path) as stream:
            while chunk := stream.read(chunk_bytes):
                yield chunk

    def read_lines(self, file_id: str) -> Iterator[bytes]:
        """The file's lines, read as a stream (an input file may be large)."""
        rest = b""
        for chunk in self.read_chunks(file_id):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            yield from lines
        if rest:
            yield rest

    def delete_file(self, file_id: str) -> dict[str, Any]:
        self.file(file_id)
        with self._lock:
            self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        self._fs.delete_file(self._path(file_id))
        return {"id": file_id, "object": "file", "deleted": True}

    def _path(self, file_id: str) -> str:
        return f"{self._root}/{file_id}"

    # -- batches -------------------------------------------------------------------------

    def add_batch(self, endpoint: str, input_file_id: str, window: str, window_s: float, metadata: dict | None) -> dict:
        batch_id, now = new_id("batch_"), _now()
        with self._lock:
            self._db.execute(
                "INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, metadata, created_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (batch_id, endpoint, input_file_id, window, BatchStatus.VALIDATING, _dumps(metadata), now,
                 now + int(window_s)),
            )  # fmt: skip
        return self.batch(batch_id)

    def batch(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            row = self._db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None:
                raise NotFound(f"no batch with id {batch_id!r}", code="batch_not_found")
            counts = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(ok), 0) FROM results WHERE batch_id = ?", (batch_id,)
            ).fetchone()
        return _batch_object(row, done=counts[0], completed=counts[1])

    def batches(self, after: str | None, limit: int) -> Page:
        sql, args = "SELECT id FROM batches", []
        if after is not None:
            sql += " WHERE rowid < (SELECT rowid FROM batches WHERE id = ?)"
            args.append(after)
        with self._lock:
            ids = [row[0] for row in self._db.execute(sql + " ORDER BY rowid DESC LIMIT ?", (*args, limit + 1))]
        return Page([self.batch(batch_id) for batch_id in ids[:limit]], len(ids) > limit)

    def unfinished_batches(self) -> list[dict[str, Any]]:
        """Batches a runner must carry on with, oldest first."""
        finished = tuple(status.value for status in BatchStatus if status.finished)
        with self._lock:
            ids = [
                row[0]
                for row in self._db.execute(
                    f"SELECT id FROM batches WHERE status NOT IN ({','.join('?' * len(finished))}) ORDER BY rowid",
                    finished,
                )
            ]
        return [self.batch(batch_id) for batch_id in ids]

    def batch_using(self, file_id: str) -> str | None:
        """An unfinished batch reading ``file_id``, if any."""
        return next((b["id"] for b in self.unfinished_batches() if b["input_file_id"] == file_id), None)

    def set_status(self, batch_id: str, status: BatchStatus, **fields: Any) -> dict[str, Any]:
        """Enter ``status`` (stamping its ``*_at``), with ``fields`` (output and error files, total, errors)."""
        assert set(fields) <= set(_BATCH_FIELDS), fields
        values = {name: _dumps(value) if name == "errors" else value for name, value in fields.items()}
        values["status"] = status.value
        if status in _ENTERED_AT:
            values[_ENTERED_AT[status]] = _now()
        with self._lock:
            self._db.execute(
                f"UPDATE batches SET {', '.join(f'{name} = ?' for name in values)} WHERE id = ?",
                (*values.values(), batch_id),
            )
        return self.batch(batch_id)

    # -- lines ---------------------------------------------------------------------------

    def add_result(self, batch_id: str, line: int, custom_id: str, ok: bool, output: bytes) -> bool:
        """Record a line's result once; False if it already had one."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?)", (batch_id, line, custom_id, int(ok), output)
            )
        return cursor.rowcount == 1

    def done_lines(self, batch_id: str) -> set[int]:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT line FROM results WHERE batch_id = ?", (batch_id,))}

    def results(self, batch_id: str, ok: bool) -> Iterator[bytes]:
        """The recorded output lines of one kind, in input order, a page at a time."""
        last = 0
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT line, output FROM results WHERE batch_id = ? AND ok = ? AND line > ? "
                    "ORDER BY line LIMIT 1000",
                    (batch_id, int(ok), last),
                ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield from (row[1] for row in rows)


def _now() -> int:
    return int(time.time())


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _file_object(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def _batch_object(row: sqlite3.Row, done: int, completed: int) -> dict[str, Any]:
    errors = row["errors"] and json.loads(row["errors"])
    return {
        "id": row["id"],
        "object": "batch",
        "endpoint": row["endpoint"],
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": row["input_file_id"],
        "completion_window": row["completion_window"],
        "status": row["status"],
        "output_file_id": row["output_file_id"],
        "error_file_id": row["error_file_id"],
        "created_at": row["created_at"],
        "in_progress_at": row["in_progress_at"],
        "expires_at": row["expires_at"],
        "finalizing_at": row["finalizing_at"],
        "completed_at": row["completed_at"],
        "failed_at": row["failed_at"],
        "expired_at": row["expired_at"],
        "cancelling_at": row["cancelling_at"],
        "cancelled_at": row["cancelled_at"],
        "request_counts": {"total": row["total"], "completed": completed, "failed": done - completed},
        "metadata": row["metadata"] and json.loads(row["metadata"]),
    }
