"""Connections to Postgres and the migrations run on each, for the stores that keep their data there.

:func:`connect` opens one autocommit connection (callers group their writes with ``conn.transaction()``) with
bounds on every wait: ``connect_timeout`` for the connection itself, ``statement_timeout`` for a statement
on a live but slow server, TCP keepalives for a peer that went away silently; and :func:`bounded` bounds a
whole operation on its worker thread, severing the socket of a server that stopped answering at all (which no
server-side timeout can catch). Then it runs :func:`migrate`. A store treats :func:`failure_types` as the
database failing (not a row): it closes that connection and opens a new one for its next operation, which is
how it resumes by itself once the server is back.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from .migrations import MIGRATIONS, Migration

__all__ = ["DatabaseError", "Session", "bounded", "connect", "failure_types", "migrate", "redact", "row_error_types"]

#: The key of the advisory lock migrations hold (any constant; this one is "runestone" in ASCII, truncated).
MIGRATION_LOCK = 0x72756E6573746F6E
#: Seconds to connect (libpq's connect_timeout: at least 2).
CONNECT_TIMEOUT = 5
#: Milliseconds one statement may run on the server.
STATEMENT_TIMEOUT_MS = 10_000
#: Seconds one whole operation (a flush, a write) may wait on a server before its socket is severed.
OPERATION_TIMEOUT = 15.0


class DatabaseError(Exception):
    """The database cannot be used: psycopg is missing, or the schema is newer than this version knows."""


def redact(url: str) -> str:
    """``postgresql://user:pw@host/db`` -> ``postgresql://***@host/db``: what messages and dumps may show."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://***"
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise DatabaseError("[database] url needs psycopg: pip install 'runestone[postgres]'") from None
    return psycopg


def failure_types() -> tuple[type[BaseException], ...]:
    """What a store treats as the database failing (the batch or write is kept and retried), not a bad row."""
    psycopg = _psycopg()
    return (psycopg.OperationalError, psycopg.InterfaceError, psycopg.InternalError, psycopg.NotSupportedError,
            psycopg.ProgrammingError, OSError)


def row_error_types() -> tuple[type[BaseException], ...]:
    """What one row can cause: a value the driver or the server refuses (the row is set aside, not retried)."""
    psycopg = _psycopg()
    return (psycopg.DataError, psycopg.IntegrityError, UnicodeError, OverflowError, TypeError, ValueError)


def connect(url: str, *, application_name: str = "runestone", migrations: tuple[Migration, ...] = MIGRATIONS):
    """A new autocommit connection to ``url`` with its schema migrated (blocking: call it on a worker thread)."""
    psycopg = _psycopg()
    conn = psycopg.connect(
        url, autocommit=True, connect_timeout=CONNECT_TIMEOUT, application_name=application_name,
        options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}", keepalives=1, keepalives_idle=10,
        keepalives_interval=5, keepalives_count=3)
    try:
        migrate(conn, migrations)
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: Any, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Apply the ``migrations`` not yet recorded in ``schema_migrations``, in order; return their versions.

    All in one transaction holding a transaction-scoped advisory lock: instances that start together take
    turns, the second finds everything applied, and a failed migration leaves nothing half-done. Idempotent.
    A database that records a version beyond the last one known is refused (a newer Runestone migrated it).
    """
    applied = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
                     " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        done = {v for (v,) in conn.execute("SELECT version FROM schema_migrations")}
        newest = max((m.version for m in migrations), default=0)
        if done and max(done) > newest:
            raise DatabaseError(f"the database's schema is at version {max(done)}, newer than this Runestone "
                                f"knows (up to {newest}): run a newer Runestone against it")
        for m in sorted(migrations, key=lambda m: m.version):
            if m.version in done:
                continue
            conn.execute(m.sql)
            conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (m.version, m.name))
            applied.append(m.version)
    return applied


def sever(conn: Any) -> None:
    """Shut ``conn``'s socket down (from any thread), so a call blocked on it returns with an error."""
    try:
        fd = conn.pgconn.socket
    except Exception:
        return
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        s.close()


@contextlib.contextmanager
def bounded(conn: Any, timeout: float | None = None) -> Iterator[None]:
    """Within the block (on a worker thread), ``conn`` is severed if the block runs past ``timeout`` seconds
    (:data:`OPERATION_TIMEOUT` by default).

    A real-time timer, on purpose: it bounds a wait on a remote server, whatever clock the event loop uses.
    """
    timer = threading.Timer(OPERATION_TIMEOUT if timeout is None else timeout, sever, (conn,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


class Session:
    """A store's one dedicated connection to ``url``: opened (and migrated) when first needed, and opened anew
    after any operation that failed, which is how a store resumes once the server is back. Blocking: used from
    one worker thread at a time."""

    def __init__(self, url: str, application_name: str) -> None:
        self.url = url
        self.application_name = application_name
        self._conn: Any = None

    def run(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(connection)``, bounded in time (:func:`bounded`); an exception closes the connection."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self.url, application_name=self.application_name)
            with bounded(self._conn):
                return fn(self._conn)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass
