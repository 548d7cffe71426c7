"""The SQLite file every embedded store opens (the ledger, the key store, the Responses API's store)."""

from __future__ import annotations

import os
import sqlite3

__all__ = ["open_sqlite"]


def open_sqlite(path: str, schema: str, *, pragmas: tuple[str, ...] = ()) -> sqlite3.Connection:
    """A connection to ``path`` (its directory made first) for use from worker threads, in autocommit mode,
    WAL-journaled with ``synchronous=NORMAL`` and then ``pragmas``, with ``schema`` run; closed again if any of
    that fails."""
    directory = os.path.dirname(path)
    if directory and path != ":memory:":
        os.makedirs(directory, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        for pragma in pragmas:
            conn.execute(f"PRAGMA {pragma}")
        conn.executescript(schema)
    except BaseException:
        conn.close()
        raise
    return conn
