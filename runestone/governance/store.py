"""The embedded store of keys, teams and spend: one SQLite database, ``keys.sqlite3`` in the data directory.

Keys and teams are one JSON document per row (a key's secret is never stored, only its digest). Spend is
one row per budget holder (``scope`` "key" or "team", its id or name) with the start of its current period,
the nano-USD spent and the requests made in it. Reads happen once, at start (:meth:`KeyStore.load`, before
the event loop serves anything); every write runs on a worker thread (``trio.to_thread``) under one lock,
so the event loop never waits on the disk and two writes never share the connection at once. WAL mode with
``synchronous=NORMAL``, as the usage ledger: a committed write survives a crash of the process.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import orjson
import trio

from .records import KeyRecord, Team, key_from_doc, team_from_doc

__all__ = ["KeyStore", "KeyStoreError", "Loaded"]

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


class KeyStore:
    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / "keys.sqlite3"
        self._conn: sqlite3.Connection | None = None
        self._lock = trio.Lock()
        #: Spend rows written since start.
        self.spend_writes = 0

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            os.makedirs(self.path.parent, exist_ok=True)
            conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(_SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def load(self) -> Loaded:
        """Everything stored (blocking: called once at start). KeyStoreError names what is wrong.

        A store that does not exist yet is empty; it (and the data directory) is made at the first write."""
        if self._conn is None and not self.path.exists():
            return Loaded([], [], {})
        try:
            conn = self._connect()
            teams = [team_from_doc(orjson.loads(d)) for (d,) in conn.execute("SELECT doc FROM teams ORDER BY name")]
            keys = [key_from_doc(orjson.loads(d)) for (d,) in conn.execute("SELECT doc FROM keys ORDER BY id")]
            spend = {(s, n): (p, u, r) for s, n, p, u, r in conn.execute(
                "SELECT scope, name, period_start, nano, requests FROM spend")}
            floor = conn.execute("SELECT floor FROM journal WHERE id = 0").fetchone()
        except (sqlite3.Error, OSError) as exc:
            raise KeyStoreError(f"the key store {self.path} cannot be read: {exc}") from None
        except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
            raise KeyStoreError(f"the key store {self.path} holds a malformed record ({type(exc).__name__}: "
                                f"{exc}); restore it from a backup or move it away to start without keys") from None
        return Loaded(teams, keys, spend, floor[0] if floor else 0)

    def _write_now(self, sql_params: list[tuple[str, tuple]]) -> None:
        """One transaction (blocking); KeyStoreError if it failed."""
        try:
            conn = self._connect()
            conn.execute("BEGIN")
            try:
                for sql, params in sql_params:
                    conn.execute(sql, params)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as exc:
            raise KeyStoreError(f"the key store {self.path} could not be written: {exc}") from None

    async def _write(self, sql_params: list[tuple[str, tuple]]) -> None:
        async with self._lock:
            # Shielded: once started, a write finishes (or fails) whole even if its caller goes away.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._write_now, sql_params)

    async def put_team(self, team: Team) -> None:
        await self._write([("INSERT OR REPLACE INTO teams (name, doc) VALUES (?, ?)",
                            (team.name, orjson.dumps(team.to_doc()).decode()))])

    async def delete_team(self, name: str) -> None:
        await self._write([("DELETE FROM teams WHERE name = ?", (name,)),
                           ("DELETE FROM spend WHERE scope = 'team' AND name = ?", (name,))])

    async def put_key(self, key: KeyRecord) -> None:
        await self._write([("INSERT OR REPLACE INTO keys (id, digest, doc) VALUES (?, ?, ?)",
                            (key.id, key.digest.hex(), orjson.dumps(key.to_doc()).decode()))])

    @staticmethod
    def _spend_sql(rows: list[tuple[str, str, float, int, int]], journal_floor: int | None) -> list:
        sql = [("INSERT OR REPLACE INTO spend (scope, name, period_start, nano, requests) VALUES (?, ?, ?, ?, ?)",
                row) for row in rows]
        if journal_floor is not None:
            sql.append(("INSERT OR REPLACE INTO journal (id, floor) VALUES (0, ?)", (journal_floor,)))
        return sql

    async def put_spend(self, rows: list[tuple[str, str, float, int, int]], journal_floor: int | None = None) -> None:
        """Write ``(scope, name, period_start, nano, requests)`` rows in one transaction, with the first
        budget-journal segment they do not include (``journal_floor``) when given."""
        await self._write(self._spend_sql(rows, journal_floor))
        self.spend_writes += len(rows)

    def put_spend_now(self, rows: list[tuple[str, str, float, int, int]], journal_floor: int) -> None:
        """:meth:`put_spend`, blocking: the checkpoint after the journal's replay, at start."""
        self._write_now(self._spend_sql(rows, journal_floor))
        self.spend_writes += len(rows)

    async def close(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await trio.to_thread.run_sync(conn.close)
