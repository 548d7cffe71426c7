"""The usage ledger: one SQLite row per finished request, for accounting.

``add`` only appends the record's row to an in-memory buffer (O(1), no I/O); ``flush`` swaps the buffer out and writes
it in a single transaction on a worker thread (``trio.to_thread``), so the
event loop never waits on the disk. The database is in WAL mode with
``synchronous=NORMAL``: a committed flush survives a crash of the process, and
readers (``summary``, ``totals``) never block a writer. Rows are kept across
restarts: reopening the same path continues the same ledger. All database
work is serialised by one lock, as the single connection is shared across
worker threads. Records are any objects with the attributes of
:class:`~runestone.telemetry.events.RequestFinished` used by the schema
(``wall_time`` becomes ``ts``, ``latency`` seconds become ``latency_ms``).
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Sequence
from typing import Any

import trio

__all__ = ["SUMMARY_COLUMNS", "UsageLedger"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    key_id TEXT,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    cost REAL NOT NULL,
    latency_ms REAL NOT NULL,
    status TEXT NOT NULL,
    http_status INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_key_ts ON usage (key_id, ts);
"""

#: SQLite's page cache for the ledger's connection, in KiB: what the ledger keeps in memory at most.
_CACHE_KIB = 256

_INSERT = (
    "INSERT INTO usage (ts, key_id, provider, model, endpoint, tokens_in, tokens_out, cost,"
    " latency_ms, status, http_status) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
)

#: What ``summary`` may group by, and the SQL for each (a whitelist: these are
#: pasted into the query, so nothing else may be).
SUMMARY_COLUMNS = {
    "model": "model",
    "provider": "provider",
    "key_id": "key_id",
    "endpoint": "endpoint",
    "status": "status",
    "day": "date(ts, 'unixepoch')",
}

_AGGREGATES = (
    "COUNT(*), COALESCE(SUM(tokens_in), 0), COALESCE(SUM(tokens_out), 0), COALESCE(SUM(cost), 0.0),"
    " COALESCE(SUM(status != 'ok'), 0)"
)


def _row(r: Any, cost: float | None) -> tuple:
    return (
        r.wall_time,
        r.key_id,
        r.provider,
        r.model,
        r.endpoint,
        r.tokens_in,
        r.tokens_out,
        r.cost if cost is None else cost,
        r.latency * 1000.0,
        r.status,
        r.http_status,
    )


class UsageLedger:
    """A buffered, append-only usage table in SQLite at ``path``.

    ``max_buffer`` bounds what is kept when writes keep failing (a full disk):
    past it the oldest unwritten records are dropped and counted in
    ``lost``, since the ledger must not grow memory without bound.
    """

    def __init__(self, path: str, *, max_buffer: int = 100_000):
        self.path = path
        self.max_buffer = max_buffer
        self._buffer: list[Any] = []
        self._conn: sqlite3.Connection | None = None
        self._lock = trio.Lock()
        #: Rows committed by this instance.
        self.written = 0
        #: Records dropped after failed writes overflowed ``max_buffer``.
        self.lost = 0

    @property
    def pending(self) -> int:
        """Records added but not yet written."""
        return len(self._buffer)

    def _open_sync(self) -> sqlite3.Connection:
        directory = os.path.dirname(self.path)
        if directory and self.path != ":memory:":
            os.makedirs(directory, exist_ok=True)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            # SQLite's page cache (2 MB by default) fills with every page the ledger appends, so the
            # process grew ~100 bytes per request up to 2 MB. Appends and the rare summary need little of it.
            conn.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    async def open(self) -> None:
        """Open (creating it and its directory if needed) the database; idempotent."""
        async with self._lock:
            if self._conn is None:
                self._conn = await trio.to_thread.run_sync(self._open_sync)

    def add(self, record: Any, cost: float | None = None) -> None:
        """Buffer one record for the next flush. Never does I/O.

        ``cost`` overrides ``record.cost`` (the handler prices unpriced requests).
        """
        self._buffer.append(_row(record, cost))

    def _write_sync(self, conn: sqlite3.Connection, rows: list[tuple]) -> None:
        conn.execute("BEGIN")
        try:
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def flush(self) -> int:
        """Write every buffered record in one transaction; return how many.

        Atomic: either the whole batch is committed or none of it is, and a
        failed batch goes back to the front of the buffer for the next flush
        (then the error propagates). The write runs to its end on its thread
        even if the caller is cancelled meanwhile, so a cancelled flush never
        leaves a half-written batch; records added during the write wait for
        the next flush.
        """
        async with self._lock:
            if not self._buffer:
                return 0
            if self._conn is None:
                raise RuntimeError("UsageLedger.flush before open()")
            batch, self._buffer = self._buffer, []
            try:
                await trio.to_thread.run_sync(self._write_sync, self._conn, batch)
            except BaseException:
                self._buffer[:0] = batch
                overflow = len(self._buffer) - self.max_buffer
                if overflow > 0:
                    del self._buffer[:overflow]
                    self.lost += overflow
                raise
            self.written += len(batch)
            return len(batch)

    async def close(self) -> None:
        """Flush what is buffered, then close the database. Idempotent."""
        if self._conn is None:
            return
        try:
            await self.flush()
        finally:
            async with self._lock:
                conn, self._conn = self._conn, None
                if conn is not None:
                    await trio.to_thread.run_sync(conn.close)

    async def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        async with self._lock:
            if self._conn is None:
                raise RuntimeError("UsageLedger query before open()")
            conn = self._conn
            return await trio.to_thread.run_sync(lambda: conn.execute(sql, params).fetchall())

    async def summary(
        self, key_id: str | None = None, group_by: Sequence[str] = ("model", "day")
    ) -> list[dict[str, Any]]:
        """Requests, errors, tokens and cost per group, over written rows only.

        ``key_id`` None covers every key. ``group_by`` names come from
        :data:`SUMMARY_COLUMNS` (``day`` is the UTC date, ``YYYY-MM-DD``);
        rows are ordered by the group columns. Unflushed records are not
        counted: call ``flush`` first for an up-to-the-moment answer.
        """
        cols = []
        for name in group_by:
            if name not in SUMMARY_COLUMNS:
                raise ValueError(f"cannot group usage by {name!r}; choose from {sorted(SUMMARY_COLUMNS)}")
            cols.append(SUMMARY_COLUMNS[name])
        select = ", ".join(cols + [_AGGREGATES])
        sql = f"SELECT {select} FROM usage"
        params: tuple = ()
        if key_id is not None:
            sql += " WHERE key_id = ?"
            params = (key_id,)
        if cols:
            order = ", ".join(str(i + 1) for i in range(len(cols)))
            sql += f" GROUP BY {order} ORDER BY {order}"
        rows = await self._query(sql, params)
        names = tuple(group_by) + ("requests", "tokens_in", "tokens_out", "cost", "errors")
        return [dict(zip(names, row)) for row in rows if row[len(cols)]]

    async def totals(self, key_id: str | None = None) -> dict[str, Any]:
        """Requests, errors, tokens and cost over all written rows (of ``key_id``)."""
        rows = await self.summary(key_id, group_by=())
        if rows:
            return rows[0]
        return {"requests": 0, "tokens_in": 0, "tokens_out": 0, "cost": 0.0, "errors": 0}
