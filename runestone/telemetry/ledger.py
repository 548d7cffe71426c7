"""The usage ledger: one row per finished request, for accounting, in SQLite or in Postgres.

``add`` only appends the record's fields to an in-memory buffer (O(1), no I/O, never raises), so the request
path itself may call it: rows then never wait in, or get lost with, the telemetry handler's mailbox. ``flush``
swaps the buffer out and writes it as one batch in a single transaction on a worker thread (``trio.to_thread``),
so the event loop never waits on the database. The ledger object is meant to outlive the actor that flushes it
(the application makes one and hands it to each incarnation of the telemetry handler), so a crash of that
actor loses no buffered row; ``close`` closes the database but keeps the buffer, and ``open`` opens it again.

Where the rows go is a :class:`LedgerBackend`: :class:`SQLiteLedgerBackend` (the embedded default, a file in
the data directory) or :class:`PostgresLedgerBackend` (``[database] url``; one dedicated connection, the batch
sent with ``executemany`` in one pipelined round trip). The guarantees below hold for both.

SQLite is in WAL mode with ``synchronous=NORMAL``: a committed flush survives a crash of the process (a power
loss may take the last ones); Postgres commits durably. So a SIGKILL loses the rows added since the last
committed flush: with the handler flushing on a fixed schedule, at most one flush interval of rows plus the
batch being written. Readers (``summary``, ``totals``) never block a writer. Rows are kept across restarts:
reopening the same database continues the same ledger (an SQLite file from before the ``request_id`` column
gets it added; Postgres gets its schema from :mod:`runestone.storage`'s migrations).

The writer trusts no row. Each is checked before it is stored: names and ids are strings of at most
``MAX_NAME_CHARS`` (``key_id`` and ``request_id`` may be null), token counts integers in ``0..MAX_TOKENS``, cost,
latency and time finite and non-negative, the HTTP status in ``0..999``. A row that fails a check, or that the
database still refuses, is *quarantined*: appended as one JSON line to the quarantine file (by default
``<path>.quarantine.jsonl`` beside the SQLite database) and counted in ``quarantined``, while the rest of its
batch is stored. Only a failure of the database itself (a full disk, a lock, a Postgres server down,
restarting or too slow) fails a flush; its batch goes back to the buffer and the next flush retries it, on a
new connection for Postgres, so the ledger resumes by itself one flush interval after the server is back.
Meanwhile it is *degraded* (:meth:`UsageLedger.status`). The buffer is bounded (``max_buffer``): past it the
oldest rows are quarantined (``overflowed``, with the reason "buffer full") instead of kept in memory.

With a ``spool_path`` (Postgres: ``usage.spool.sqlite3`` in the data directory) a batch the database failed
does not wait in memory: it is *spooled*, committed to that local SQLite file with its ``(origin, seq)``, so
a SIGKILL meanwhile loses none of it. Each flush first writes the spool to the database, oldest first (each
row once, by its ``(origin, seq)``, whichever process spooled it), then deletes what was written; a restarted
gateway does so at its first flush. ``spooled`` in the status counts what waits there.

Records are any objects with the attributes of :class:`~runestone.telemetry.events.RequestFinished` used by the
schema (``wall_time`` becomes ``ts``, ``latency`` seconds become ``latency_ms``); a missing attribute makes a
row that is quarantined, not an error.
"""

from __future__ import annotations

import json
import logging
import itertools
import math
import operator
import os
import sqlite3
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import trio

from ..storage.sqlite import open_sqlite
from .costs import Pricer
from .events import RequestFinished

__all__ = ["MAX_NAME_CHARS", "MAX_TOKENS", "SUMMARY_COLUMNS", "LedgerBackend", "LedgerStatus",
           "PostgresLedgerBackend", "SQLiteLedgerBackend", "UsageLedger"]

log = logging.getLogger(__name__)

#: The most tokens one count of one request may be: far beyond any context window, and small enough that
#: sums over billions of rows fit 64-bit integers. Upstream usage beyond it is a protocol error.
MAX_TOKENS = 1_000_000_000
#: The longest id or model name an upstream may send, and the ledger store.
MAX_NAME_CHARS = 512

