"""The usage ledger: one SQLite row per finished request, for accounting.

``add`` only appends the record's fields to an in-memory buffer (O(1), no I/O, never raises), so the request
path itself may call it: rows then never wait in, or get lost with, the telemetry handler's mailbox. ``flush``
swaps the buffer out and writes it in a single transaction on a worker thread (``trio.to_thread``), so the event
loop never waits on the disk. The ledger object is meant to outlive the actor that flushes it (the application
makes one and hands it to each incarnation of the telemetry handler), so a crash of that actor loses no
buffered row; ``close`` closes the database but keeps the buffer, and ``open`` opens it again.

The database is in WAL mode with ``synchronous=NORMAL``: a committed flush survives a crash of the process (a
power loss may take the last ones). So a SIGKILL loses the rows added since the last committed flush: with the
handler flushing on a fixed schedule, at most one flush interval of rows plus the batch being written. Readers
(``summary``, ``totals``) never block a writer. Rows are kept across restarts: reopening the same path continues
the same ledger (a database from before the ``request_id`` column gets it added).

The writer trusts no row. Each is checked before it is stored: names and ids are strings of at most
``MAX_NAME_CHARS`` (``key_id`` and ``request_id`` may be null), token counts integers in ``0..MAX_TOKENS``, cost,
latency and time finite and non-negative, the HTTP status in ``0..999``. A row that fails a check, or that SQLite
still refuses, is *quarantined*: appended as one JSON line to ``<path>.quarantine.jsonl`` beside the database
and counted in ``quarantined``, while the rest of its batch is stored. Only a failure of the database itself
(``sqlite3.OperationalError``: a full disk, a lock) fails a flush; its batch goes back to the buffer.

Records are any objects with the attributes of :class:`~runestone.telemetry.events.RequestFinished` used by the
schema (``wall_time`` becomes ``ts``, ``latency`` seconds become ``latency_ms``); a missing attribute makes a
row that is quarantined, not an error.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from .costs import Pricer

__all__ = ["MAX_NAME_CHARS", "MAX_TOKENS", "SUMMARY_COLUMNS", "UsageLedger"]

log = logging.getLogger(__name__)

#: The most tokens one count of one request may be: far beyond any context window, and small enough that
#: sums over billions of rows fit SQLite's 64-bit integers. Upstream usage beyond it is a protocol error.
MAX_TOKENS = 1_000_000_000
#: The longest id or model name an upstream may send, and the ledger store.
MAX_NAME_CHARS = 512

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
    http_status INTEGER NOT NULL,
    request_id TEXT,
    team TEXT
);
CREATE INDEX IF NOT EXISTS usage_key_ts ON usage (key_id, ts);
"""

#: SQLite's page cache for the ledger's connection, in KiB: what the ledger keeps in memory at most.
_CACHE_KIB = 256

