"""The store of keys, teams and spend: one SQLite database, ``keys.sqlite3`` in the data directory (the embedded
default), or the ``[database] url`` Postgres database (shared by every instance).

Keys and teams are one JSON document per row (a key's secret is never stored, only its digest). Spend is
one row per budget holder (``scope`` "key" or "team", its id or name) with the start of its current period,
the nano-USD spent and the requests made in it. Reads happen once, at start (:meth:`KeyStore.load`, before
the event loop serves anything); every write runs on a worker thread (``trio.to_thread``) under one lock,
so the event loop never waits on the database and two writes never share the connection at once. SQLite is in
WAL mode with ``synchronous=NORMAL``, as the usage ledger: a committed write survives a crash of the process.
The database is a backend (:class:`SQLiteKeyBackend`, :class:`PostgresKeyBackend`) behind the same
:class:`KeyStore`; a Postgres write that fails (server down or restarting) opens a new connection for the next
one, so the store resumes by itself; meanwhile a change waits in the local copy's outbox (see :class:`KeyStore`)
and a spend write raises :class:`KeyStoreError` (the spend stays dirty for the next flush).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import trio

from ..storage.sqlite import open_sqlite
from .records import KeyRecord, Team, key_from_doc, team_from_doc

__all__ = ["KeyStore", "KeyStoreError", "LocalCopy", "Loaded", "PostgresKeyBackend", "SQLiteKeyBackend"]

log = logging.getLogger("runestone.governance")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS teams (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (id TEXT PRIMARY KEY, digest TEXT NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS spend (
    scope TEXT NOT NULL,
    name TEXT NOT NULL,
    period_start REAL NOT NULL,
    nano INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    PRIMARY KEY (scope, name)
);
-- The first budget-journal segment the spend above does not include (runestone.governance.journal).
CREATE TABLE IF NOT EXISTS journal (id INTEGER PRIMARY KEY CHECK (id = 0), floor INTEGER NOT NULL);
"""


class KeyStoreError(Exception):
    """The store cannot be opened or read, or a write failed."""


class Loaded:
    """What the store held at start."""

    def __init__(self, teams: list[Team], keys: list[KeyRecord], spend: dict, journal_floor: int = 0) -> None:
        self.teams = teams
        self.keys = keys
        #: (scope, name) -> (period_start, nano, requests)
        self.spend = spend
        #: The first budget-journal segment ``spend`` does not include.
        self.journal_floor = journal_floor



#: A write, as data: ``("team", name, doc)``, ``("delete_team", name)``, ``("key", id, digest, doc)``,
#: ``("spend", scope, name, period_start, nano, requests)`` or ``("journal_floor", segment)`` (in Postgres under the
#: data directory's origin);
#: a backend says each in its own SQL.
Op = tuple


class SQLiteKeyBackend:
    """``keys.sqlite3`` in a data directory; made (with the directory) at the first write."""

    failures: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)
    _sql = {
        "team": "INSERT OR REPLACE INTO teams (name, doc) VALUES (?, ?)",
        "delete_team": "DELETE FROM teams WHERE name = ?",
        "delete_team_spend": "DELETE FROM spend WHERE scope = 'team' AND name = ?",
        "key": "INSERT OR REPLACE INTO keys (id, digest, doc) VALUES (?, ?, ?)",
        "spend": "INSERT OR REPLACE INTO spend (scope, name, period_start, nano, requests) VALUES (?, ?, ?, ?, ?)",
        "journal_floor": "INSERT OR REPLACE INTO journal (id, floor) VALUES (0, ?)",
        "outbox": "INSERT INTO outbox (ops) VALUES (?)",
    }
    #: The spend it holds is checkpointed with this instance's budget journal (one instance per database).
    keeps_journal = True

    _schema = _SCHEMA
    _pragmas: tuple[str, ...] = ()

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / "keys.sqlite3"
        self.where = str(self.path)
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = open_sqlite(str(self.path), self._schema, pragmas=self._pragmas)
        return self._conn

    def read(self) -> tuple[list, list, list] | None:
        """(team docs, key docs, spend rows), or None when nothing was ever stored."""
        if self._conn is None and not self.path.exists():
            return None
        conn = self._connect()
        return (conn.execute("SELECT doc FROM teams ORDER BY name").fetchall(),
                conn.execute("SELECT doc FROM keys ORDER BY id").fetchall(),
                conn.execute("SELECT scope, name, period_start, nano, requests FROM spend").fetchall())

    def read_journal_floor(self) -> int:
        """The first budget-journal segment the stored spend does not include (0: none checkpointed)."""
        if self._conn is None and not self.path.exists():
            return 0
        row = self._connect().execute("SELECT floor FROM journal WHERE id = 0").fetchone()
        return row[0] if row else 0

    def write(self, ops: list[Op]) -> None:
        conn = self._connect()
        conn.execute("BEGIN")
        try:
            for op in ops:
                for sql, params in _statements(self._sql, op):
                    conn.execute(sql, params)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def replace_all(self, team_docs: list, key_docs: list, spend_rows: list, floor: int) -> None:
        """Make the file hold exactly this (the local copy of a Postgres store, after a read of it)."""
        self.write([("clear",)] + [("team", orjson.loads(d)["name"], d) for (d,) in team_docs]
                   + [("key", orjson.loads(d)["id"], orjson.loads(d)["digest"], d) for (d,) in key_docs]
                   + [("spend", *row) for row in spend_rows] + [("journal_floor", floor)])

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


