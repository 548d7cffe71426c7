"""Postgres for a fleet: the connection every store opens and the schema migrations run at start.

With ``[database] url`` set, the usage ledger (:mod:`runestone.telemetry.ledger`), the key store
(:mod:`runestone.governance.store`) and the control store keep their data in one Postgres database instead of
SQLite files in the data directory. Each keeps its own dedicated connection and uses it only from a worker
thread (``trio.to_thread``), as the SQLite stores do, so the event loop never waits on the database.
:mod:`.postgres` opens those connections (timeouts set, so a slow or gone server fails an operation instead of
holding it) and brings the schema up to date on each one it opens (:mod:`.migrations`: numbered migrations as
data, applied once each under an advisory lock, so instances starting together never race). This package
imports nothing else of ours; psycopg (the ``postgres`` extra) is imported only when a database url is used.
:func:`.sqlite.open_sqlite` opens the embedded default's SQLite files, the same way for every store.
"""

from .migrations import MIGRATIONS as MIGRATIONS, Migration as Migration
from .sqlite import open_sqlite as open_sqlite
from .postgres import (
    DatabaseError as DatabaseError,
    Session as Session,
    bounded as bounded,
    connect as connect,
    failure_types as failure_types,
    migrate as migrate,
    redact as redact,
    row_error_types as row_error_types,
)

__all__ = ["MIGRATIONS", "DatabaseError", "Migration", "Session", "bounded", "connect", "failure_types", "migrate",
           "open_sqlite", "redact", "row_error_types"]