_INSERT = (
    "INSERT INTO usage (ts, request_id, key_id, provider, model, endpoint, tokens_in, tokens_out, cost,"
    " latency_ms, status, http_status, team) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)

#: The fields of a buffered row, in order (``latency`` in seconds, as the record has it).
_FIELDS = ("wall_time", "request_id", "key_id", "provider", "model", "endpoint", "tokens_in", "tokens_out",
           "cost", "latency", "status", "http_status", "team")

#: What ``summary`` may group by, and the SQL for each (a whitelist: these are
#: pasted into the query, so nothing else may be).
SUMMARY_COLUMNS = {
    "model": "model",
    "provider": "provider",
    "key_id": "key_id",
    "team": "team",
    "endpoint": "endpoint",
    "status": "status",
    "day": "date(ts, 'unixepoch')",
}

_AGGREGATES = (
    "COUNT(*), COALESCE(SUM(tokens_in), 0), COALESCE(SUM(tokens_out), 0), COALESCE(SUM(cost), 0.0),"
    " COALESCE(SUM(status != 'ok'), 0)"
)

# What SQLite may still refuse about one row (beyond the checks): the row is quarantined. An
# OperationalError is the database failing, not the row, and fails the flush instead.
_ROW_ERRORS = (OverflowError, TypeError, ValueError, sqlite3.IntegrityError, sqlite3.InterfaceError,
               sqlite3.DataError, sqlite3.ProgrammingError)


def _text(v: Any) -> bool:
    return type(v) is str and len(v) <= MAX_NAME_CHARS


def _optional_text(v: Any) -> bool:
    return v is None or (type(v) is str and len(v) <= MAX_NAME_CHARS)


def _tokens(v: Any) -> bool:
    t = type(v)
    return (t is int or (t is float and v.is_integer())) and 0 <= v <= MAX_TOKENS


def _amount(v: Any) -> bool:
    t = type(v)
    return (t is float and 0.0 <= v < math.inf) or (t is int and 0 <= v <= 2**53)


def _status_code(v: Any) -> bool:
    return type(v) is int and 0 <= v <= 999


_CHECKS = (_amount, _optional_text, _optional_text, _text, _text, _text, _tokens, _tokens, _amount, _amount,
           _text, _status_code, _optional_text)


def _problem(row: tuple) -> str | None:
    """The first field of ``row`` that may not be stored, or None."""
    for name, check, value in zip(_FIELDS, _CHECKS, row):
        if not check(value):
            return name
    return None


def _plain(v: Any) -> Any:
    """``v`` as JSON can hold it, for the quarantine file: long text cut, odd numbers and objects as text."""
    if v is None or type(v) in (bool, int):
        return v
    if type(v) is float:
        return v if math.isfinite(v) else repr(v)
    text = v if type(v) is str else repr(v)
    if len(text) > 1000:
        return text[:1000] + f"...[{len(text)} characters]"
    return text


class UsageLedger:
    """A buffered, append-only usage table in SQLite at ``path``.

    ``pricing`` prices rows that carry no cost (see :class:`~runestone.telemetry.costs.Pricer`). ``batch``
    rows waiting set :attr:`batch_full`, which the flushing task waits on between its ticks. ``max_buffer``
    bounds what is kept when writes keep failing (a full disk) or nobody flushes: past it the oldest records
    are dropped and counted in ``lost``, since the ledger must not grow memory without bound.
    """

    def __init__(self, path: str, *, pricing: Mapping[str, Any] | None = None, batch: int = 500,
                 max_buffer: int = 100_000):
        self.path = path
        #: Where rows that cannot be stored are kept, one JSON object per line.
        self.quarantine_path = None if path == ":memory:" else path + ".quarantine.jsonl"
        self.batch = batch
        self.max_buffer = max_buffer
        #: key id -> its team (or None), asked when a row is added: the team the key was in at the time.
        self.team_of = None
        self._price = Pricer(pricing)
        self._buffer: list[tuple] = []
        self._conn: sqlite3.Connection | None = None
        self._lock = trio.Lock()
        #: Set when ``batch`` rows wait; a new event after each flush.
        self.batch_full = trio.Event()
        #: Rows committed by this ledger (across its opens).
        self.written = 0
        #: Rows that could not be stored and were written to the quarantine file instead.
        self.quarantined = 0
        #: Records dropped: the buffer was full, or a quarantine line could not be written.
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
            columns = {r[1] for r in conn.execute("PRAGMA table_info(usage)")}
            if "request_id" not in columns:
                conn.execute("ALTER TABLE usage ADD COLUMN request_id TEXT")
            if "team" not in columns:
                conn.execute("ALTER TABLE usage ADD COLUMN team TEXT")
            conn.execute("CREATE INDEX IF NOT EXISTS usage_team_ts ON usage (team, ts)")
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
        """Buffer one record for the next flush. Never does I/O, never raises.

        ``cost`` overrides ``record.cost``. The record's fields are checked when written, not here.
        """
        buffer = self._buffer
        if len(buffer) >= self.max_buffer:
            del buffer[0]  # the oldest goes; only when writes keep failing
            self.lost += 1
        g = getattr
        key_id = g(record, "key_id", None)
        team = g(record, "team", None)
        if team is None and self.team_of is not None and key_id is not None:
            try:
                team = self.team_of(key_id)
            except Exception:
                team = None
        buffer.append((
            g(record, "wall_time", None), g(record, "request_id", None), key_id,
            g(record, "provider", None), g(record, "model", None), g(record, "endpoint", None),
            g(record, "tokens_in", None), g(record, "tokens_out", None),
            g(record, "cost", None) if cost is None else cost,
            g(record, "latency", None), g(record, "status", None), g(record, "http_status", None), team,
        ))
        if len(buffer) >= self.batch:
            self.batch_full.set()

    def _stored(self, row: tuple) -> tuple:
        """The row as inserted: priced, latency in milliseconds."""
        ts, rid, key, provider, model, endpoint, tin, tout, cost, latency, status, http, team = row
        cost = self._price(cost, provider, model, tin, tout)
        return (ts, rid, key, provider, model, endpoint, tin, tout, cost, latency * 1000.0, status, http, team)

    def _write_sync(self, conn: sqlite3.Connection, rows: list[tuple]) -> tuple[int, list[tuple[tuple, str]]]:
        """Store ``rows`` in one transaction; return how many were stored and the refused ones with why."""
        refused: list[tuple[tuple, str]] = []
        good: list[tuple] = []
        originals: list[tuple] = []
        for row in rows:
            field = _problem(row)
            if field is not None:
                refused.append((row, f"{field} out of range"))
                continue
            try:
                stored = self._stored(row)
            except Exception as exc:
                refused.append((row, f"{type(exc).__name__}: {exc}"))
                continue
            if not _amount(stored[8]):
                refused.append((row, "cost out of range"))
                continue
            good.append(stored)
            originals.append(row)
        written = len(good)
        conn.execute("BEGIN")
        try:
            try:
                conn.executemany(_INSERT, good)
            except sqlite3.OperationalError:
                raise
            except _ROW_ERRORS:
                # One row the checks let through: store the others one by one, keep that one aside.
                conn.execute("ROLLBACK")
                conn.execute("BEGIN")
                written = 0
                for stored, row in zip(good, originals):
                    try:
                        conn.execute(_INSERT, stored)
                    except sqlite3.OperationalError:
                        raise
                    except _ROW_ERRORS as exc:
                        refused.append((row, f"{type(exc).__name__}: {exc}"))
                    else:
                        written += 1
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return written, refused

    def _quarantine_sync(self, refused: list[tuple[tuple, str]]) -> int:
        """Append the refused rows to the quarantine file; return how many could not be written."""
        now = time.time()
        lines = []
        for row, reason in refused:
            fields = {name: _plain(v) for name, v in zip(_FIELDS, row)}
            lines.append(json.dumps({"quarantined_at": now, "reason": reason, "row": fields}) + "\n")
        if self.quarantine_path is None:
            return len(lines)
        try:
            with open(self.quarantine_path, "a", encoding="utf-8") as f:
                f.write("".join(lines))
        except OSError as exc:
            log.error("usage ledger: %d rows it could not store are lost too: %s: %s", len(lines),
                      self.quarantine_path, exc)
            return len(lines)
        return 0

    def _flush_sync(self, conn: sqlite3.Connection, rows: list[tuple]) -> tuple[int, int, int]:
        written, refused = self._write_sync(conn, rows)
        lost = self._quarantine_sync(refused) if refused else 0
        return written, len(refused) - lost, lost

    async def flush(self) -> int:
        """Write every buffered record in one transaction; return how many were stored.

        Rows that cannot be stored are quarantined (the others are stored). If the database itself fails,
        none of the batch is, and it goes back to the front of the buffer for the next flush (then the error
        propagates). The write runs to its end on its thread even if the caller is cancelled meanwhile, so a
        cancelled flush never leaves a half-written batch; records added during the write wait for the next
        flush.
        """
        async with self._lock:
            if not self._buffer:
                return 0
            if self._conn is None:
                raise RuntimeError("UsageLedger.flush before open()")
            batch, self._buffer = self._buffer, []
            self.batch_full = trio.Event()
            try:
                written, quarantined, lost = await trio.to_thread.run_sync(self._flush_sync, self._conn, batch)
            except BaseException:
                self._buffer[:0] = batch
                overflow = len(self._buffer) - self.max_buffer
                if overflow > 0:
                    del self._buffer[:overflow]
                    self.lost += overflow
                raise
            self.written += written
            if quarantined or lost:
                before = self.quarantined + self.lost
                self.quarantined += quarantined
                self.lost += lost
                if before == 0 or before // 1000 != (before + quarantined + lost) // 1000:  # not every flush
                        log.warning("usage ledger: rows it could not store were quarantined in %s (%d so far)",
                                self.quarantine_path, self.quarantined)
            return written

    async def close(self) -> None:
        """Flush what is buffered, then close the database; idempotent. What a failed flush leaves stays
        buffered, for the next ``open`` and ``flush``."""
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
        self, key_id: str | None = None, group_by: Sequence[str] = ("model", "day"), team: str | None = None
    ) -> list[dict[str, Any]]:
        """Requests, errors, tokens and cost per group, over written rows only.

        ``key_id`` None covers every key; ``team`` keeps the rows of that team's keys. ``group_by`` names come from
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
        where, params = [], []
        if key_id is not None:
            where.append("key_id = ?")
            params.append(key_id)
        if team is not None:
            where.append("team = ?")
            params.append(team)
        if where:
            sql += " WHERE " + " AND ".join(where)
        if cols:
            order = ", ".join(str(i + 1) for i in range(len(cols)))
            sql += f" GROUP BY {order} ORDER BY {order}"
        rows = await self._query(sql, params)
        names = tuple(group_by) + ("requests", "tokens_in", "tokens_out", "cost", "errors")
        return [dict(zip(names, row)) for row in rows if row[len(cols)]]

    async def totals(self, key_id: str | None = None, team: str | None = None) -> dict[str, Any]:
        """Requests, errors, tokens and cost over all written rows (of ``key_id``, of ``team``)."""
        rows = await self.summary(key_id, group_by=(), team=team)
        if rows:
            return rows[0]
        return {"requests": 0, "tokens_in": 0, "tokens_out": 0, "cost": 0.0, "errors": 0}