#: The changes (not spend) that wait in the local copy's outbox while the database cannot take them.
CHANGE_OPS = frozenset({"team", "delete_team", "key"})

_OUTBOX_SCHEMA = """
-- Changes made while the database could not take them, in order, each the list of ops of one write (JSON);
-- written to the database once each under (origin, seq), then deleted.
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, ops TEXT NOT NULL);
-- The outbox's origin: made with the file, so a new file never reuses the (origin, seq) of an old one.
CREATE TABLE IF NOT EXISTS outbox_origin (id INTEGER PRIMARY KEY CHECK (id = 0), origin TEXT NOT NULL);
-- Outbox entries the database refused (a constraint, a value: not its being unavailable), set aside with its
-- reason and when (unix seconds), so the entries after them go on; kept for an operator, never retried.
CREATE TABLE IF NOT EXISTS outbox_refused (seq INTEGER PRIMARY KEY, ops TEXT NOT NULL, reason TEXT NOT NULL,
                                           refused_at REAL NOT NULL);
"""


class LocalCopy(SQLiteKeyBackend):
    """``keys.copy.sqlite3``: the local copy of a Postgres store, and its outbox (``synchronous=FULL``: a
    change queued here is on the disk before it is answered)."""

    _schema = _SCHEMA + _OUTBOX_SCHEMA
    _pragmas = ("synchronous=FULL",)
    _sql = {**SQLiteKeyBackend._sql,
            "refuse": "INSERT INTO outbox_refused (seq, ops, reason, refused_at) SELECT seq, ops, ?, ? FROM outbox"
                      " WHERE seq = ?",
            "unqueue": "DELETE FROM outbox WHERE seq = ?"}

    def __init__(self, data_dir: str | Path) -> None:
        super().__init__(data_dir)
        self.path = Path(data_dir) / COPY_FILE
        self.where = str(self.path)

    def origin(self) -> str:
        conn = self._connect()
        row = conn.execute("SELECT origin FROM outbox_origin WHERE id = 0").fetchone()
        if row is None:
            conn.execute("INSERT OR IGNORE INTO outbox_origin (id, origin) VALUES (0, ?)", (uuid.uuid4().hex,))
            row = conn.execute("SELECT origin FROM outbox_origin WHERE id = 0").fetchone()
        return row[0]

    def queue(self, ops: list[Op]) -> None:
        """Apply ``ops`` to the copy and append them to the outbox, in one transaction."""
        self.write(ops + [("outbox", orjson.dumps(ops).decode())])

    def pending(self) -> list[tuple[int, list[Op]]]:
        """The outbox, oldest first: (seq, ops)."""
        if self._conn is None and not self.path.exists():
            return []
        return [(seq, [tuple(op) for op in orjson.loads(ops)])
                for seq, ops in self._connect().execute("SELECT seq, ops FROM outbox ORDER BY seq")]

    def done(self, last: int) -> None:
        """Delete the outbox up to ``last`` (written to the database)."""
        self._connect().execute("DELETE FROM outbox WHERE seq <= ?", (last,))

    def set_aside(self, seq: int, reason: str) -> None:
        """Move the outbox entry ``seq`` (the database refused it, for ``reason``) to ``outbox_refused``."""
        self.write([("refuse", reason, time.time(), seq), ("unqueue", seq)])

    def refused(self) -> int:
        """How many outbox entries were set aside (see :meth:`set_aside`)."""
        if self._conn is None and not self.path.exists():
            return 0
        return self._connect().execute("SELECT count(*) FROM outbox_refused").fetchone()[0]