#: The spool: batches the database failed, each row (its fields as JSON) under the origin it was numbered in.
_SPOOL_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY AUTOINCREMENT, origin TEXT NOT NULL, row TEXT NOT NULL);
"""

#: The usage table as a new file has it. ``id`` is the rowid (no AUTOINCREMENT: the table is append-only, so ids
#: are never reused anyway, and the extra bookkeeping table cost every insert ~15%); files made before keep theirs.
_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY,
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

_COLUMNS = ("ts, request_id, key_id, provider, model, endpoint, tokens_in, tokens_out, cost, latency_ms, status,"
            " http_status, team")

#: The fields of a buffered row, in order (``latency`` in seconds, as the record has it).
_FIELDS = ("wall_time", "request_id", "key_id", "provider", "model", "endpoint", "tokens_in", "tokens_out",
           "cost", "latency", "status", "http_status", "team")

#: The fields ``add`` reads from a record (``team`` is looked up when the record has none).
_RECORD_FIELDS = _FIELDS[:12]

#: What ``summary`` may group by, and the SQL for each (a whitelist: these are pasted into the query, so
#: nothing else may be). ``day`` is SQLite's expression; a backend may say it its own way (``day_sql``).
SUMMARY_COLUMNS = {
    "model": "model",
    "provider": "provider",
    "key_id": "key_id",
    "team": "team",
    "endpoint": "endpoint",
    "status": "status",
    "day": "date(ts, 'unixepoch')",
}

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


def _usual(row: tuple) -> bool:
    """True when ``row`` passes every check of :func:`_problem` in the shape the gateway's own records have
    (floats for the clock, cost and latency, ints for counts, text or None where allowed); a row of any other
    shape is judged field by field. One pass with no call per field: it runs for every row stored."""
    ts, rid, key, provider, model, endpoint, tin, tout, cost, latency, status, http, team = row[:13]
    inf = math.inf
    return (ts.__class__ is float and 0.0 <= ts < inf and cost.__class__ is float and 0.0 <= cost < inf
            and latency.__class__ is float and 0.0 <= latency < inf
            and tin.__class__ is int and tout.__class__ is int and 0 <= tin <= MAX_TOKENS and 0 <= tout <= MAX_TOKENS
            and http.__class__ is int and 0 <= http <= 999
            and provider.__class__ is str and model.__class__ is str and endpoint.__class__ is str
            and status.__class__ is str
            and len(provider) <= MAX_NAME_CHARS and len(model) <= MAX_NAME_CHARS
            and len(endpoint) <= MAX_NAME_CHARS and len(status) <= MAX_NAME_CHARS
            and (rid is None or (rid.__class__ is str and len(rid) <= MAX_NAME_CHARS))
            and (key is None or (key.__class__ is str and len(key) <= MAX_NAME_CHARS))
            and (team is None or (team.__class__ is str and len(team) <= MAX_NAME_CHARS)))


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



class LedgerBackend:
    """Where a :class:`UsageLedger` keeps its rows: the seam between the ledger's guarantees and one database.

    Every method blocks and is called on a worker thread, one call at a time (under the ledger's lock).
    ``insert`` stores checked, priced rows (in :data:`_COLUMNS` order, then the row's sequence number, unique
    in this ledger: a retried row has the same) in one transaction and returns the ones
    the database refused, as ``(index, reason)``, having stored all the others; an exception of ``failures``
    is the database failing (nothing of the batch is stored). A backend that ``reconnects`` opens a new
    connection for its next call after a failure, and may start without its database (the first flush then
    connects). ``day_sql``, ``aggregates``, ``nulls_first`` and ``param`` are its dialect for ``summary``.
    """

    name = "?"
    #: Where the rows go, as messages and dumps may show it (no secret).
    where = "?"
    failures: tuple[type[BaseException], ...] = ()
    reconnects = False
    day_sql = SUMMARY_COLUMNS["day"]
    aggregates = ""
    nulls_first = ""
    param = "?"

    def open(self) -> None:
        raise NotImplementedError

    def insert(self, rows: list[tuple]) -> list[tuple[int, str]]:
        raise NotImplementedError

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


#: A stored row without its seq (the last field), as the SQLite table holds it.
_BUT_SEQ = operator.itemgetter(slice(0, -1))


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class SQLiteLedgerBackend(LedgerBackend):
    """The embedded ledger: an SQLite file at ``path`` (WAL, ``synchronous=NORMAL``)."""

    name = "sqlite"
    failures = (sqlite3.OperationalError,)
    aggregates = ("COUNT(*), COALESCE(SUM(tokens_in), 0), COALESCE(SUM(tokens_out), 0), COALESCE(SUM(cost), 0.0),"
                  " COALESCE(SUM(status != 'ok'), 0)")
    _insert = f"INSERT INTO usage ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
    #: Rows per multi-row INSERT: one statement step stores them all (executemany steps, and gives up the
    #: GIL, once per row: 1.7x the CPU per row). 50 rows are 650 parameters, under every SQLite's limit (999).
    _chunk = 50
    _insert_chunk = f"INSERT INTO usage ({_COLUMNS}) VALUES " + ",".join(["(?,?,?,?,?,?,?,?,?,?,?,?,?)"] * _chunk)
    # What SQLite may still refuse about one row (beyond the checks): the row is quarantined. An
    # OperationalError is the database failing, not the row, and fails the flush instead.
    _row_errors = (OverflowError, TypeError, ValueError, sqlite3.IntegrityError, sqlite3.InterfaceError,
                   sqlite3.DataError, sqlite3.ProgrammingError)

    def __init__(self, path: str) -> None:
        self.path = self.where = path
        self._conn: sqlite3.Connection | None = None

    def open(self) -> None:
        if self._conn is not None:
            return
        # SQLite's page cache (2 MB by default) fills with every page the ledger appends, so the
        # process grew ~100 bytes per request up to 2 MB. Appends and the rare summary need little of it.
        conn = open_sqlite(self.path, _SQLITE_SCHEMA, pragmas=(f"cache_size=-{_CACHE_KIB}",))
        try:
            columns = {r[1] for r in conn.execute("PRAGMA table_info(usage)")}
            if "request_id" not in columns:
                conn.execute("ALTER TABLE usage ADD COLUMN request_id TEXT")
            if "team" not in columns:
                conn.execute("ALTER TABLE usage ADD COLUMN team TEXT")
            # Partial: only rows of a team are looked up by team (``team = ?`` implies it), and most rows have
            # none, so they cost the index nothing. A file made before keeps its full index (same name).
            conn.execute("CREATE INDEX IF NOT EXISTS usage_team_ts ON usage (team, ts) WHERE team IS NOT NULL")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def insert(self, rows: list[tuple]) -> list[tuple[int, str]]:
        conn = self._conn
        refused: list[tuple[int, str]] = []
        conn.execute("BEGIN")
        try:
            try:
                n = len(rows)
                full = n - n % self._chunk
                for start in range(0, full, self._chunk):
                    # Each row's fields but the last (its seq), flattened in C.
                    conn.execute(self._insert_chunk,
                                 list(itertools.chain.from_iterable(map(_BUT_SEQ, rows[start:start + self._chunk]))))
                if full < n:
                    conn.executemany(self._insert, [row[:-1] for row in rows[full:]])
            except sqlite3.OperationalError:
                raise
            except self._row_errors:
                # One row the checks let through: store the others one by one, keep that one aside.
                conn.execute("ROLLBACK")
                conn.execute("BEGIN")
                for i, row in enumerate(rows):
                    try:
                        conn.execute(self._insert, row[:-1])
                    except sqlite3.OperationalError:
                        raise
                    except self._row_errors as exc:
                        refused.append((i, _reason(exc)))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return refused

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple]:
        return self._conn.execute(sql, params).fetchall()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class PostgresLedgerBackend(LedgerBackend):
    """The ledger in Postgres at ``url`` (``[database] url``), on one dedicated connection.

    The connection is opened (and the schema migrated) at ``open``, or at the first flush when the server is
    down then; a failure closes it and the next call opens a new one. Every call is bounded in time
    (:func:`runestone.storage.bounded`), so a server that stops answering fails a flush instead of holding it.
    """

    name = "postgres"
    reconnects = True
    day_sql = "to_char(to_timestamp(ts) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
    aggregates = ("COUNT(*), COALESCE(SUM(tokens_in), 0)::bigint, COALESCE(SUM(tokens_out), 0)::bigint,"
                  " COALESCE(SUM(cost), 0.0)::float8, COUNT(*) FILTER (WHERE status <> 'ok')")
    nulls_first = " NULLS FIRST"
    param = "%s"
    # A commit whose answer the connection lost (the server went away right then) may have happened: the
    # retried batch must not store its rows twice. Each row carries (origin, seq), origin unique to this backend.
    _insert = (f"INSERT INTO usage ({_COLUMNS}, origin, seq) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
               " ON CONFLICT (origin, seq) DO NOTHING")

    def __init__(self, url: str) -> None:
        from .. import storage

        #: The origin of the rows this backend numbers (a spooled row keeps the one it was numbered under).
        self.origin = uuid.uuid4().hex
        self.where = storage.redact(url)
        self.failures = storage.failure_types()
        self._row_errors = storage.row_error_types()
        self._session = storage.Session(url, "runestone-ledger")

    def open(self) -> None:
        self._session.run(lambda conn: None)

    def insert(self, rows: list[tuple], origin: str | None = None) -> list[tuple[int, str]]:
        return self._session.run(lambda conn: self._insert_rows(conn, rows, origin or self.origin))

    def _insert_rows(self, conn: Any, rows: list[tuple], origin: str) -> list[tuple[int, str]]:
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(self._insert, [(*row[:-1], origin, row[-1]) for row in rows])
            return []
        except self._row_errors:
            pass
        # One row the checks let through: each alone in a savepoint, the refused ones kept aside.
        refused: list[tuple[int, str]] = []
        with conn.transaction():
            for i, row in enumerate(rows):
                try:
                    with conn.transaction():
                        conn.execute(self._insert, (*row[:-1], origin, row[-1]))
                except self._row_errors as exc:
                    refused.append((i, _reason(exc)))
        return refused

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple]:
        return self._session.run(lambda conn: conn.execute(sql, params).fetchall())

    def close(self) -> None:
        self._session.close()


@attrs.frozen
class LedgerStatus:
    """What the ledger is doing, for ``/health/detailed`` and ``/metrics``."""

    backend: str
    """``sqlite`` or ``postgres``."""
    where: str
    """The SQLite file, or the Postgres url without its credentials."""
    state: str
    """``ok``, or ``degraded`` while the database fails (rows are buffered and retried)."""
    pending: int
    """Rows waiting for the next flush."""
    written: int
    """Rows committed by this ledger (across its opens)."""
    quarantined: int
    """Rows kept in the quarantine file instead of the database (the overflowed ones included)."""
    overflowed: int
    """Rows quarantined because the buffer was full while the database failed."""
    lost: int
    """Rows dropped: not even the quarantine file could take them."""
    failures: int
    """Flushes (and reads) the database failed."""
    degraded_since: float | None
    """Wall time of the first failure of the current degraded spell."""
    last_error: str | None
    """The last failure, as ``Type: message``."""
    spooled: int = 0
    """Rows a failed flush committed to the local spool, waiting for the database."""


class UsageLedger:
    """A buffered, append-only usage table: in SQLite at ``path``, or in the given ``backend``.

    ``pricing`` prices rows that carry no cost (see :class:`~runestone.telemetry.costs.Pricer`). ``batch``
    rows waiting set :attr:`batch_full`, which the flushing task waits on between its ticks. ``max_buffer``
    bounds what is kept when writes keep failing (a full disk, Postgres down) or nobody flushes: past it the
    oldest rows go to the quarantine file at the next flush (counted in ``overflowed``), since the ledger must
    not grow memory without bound. ``quarantine_path`` defaults to ``<path>.quarantine.jsonl``.
    """

    def __init__(self, path: str, *, pricing: Mapping[str, Any] | None = None, batch: int = 500,
                 max_buffer: int = 100_000, backend: LedgerBackend | None = None,
                 quarantine_path: str | None = None, spool_path: str | None = None):
        self.path = path
        #: Where batches the database failed wait, committed (see the module docstring), or None.
        self.spool_path = spool_path
        self._spool: sqlite3.Connection | None = None
        #: Rows waiting in the spool.
        self.spooled = 0
        self.backend = backend if backend is not None else SQLiteLedgerBackend(path)
        #: Where rows that cannot be stored are kept, one JSON object per line.
        self.quarantine_path = quarantine_path or (None if path == ":memory:" else path + ".quarantine.jsonl")
        self.batch = batch
        self.max_buffer = max_buffer
        #: key id -> its team (or None), asked when a row is added: the team the key was in at the time.
        self.team_of = None
        self._price = Pricer(pricing)
        self._buffer: list[tuple] = []
        #: Rows pushed out of a full buffer, for the quarantine file at the next flush (bounded the same).
        self._overflow: list[tuple] = []
        self._opened = False
        #: Numbers each row, after its fields: a backend that cannot know whether a commit it lost the answer
        #: to happened stores a retried row once by it (Postgres: ``ON CONFLICT (origin, seq) DO NOTHING``).
        self._seq = itertools.count()
        self._lock = trio.Lock()
        #: Set when ``batch`` rows wait; a new event after each flush.
        self.batch_full = trio.Event()
        #: Rows committed by this ledger (across its opens).
        self.written = 0
        #: Rows that could not be stored and were written to the quarantine file instead.
        self.quarantined = 0
        #: Of those, the rows a full buffer pushed out while the database failed.
        self.overflowed = 0
        #: Records dropped: not even the quarantine file could take them.
        self.lost = 0
        #: Operations the database failed (flushes, reads, an open).
        self.database_failures = 0
        self.degraded_since: float | None = None
        self.last_error: str | None = None

    @property
    def pending(self) -> int:
        """Records added but not yet written."""
        return len(self._buffer)

    @property
    def degraded(self) -> bool:
        """True from a failure of the database to the next write it takes."""
        return self.degraded_since is not None

    def status(self) -> LedgerStatus:
        return LedgerStatus(
            backend=self.backend.name, where=self.backend.where, state="degraded" if self.degraded else "ok",
            pending=len(self._buffer) + len(self._overflow), spooled=self.spooled, written=self.written,
            quarantined=self.quarantined,
            overflowed=self.overflowed, lost=self.lost, failures=self.database_failures,
            degraded_since=self.degraded_since, last_error=self.last_error)

    def _failed(self, exc: BaseException) -> None:
        self.database_failures += 1
        self.last_error = _reason(exc)[:500]
        if self.degraded_since is None:
            self.degraded_since = time.time()
            log.error("usage ledger: %s fails (%s); rows are buffered and retried", self.backend.where,
                      self.last_error)

    def _recovered(self) -> None:
        if self.degraded_since is not None:
            log.warning("usage ledger: %s is back after %.1f s", self.backend.where, time.time() - self.degraded_since)
            self.degraded_since = None

    async def open(self) -> None:
        """Open (creating it and its directory if needed) the database; idempotent.

        A backend that reconnects opens even when its database is down (the ledger starts degraded and its
        first flush connects); any other backend's failure propagates."""
        async with self._lock:
            if self._opened:
                return
            if self.spool_path is not None and self._spool is None:
                self._spool = await trio.to_thread.run_sync(self._open_spool)
            try:
                await trio.to_thread.run_sync(self.backend.open)
            except self.backend.failures as exc:
                if not self.backend.reconnects:
                    raise
                self._failed(exc)
            self._opened = True

    def _open_spool(self) -> sqlite3.Connection:
        conn = open_sqlite(self.spool_path, _SPOOL_SCHEMA)
        self.spooled = conn.execute("SELECT count(*) FROM spool").fetchone()[0]
        if self.spooled:
            log.warning("usage ledger: %d row(s) spooled in %s wait for %s", self.spooled, self.spool_path,
                        self.backend.where)
        return conn

    def _spool_sync(self, rows: list[tuple]) -> None:
        """Commit ``rows`` (numbered under the backend's current origin) to the spool (blocking)."""
        origin = getattr(self.backend, "origin", "-")
        conn = self._spool
        conn.execute("BEGIN")
        try:
            conn.executemany("INSERT INTO spool (origin, row) VALUES (?, ?)",
                             [(origin, json.dumps(row, default=repr)) for row in rows])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.spooled += len(rows)

    def _unspool_sync(self) -> tuple[int, int, int]:
        """Write the spool to the database, oldest first, deleting what was written (blocking); the
        database's failures propagate, leaving the rest spooled."""
        conn = self._spool
        written = quarantined = lost = 0
        while True:
            chunk = conn.execute("SELECT id, origin, row FROM spool ORDER BY id LIMIT ?", (self.batch,)).fetchall()
            if not chunk:
                break
            for origin in dict.fromkeys(o for _, o, _ in chunk):
                rows = [tuple(json.loads(r)) for _, o, r in chunk if o == origin]
                w, refused = self._write_sync(rows, origin)
                lost_now = self._quarantine_sync(refused) if refused else 0
                written, quarantined, lost = written + w, quarantined + len(refused) - lost_now, lost + lost_now
            conn.execute("DELETE FROM spool WHERE id <= ?", (chunk[-1][0],))
            self.spooled = max(0, self.spooled - len(chunk))
        self.spooled = 0
        return written, quarantined, lost

    def add(self, record: Any, cost: float | None = None) -> None:
        """Buffer one record for the next flush. Never does I/O, never raises.

        ``cost`` overrides ``record.cost``. The record's fields are checked when written, not here.
        """
        buffer = self._buffer
        if len(buffer) >= self.max_buffer:
            self._spill(1)  # the oldest goes; only when writes keep failing
        if record.__class__ is RequestFinished:  # the gateway's own record: its fields, read directly
            r = record
            key_id, team = r.key_id, None
            row = [r.wall_time, r.request_id, key_id, r.provider, r.model, r.endpoint, r.tokens_in, r.tokens_out,
                   r.cost, r.latency, r.status, r.http_status]
        else:
            g = getattr
            key_id = g(record, "key_id", None)
            team = g(record, "team", None)
            row = [g(record, name, None) for name in _RECORD_FIELDS]
        if cost is not None:
            row[8] = cost
        if team is None and self.team_of is not None and key_id is not None:
            try:
                team = self.team_of(key_id)
            except Exception:
                team = None
        row += (team, next(self._seq))
        buffer.append(tuple(row))
        if len(buffer) >= self.batch:
            self.batch_full.set()

    def _spill(self, n: int) -> None:
        """Move the ``n`` oldest buffered rows to the overflow (quarantined at the next flush)."""
        moved = self._buffer[:n]
        del self._buffer[:n]
        self._overflow.extend(moved)
        extra = len(self._overflow) - self.max_buffer
        if extra > 0:  # the quarantine file has been failing too
            del self._overflow[:extra]
            self.lost += extra

    def _stored(self, row: tuple) -> tuple:
        """The row as inserted: priced, latency in milliseconds."""
        ts, rid, key, provider, model, endpoint, tin, tout, cost, latency, status, http, team, seq = row
        cost = self._price(cost, provider, model, tin, tout)
        return (ts, rid, key, provider, model, endpoint, tin, tout, cost, latency * 1000.0, status, http, team, seq)

    def _write_sync(self, rows: list[tuple], origin: str | None = None) -> tuple[int, list[tuple[tuple, str]]]:
        """Store ``rows`` in one transaction; return how many were stored and the refused ones with why."""
        refused: list[tuple[tuple, str]] = []
        good: list[tuple] = []
        originals: list[tuple] = []
        for row in rows:
            if not _usual(row):
                field = _problem(row)
                if field is not None:
                    refused.append((row, f"{field} out of range"))
                    continue
            try:
                stored = self._stored(row)
            except Exception as exc:
                refused.append((row, _reason(exc)))
                continue
            if not _amount(stored[8]):
                refused.append((row, "cost out of range"))
                continue
            good.append(stored)
            originals.append(row)
        if not good:
            return 0, refused
        rejected = self.backend.insert(good) if origin is None else self.backend.insert(good, origin)
        refused.extend((originals[i], reason) for i, reason in rejected)
        return len(good) - len(rejected), refused

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
            directory = os.path.dirname(self.quarantine_path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            with open(self.quarantine_path, "a", encoding="utf-8") as f:
                f.write("".join(lines))
        except OSError as exc:
            log.error("usage ledger: %d rows it could not store are lost too: %s: %s", len(lines),
                      self.quarantine_path, exc)
            return len(lines)
        return 0

    def _flush_sync(self, rows: list[tuple]) -> tuple[int, int, int]:
        spooled = self._unspool_sync() if self.spooled else (0, 0, 0)
        if not rows:
            return spooled
        written, refused = self._write_sync(rows)
        lost = self._quarantine_sync(refused) if refused else 0
        return written + spooled[0], len(refused) - lost + spooled[1], lost + spooled[2]

    def _spool_failed(self, batch: list[tuple]) -> bool:
        """A batch the database failed, to the spool (blocking); False when there is none or it failed too."""
        if self._spool is None or not batch:
            return False
        try:
            self._spool_sync(batch)
        except (sqlite3.Error, OSError) as exc:
            log.error("usage ledger: rows not spooled in %s (kept in memory): %s", self.spool_path, exc)
            return False
        return True

    def _counted(self, quarantined: int, lost: int) -> None:
        if quarantined or lost:
            before = self.quarantined + self.lost
            self.quarantined += quarantined
            self.lost += lost
            if before == 0 or before // 1000 != (before + quarantined + lost) // 1000:  # not every flush
                log.warning("usage ledger: rows it could not store were quarantined in %s (%d so far)",
                            self.quarantine_path, self.quarantined)

    async def _quarantine_overflow(self) -> None:
        overflow, self._overflow = self._overflow, []
        reason = f"buffer full ({self.max_buffer} rows) while {self.backend.where} failed"
        lost = await trio.to_thread.run_sync(self._quarantine_sync, [(row, reason) for row in overflow])
        self.overflowed += len(overflow) - lost
        self._counted(len(overflow) - lost, lost)

    async def flush(self) -> int:
        """Write every buffered record in one transaction; return how many were stored.

        Rows that cannot be stored are quarantined (the others are stored). If the database itself fails,
        none of the batch is, and it goes back to the front of the buffer for the next flush (then the error
        propagates); what no longer fits the buffer is quarantined at once. The write runs to its end on its
        thread even if the caller is cancelled meanwhile, so a cancelled flush never leaves a half-written
        batch; records added during the write wait for the next flush.
        """
        async with self._lock:
            if self._overflow:
                await self._quarantine_overflow()
            if not self._buffer and not self.spooled:
                return 0
            if not self._opened:
                raise RuntimeError("UsageLedger.flush before open()")
            batch, self._buffer = self._buffer, []
            self.batch_full = trio.Event()
            try:
                written, quarantined, lost = await trio.to_thread.run_sync(self._flush_sync, batch)
            except BaseException as exc:
                if isinstance(exc, Exception):
                    with trio.CancelScope(shield=True):
                        if await trio.to_thread.run_sync(self._spool_failed, batch):
                            batch = []
                self._buffer[:0] = batch
                overflow = len(self._buffer) - self.max_buffer
                if overflow > 0:
                    self._spill(overflow)
                if isinstance(exc, Exception):
                    self._failed(exc)
                if self._overflow:
                    with trio.CancelScope(shield=True):
                        await self._quarantine_overflow()
                raise
            self._recovered()
            self.written += written
            self._counted(quarantined, lost)
            return written

    async def quarantine_pending(self, reason: str) -> int:
        """Move every row still buffered to the spool, or without one to the quarantine file (the gateway
        stops while its database fails, and the buffer would die with the process); return how many moved."""
        async with self._lock:
            rows, self._buffer = self._overflow + self._buffer, []
            self._overflow = []
            if not rows:
                return 0
            if await trio.to_thread.run_sync(self._spool_failed, rows):
                log.warning("usage ledger: %d row(s) not stored in %s (%s) are spooled in %s", len(rows),
                            self.backend.where, reason, self.spool_path)
                return len(rows)
            lost = await trio.to_thread.run_sync(self._quarantine_sync, [(row, reason) for row in rows])
            self._counted(len(rows) - lost, lost)
            log.error("usage ledger: %d rows not stored in %s (%s) are in %s", len(rows) - lost, self.backend.where,
                      reason, self.quarantine_path)
            return len(rows) - lost

    async def close(self) -> None:
        """Flush what is buffered, then close the database; idempotent. What a failed flush leaves stays
        buffered, for the next ``open`` and ``flush``."""
        if not self._opened:
            return
        try:
            await self.flush()
        finally:
            async with self._lock:
                if self._opened:
                    self._opened = False
                    await trio.to_thread.run_sync(self.backend.close)

    async def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        async with self._lock:
            if not self._opened:
                raise RuntimeError("UsageLedger query before open()")
            try:
                return await trio.to_thread.run_sync(self.backend.query, sql, params)
            except self.backend.failures as exc:
                self._failed(exc)
                raise

    async def summary(
        self, key_id: str | None = None, group_by: Sequence[str] = ("model", "day"), team: str | None = None
    ) -> list[dict[str, Any]]:
        """Requests, errors, tokens and cost per group, over written rows only.

        ``key_id`` None covers every key; ``team`` keeps the rows of that team's keys. ``group_by`` names come from
        :data:`SUMMARY_COLUMNS` (``day`` is the UTC date, ``YYYY-MM-DD``);
        rows are ordered by the group columns. Unflushed records are not
        counted: call ``flush`` first for an up-to-the-moment answer. A failure of the database propagates
        (the backend's ``failures``).
        """
        backend = self.backend
        cols = []
        for name in group_by:
            if name not in SUMMARY_COLUMNS:
                raise ValueError(f"cannot group usage by {name!r}; choose from {sorted(SUMMARY_COLUMNS)}")
            cols.append(backend.day_sql if name == "day" else SUMMARY_COLUMNS[name])
        select = ", ".join(cols + [backend.aggregates])
        sql = f"SELECT {select} FROM usage"
        where, params = [], []
        if key_id is not None:
            where.append(f"key_id = {backend.param}")
            params.append(key_id)
        if team is not None:
            where.append(f"team = {backend.param}")
            params.append(team)
        if where:
            sql += " WHERE " + " AND ".join(where)
        if cols:
            group = ", ".join(str(i + 1) for i in range(len(cols)))
            order = ", ".join(f"{i + 1}{backend.nulls_first}" for i in range(len(cols)))
            sql += f" GROUP BY {group} ORDER BY {order}"
        rows = await self._query(sql, params)
        names = tuple(group_by) + ("requests", "tokens_in", "tokens_out", "cost", "errors")
        return [dict(zip(names, row)) for row in rows if row[len(cols)]]

    async def totals(self, key_id: str | None = None, team: str | None = None) -> dict[str, Any]:
        """Requests, errors, tokens and cost over all written rows (of ``key_id``, of ``team``)."""
        rows = await self.summary(key_id, group_by=(), team=team)
        if rows:
            return rows[0]
        return {"requests": 0, "tokens_in": 0, "tokens_out": 0, "cost": 0.0, "errors": 0}
