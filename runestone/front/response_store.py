"""The Responses API's store: responses kept with ``store: true``, in SQLite in the data directory.

One row per response: its owner (the client key's id; ``""`` in open mode), when it was made, the
Response object and the input items the model saw for it (the stored conversation it continued, then
its own input), which is what ``GET /v1/responses/{id}/input_items`` lists and, with the response's
output after them, what ``previous_response_id`` continues. A row is self-contained, so deleting or
expiring an earlier response of a conversation never breaks a later one.

Retention is bounded: a response older than ``retention_days`` (0: never) is not found from the moment
it expires (reads check the age) and is deleted at the next write; past ``max_stored`` rows the oldest
go. Every lookup is by id *and* owner, so another key's response is simply not found. Database work runs
on a worker thread (``trio.to_thread``), serialised by one lock over one connection, in WAL mode like the
usage ledger; a write runs to its end even if the caller is cancelled meanwhile.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Callable

import attrs
import orjson
import trio

from ..storage.sqlite import open_sqlite

__all__ = ["ResponseStore", "StoredResponse"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    response BLOB NOT NULL,
    input_items BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_created ON responses (created_at);
"""


@attrs.frozen
class StoredResponse:
    """A stored response: the Response object and the input items the model saw for it."""

    response: dict
    input_items: list

    @property
    def conversation(self) -> list:
        """The items a response continuing this one comes after: its input, then its output."""
        return [*self.input_items, *self.response.get("output", ())]


class ResponseStore:
    """Stored responses at ``path``; ``clock`` gives wall-clock seconds (injectable for retention tests)."""

    def __init__(self, path: str, *, retention_days: int = 30, max_stored: int = 10_000,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.retention = retention_days * 86400.0
        self.max_stored = max_stored
        self.clock = clock
        self._conn: sqlite3.Connection | None = None
        self._lock = trio.Lock()

    def _open_sync(self) -> sqlite3.Connection:
        return open_sqlite(self.path, _SCHEMA)

    async def _run(self, fn, *args):
        async with self._lock:
            if self._conn is None:
                self._conn = await trio.to_thread.run_sync(self._open_sync)
            return await trio.to_thread.run_sync(fn, self._conn, *args)

    def _cutoff(self) -> float:
        return self.clock() - self.retention if self.retention else float("-inf")

    # -- operations ---------------------------------------------------------------------------------

    async def put(self, owner: str | None, response: dict, input_items: list) -> None:
        """Keep ``response`` (by its id) for ``owner``, then drop what retention no longer allows."""
        row = (response["id"], owner or "", self.clock(), orjson.dumps(response), orjson.dumps(input_items))
        await self._run(self._put_sync, row, self._cutoff())

    def _put_sync(self, conn: sqlite3.Connection, row: tuple, cutoff: float) -> None:
        conn.execute("BEGIN")
        try:
            conn.execute("INSERT OR REPLACE INTO responses (id, owner, created_at, response, input_items) "
                         "VALUES (?,?,?,?,?)", row)
            conn.execute("DELETE FROM responses WHERE created_at < ?", (cutoff,))
            conn.execute("DELETE FROM responses WHERE id IN (SELECT id FROM responses ORDER BY created_at DESC, "
                         "rowid DESC LIMIT -1 OFFSET ?)", (self.max_stored,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def get(self, owner: str | None, response_id: str) -> StoredResponse | None:
        """``owner``'s response ``response_id``, or None (unknown, another key's, or expired)."""
        row = await self._run(self._get_sync, owner or "", response_id, self._cutoff())
        if row is None:
            return None
        return StoredResponse(orjson.loads(row[0]), orjson.loads(row[1]))

    @staticmethod
    def _get_sync(conn: sqlite3.Connection, owner: str, response_id: str, cutoff: float):
        return conn.execute("SELECT response, input_items FROM responses WHERE id = ? AND owner = ? AND "
                            "created_at >= ?", (response_id, owner, cutoff)).fetchone()

    async def delete(self, owner: str | None, response_id: str) -> bool:
        """Delete ``owner``'s response; False when there was none to delete."""
        return await self._run(self._delete_sync, owner or "", response_id, self._cutoff())

    @staticmethod
    def _delete_sync(conn: sqlite3.Connection, owner: str, response_id: str, cutoff: float) -> bool:
        cur = conn.execute("DELETE FROM responses WHERE id = ? AND owner = ? AND created_at >= ?",
                           (response_id, owner, cutoff))
        return cur.rowcount > 0

    async def count(self) -> int:
        return (await self._run(lambda conn: conn.execute("SELECT COUNT(*) FROM responses").fetchone()))[0]

    async def close(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await trio.to_thread.run_sync(conn.close)