def _statements(sql: dict[str, str], op: Op) -> list[tuple[str, tuple]]:
    kind, *params = op
    if kind == "clear":  # the local copy, rewritten whole
        return [(f"DELETE FROM {table}", ()) for table in ("teams", "keys", "spend", "journal")]
    if kind == "delete_team":
        return [(sql["delete_team"], tuple(params)), (sql["delete_team_spend"], tuple(params))]
    return [(sql[kind], tuple(params))]


class PostgresKeyBackend:
    """The ``teams``, ``keys`` and ``spend`` tables of the ``[database] url`` database (one connection).

    The spend it holds is checkpointed with this instance's budget journal too (its data directory's
    segments): the first segment the stored spend does not include is a row of ``journal_floors`` under the
    data directory's ``origin`` (a name made once and kept in it, ``budget-journal.origin``), written in the
    spend's own transaction, so a SIGKILLed instance's unflushed spend is replayed into Postgres once, at
    its next start, whether or not the previous checkpoint's commit answer arrived."""

    keeps_journal = True

    _sql = {
        "team": "INSERT INTO teams (name, doc) VALUES (%s, %s) ON CONFLICT (name) DO UPDATE SET doc = EXCLUDED.doc",
        "delete_team": "DELETE FROM teams WHERE name = %s",
        "delete_team_spend": "DELETE FROM spend WHERE scope = 'team' AND name = %s",
        "key": "INSERT INTO keys (id, digest, doc) VALUES (%s, %s, %s) ON CONFLICT (id) DO UPDATE SET"
               " digest = EXCLUDED.digest, doc = EXCLUDED.doc",
        "spend": "INSERT INTO spend (scope, name, period_start, nano, requests) VALUES (%s, %s, %s, %s, %s)"
                 " ON CONFLICT (scope, name) DO UPDATE SET period_start = EXCLUDED.period_start,"
                 " nano = EXCLUDED.nano, requests = EXCLUDED.requests",
        "journal_floor": "INSERT INTO journal_floors (origin, floor) VALUES (%s, %s)"
                         " ON CONFLICT (origin) DO UPDATE SET floor = EXCLUDED.floor",
    }

    def __init__(self, url: str, data_dir: str | Path | None = None) -> None:
        from .. import storage

        self.where = storage.redact(url)
        self.failures = storage.failure_types() + storage.row_error_types() + (storage.DatabaseError,)
        #: The failures that mean the database cannot answer now (a change then waits in the outbox).
        self.unavailable = storage.failure_types()
        #: What the database (or the driver) refuses about a change itself: an outbox entry is then set aside.
        self.refusals = storage.row_error_types()
        self._session = storage.Session(url, "runestone-keys")
        self._origin_path = Path(data_dir) / ORIGIN_FILE if data_dir is not None else None
        self._origin: str | None = None

    @property
    def origin(self) -> str:
        """This data directory's name among the instances sharing the database (made at the first call)."""
        if self._origin is None:
            self._origin = _data_dir_origin(self._origin_path) if self._origin_path is not None else "-"
        return self._origin

    def read_journal_floor(self) -> int:
        origin = self.origin
        row = self._session.run(lambda conn: conn.execute(
            "SELECT floor FROM journal_floors WHERE origin = %s", (origin,)).fetchone())
        return int(row[0]) if row else 0

    def read(self) -> tuple[list, list, list]:
        return self._session.run(lambda conn: (
            conn.execute("SELECT doc FROM teams ORDER BY name").fetchall(),
            conn.execute("SELECT doc FROM keys ORDER BY id").fetchall(),
            conn.execute("SELECT scope, name, period_start, nano, requests FROM spend").fetchall()))

    def write(self, ops: list[Op]) -> None:
        ops = [("journal_floor", self.origin, *op[1:]) if op[0] == "journal_floor" else op for op in ops]

        def write(conn: Any) -> None:
            with conn.transaction():
                for op in ops:
                    for sql, params in _statements(self._sql, op):
                        conn.execute(sql, params)

        self._session.run(write)

    def drain(self, origin: str, entries: list[tuple[int, list[Op]]]) -> None:
        """Write a local outbox's ``entries`` in order, in one transaction, each once: an entry whose
        ``(origin, seq)`` is already in ``outbox_applied`` (a drain whose commit answer was lost) is skipped."""

        def write(conn: Any) -> None:
            with conn.transaction():
                for seq, ops in entries:
                    cur = conn.execute("INSERT INTO outbox_applied (origin, seq) VALUES (%s, %s)"
                                       " ON CONFLICT DO NOTHING", (origin, seq))
                    if cur.rowcount == 0:
                        continue
                    for op in ops:
                        for sql, params in _statements(self._sql, op):
                            conn.execute(sql, params)

        self._session.run(write)

    def close(self) -> None:
        self._session.close()


#: The file in the data directory naming it among the instances that share a database.
ORIGIN_FILE = "budget-journal.origin"
#: With a database url: the local copy of what the database holds, in the data directory (see KeyStore).
COPY_FILE = "keys.copy.sqlite3"


def _data_dir_origin(path: Path) -> str:
    """The name kept in ``path``, made (a random one) when there is none; OSError when it cannot be."""
    try:
        text = path.read_text().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    origin = uuid.uuid4().hex
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(origin + "\n")
    os.replace(tmp, path)
    return origin


class KeyStore:
    """Keys, teams and spend in ``data_dir``'s SQLite file, or in Postgres at ``database_url``.

    With Postgres, a local copy (``keys.copy.sqlite3`` in the data directory) is made from each read of the
    database and follows each write to it once committed, so an instance can start while its database is
    down: :meth:`load` then reads the copy (or, when there is none, nothing: config keys only) and says so
    in ``degraded``, and :meth:`reload` (tried by the governance's flush loop) reads the database again once
    it is back.

    A change (a key or team written or a team deleted) that the database cannot take, at start or later, is
    applied to the copy and appended to the copy's *outbox* in one SQLite transaction (``synchronous=FULL``),
    and answered as done: it is in force here at once. The outbox is written to the database in order, each
    entry once (``outbox_applied`` holds its ``(origin, seq)``, in the same transaction), before anything else
    is (:meth:`drain`, tried before each write, by the governance's flush loop, and by :meth:`reload` before
    it reads), then cleared. Keys are in it as in the tables: digests, never a secret. Spend is not queued:
    it stays dirty in memory (and in the budget journal) for the next flush.

    An entry the database *refuses* (a constraint or a value it will never take, not its being unavailable)
    would block every later drain, and so every later write, spend included: when the outbox fails so, its
    entries are written one by one, each in its own transaction, and one refused is *set aside*, moved to the
    copy's ``outbox_refused`` table with the database's reason, logged at ERROR (its kind and key id or team
    name, never its document) and counted in :attr:`refused`; the others go on. The change set aside stays in
    force on this instance (in memory and in the copy) until its next read of the database replaces the copy
    (a restart, or a :meth:`reload` after a start without the database)."""

    def __init__(self, data_dir: str | Path, *, database_url: str | None = None) -> None:
        self.backend = (PostgresKeyBackend(database_url, data_dir) if database_url
                        else SQLiteKeyBackend(data_dir))
        #: The local copy of a Postgres store (None in SQLite mode).
        self.copy: SQLiteKeyBackend | None = None
        if database_url:
            self.copy = LocalCopy(data_dir)
        #: Changes waiting in the local copy's outbox for the database.
        self.outbox = 0
        #: Outbox changes the database refused, set aside in the copy's ``outbox_refused`` (since it was made).
        self.refused = 0
        self._drain_error: BaseException | None = None
        #: Why the database could not be read at start (and has not been since), or None.
        self.degraded: str | None = None
        #: Where what was loaded came from: "database", "local copy", "nothing" (no copy) or "file".
        self.source = "database" if database_url else "file"
        #: Where the keys are, as messages may show it (the SQLite file, or the url without credentials).
        self.path = self.backend.where
        self._lock = trio.Lock()
        #: Spend rows written since start.
        self.spend_writes = 0
        #: Its spend is checkpointed with this instance's budget journal (runestone.governance.journal).
        self.keeps_journal = self.backend.keeps_journal

    def load(self, *, fallback: bool = True) -> Loaded:
        """Everything stored (blocking: called once at start). KeyStoreError names what is wrong.

        A store that does not exist yet is empty; it (and the data directory) is made at the first write.
        A Postgres store that cannot be read is read from its local copy instead (``fallback``). An outbox
        left by a previous run is written to the database first."""
        if self.copy is not None:
            try:
                self.refused = self.copy.refused()
            except SQLiteKeyBackend.failures as exc:
                log.error("the key store's local outbox %s cannot be read: %s", self.copy.where, exc)
        try:
            if self.copy is not None and not self._drain_sync():
                raise KeyStoreError(f"the key store {self.path} cannot be read: {self._drain_error}")
            return self._load(self.backend)
        except KeyStoreError as exc:
            if self.copy is None or not fallback or "cannot be read" not in str(exc):
                raise
            self.degraded = str(exc)
        loaded = self._load(self.copy)
        self.source = "local copy" if self.copy.path.exists() else "nothing"
        return loaded

    def reload(self) -> Loaded:
        """Read the database again (blocking: on a worker thread), after writing the outbox to it; clears
        ``degraded``. KeyStoreError."""
        if not self._drain_sync():
            raise KeyStoreError(f"the key store {self.path} cannot be written: {self._drain_error}")
        loaded = self._load(self.backend)
        self.degraded = None
        self.source = "database"
        return loaded

    def _load(self, backend) -> Loaded:
        where = backend.where
        try:
            raw = backend.read()
            if raw is None:
                return Loaded([], [], {})
            team_docs, key_docs, spend_rows = raw
            teams = [team_from_doc(orjson.loads(d)) for (d,) in team_docs]
            keys = [key_from_doc(orjson.loads(d)) for (d,) in key_docs]
            spend = {(s, n): (p, u, r) for s, n, p, u, r in spend_rows}
            floor = backend.read_journal_floor() if self.keeps_journal else 0
            if backend is not self.copy and self.copy is not None:
                self._copy(self.copy.replace_all, team_docs, key_docs, spend_rows, floor)
        except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
            raise KeyStoreError(f"the key store {where} holds a malformed record ({type(exc).__name__}: "
                                f"{exc}); restore it from a backup or move it away to start without keys") from None
        except backend.failures as exc:
            raise KeyStoreError(f"the key store {where} cannot be read: {exc}") from None
        except OSError as exc:
            raise KeyStoreError(f"the key store's origin file in the data directory cannot be made: {exc}") from None
        return Loaded(teams, keys, spend, floor)

    async def _write(self, ops: list[Op]) -> None:
        # Shielded: once started, a write finishes (or fails) whole even if its caller goes away.
        with trio.CancelScope(shield=True):
            async with self._lock:
                await trio.to_thread.run_sync(self._write_sync, ops)

    def _write_sync(self, ops: list[Op]) -> None:
        change = all(op[0] in CHANGE_OPS for op in ops)
        try:
            if self.copy is not None and not self._drain_sync():
                raise self._drain_error
            self.backend.write(ops)
        except self.backend.failures as exc:
            if self.copy is None or not change or not isinstance(exc, self.backend.unavailable):
                raise KeyStoreError(f"the key store {self.path} could not be written: {exc}") from None
            try:
                self.copy.queue(ops)
            except SQLiteKeyBackend.failures as local:
                raise KeyStoreError(f"the key store {self.path} could not be written ({exc}), nor its local "
                                    f"outbox {self.copy.where} ({local})") from None
            self.outbox += 1
            log.warning("the key store %s cannot be written (%s): the change is in force here and waits in "
                        "the local outbox (%d waiting)", self.path, exc, self.outbox)
            return
        if self.copy is not None:
            self._copy(self.copy.write, ops)

    async def drain(self) -> bool:
        """Write the outbox to the database (a worker thread); True when it is empty."""
        if self.copy is None:
            return True
        with trio.CancelScope(shield=True):
            async with self._lock:
                return await trio.to_thread.run_sync(self._drain_sync)

    def _drain_sync(self) -> bool:
        """The outbox to the database, in order, once each, then cleared (blocking); False when the database
        failed (``_drain_error`` says how): what it took by then is cleared, the rest kept. An entry it refuses
        is set aside (see :class:`KeyStore`)."""
        try:
            entries = self.copy.pending()
        except SQLiteKeyBackend.failures as exc:
            log.error("the key store's local outbox %s cannot be read: %s", self.copy.where, exc)
            entries = []
        self.outbox = len(entries)
        if not entries:
            return True
        origin = self.copy.origin()
        try:
            self.backend.drain(origin, entries)
            through, taken = entries[-1][0], len(entries)
        except self.backend.refusals:  # one entry at least: each alone, to set aside the refused ones
            through, taken = self._drain_each(origin, entries)
        except self.backend.failures as exc:
            self._drain_error = exc
            return False
        if through is not None:
            try:
                self.copy.done(through)
            except SQLiteKeyBackend.failures as exc:  # written once: a retry skips them by (origin, seq)
                log.warning("the key store's local outbox %s was not cleared: %s", self.copy.where, exc)
        self.outbox = sum(1 for seq, _ in entries if through is None or seq > through)
        if taken:
            log.warning("the key store's database %s took the %d change(s) that waited in the local outbox",
                        self.path, taken)
        return self.outbox == 0

    def _drain_each(self, origin: str, entries: list[tuple[int, list[Op]]]) -> tuple[int | None, int]:
        """The outbox's ``entries`` one by one, each in its own transaction, a refused one set aside; stops
        at a failure of the database (``_drain_error``). The last seq through (taken or set aside) and how
        many were taken."""
        through, taken = None, 0
        for seq, ops in entries:
            try:
                self.backend.drain(origin, [(seq, ops)])
                taken += 1
            except self.backend.refusals as exc:
                if not self._set_aside(seq, ops, exc):
                    break
            except self.backend.failures as exc:
                self._drain_error = exc
                break
            through = seq
        return through, taken

    def _set_aside(self, seq: int, ops: list[Op], exc: BaseException) -> bool:
        """Move the refused outbox entry ``seq`` to the copy's ``outbox_refused``; False (``_drain_error``) when
        the copy could not take it (it stays at the outbox's head for the next drain)."""
        reason = _refusal(exc)
        try:
            self.copy.set_aside(seq, reason)
        except SQLiteKeyBackend.failures as local:
            self._drain_error = KeyStoreError(
                f"the key store's database {self.path} refused a change of the local outbox ({reason}), and "
                f"the outbox {self.copy.where} could not set it aside: {local}")
            return False
        self.refused += 1
        log.error("the key store's database %s refused a change that waited in the local outbox, %s: %s; it is "
                  "set aside in outbox_refused of %s, and in force on this instance only until its next read of "
                  "the database (%d set aside so far)", self.path, _described(ops), reason, self.copy.where,
                  self.refused)
        return True

    def _copy(self, write, *args) -> None:
        """Bring the local copy along (blocking); a failure is logged: the database holds the change."""
        try:
            write(*args)
        except SQLiteKeyBackend.failures as exc:
            log.warning("the local copy of the key store (%s) was not updated: %s", self.copy.where, exc)

    async def put_team(self, team: Team) -> None:
        await self._write([("team", team.name, orjson.dumps(team.to_doc()).decode())])

    async def delete_team(self, name: str) -> None:
        await self._write([("delete_team", name)])

    async def put_key(self, key: KeyRecord) -> None:
        await self._write([("key", key.id, key.digest.hex(), orjson.dumps(key.to_doc()).decode())])

    async def put_spend(self, rows: list[tuple[str, str, float, int, int]], journal_floor: int | None = None) -> None:
        """Write ``(scope, name, period_start, nano, requests)`` rows in one transaction, with the first
        budget-journal segment they do not include (``journal_floor``) when given."""
        await self._write(_spend_ops(rows, journal_floor))
        self.spend_writes += len(rows)

    def put_spend_now(self, rows: list[tuple[str, str, float, int, int]], journal_floor: int) -> None:
        """:meth:`put_spend`, blocking: the checkpoint after the journal's replay, at start."""
        self._write_sync(_spend_ops(rows, journal_floor))
        self.spend_writes += len(rows)

    async def close(self) -> None:
        async with self._lock:
            await trio.to_thread.run_sync(self.backend.close)


def _refusal(exc: BaseException) -> str:
    """Why the database refused a change: its primary message, not its detail (which repeats the row)."""
    text = getattr(getattr(exc, "diag", None), "message_primary", None) or str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _described(ops: list[Op]) -> str:
    """The changes of ``ops`` by kind and key id or team name (never their documents)."""
    names = {"team": "team {!r}", "delete_team": "deletion of team {!r}", "key": "key {!r}"}
    return ", ".join(names[op[0]].format(op[1]) if op[0] in names else str(op[0]) for op in ops)


def _spend_ops(rows: list[tuple[str, str, float, int, int]], journal_floor: int | None) -> list[Op]:
    ops: list[Op] = [("spend", *row) for row in rows]
    if journal_floor is not None:
        ops.append(("journal_floor", journal_floor))
    return ops
