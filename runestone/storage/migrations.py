"""The Postgres schema, as numbered migrations: data, applied in order, each once (see ``postgres.migrate``).

A migration is never edited once released: a change of schema is a new migration with the next number. The
tables mirror the SQLite ones (the ledger's ``usage``, the key store's ``teams``, ``keys`` and ``spend``, the
control store's one document, the budget journals' checkpoints, the outbox entries applied), with Postgres types: 64-bit integers for token counts and nano-USD, double
precision for seconds and costs.
"""

from __future__ import annotations

import attrs

__all__ = ["MIGRATIONS", "Migration"]


@attrs.frozen
class Migration:
    #: Its place in the order; ``schema_migrations.version`` records it once applied.
    version: int
    #: What it does, in a few words (also recorded).
    name: str
    #: One or more statements, run in the migrating transaction.
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "usage ledger", """
        CREATE TABLE usage (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            key_id TEXT,
            provider TEXT NOT NULL,
            model TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            tokens_in BIGINT NOT NULL,
            tokens_out BIGINT NOT NULL,
            cost DOUBLE PRECISION NOT NULL,
            latency_ms DOUBLE PRECISION NOT NULL,
            status TEXT NOT NULL,
            http_status INTEGER NOT NULL,
            request_id TEXT,
            team TEXT,
            -- which ledger wrote the row, and its number there: a batch retried after a lost commit answer
            -- stores each row once (ON CONFLICT (origin, seq) DO NOTHING)
            origin TEXT,
            seq BIGINT,
            UNIQUE (origin, seq)
        );
        CREATE INDEX usage_key_ts ON usage (key_id, ts);
        CREATE INDEX usage_team_ts ON usage (team, ts);
    """),
    Migration(2, "keys, teams and spend", """
        CREATE TABLE teams (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
        CREATE TABLE keys (id TEXT PRIMARY KEY, digest TEXT NOT NULL, doc TEXT NOT NULL);
        CREATE TABLE spend (
            scope TEXT NOT NULL,
            name TEXT NOT NULL,
            period_start DOUBLE PRECISION NOT NULL,
            nano BIGINT NOT NULL,
            requests BIGINT NOT NULL,
            PRIMARY KEY (scope, name)
        );
    """),
    Migration(3, "control state", """
        CREATE TABLE control_state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            doc BYTEA NOT NULL,
            saved_at TIMESTAMPTZ NOT NULL DEFAULT now()
        );
    """),
    Migration(4, "budget journal floors", """
        -- per instance (its data directory's origin): the first segment of its local budget journal that the
        -- spend rows do not include, written in the same transaction as the spend it checkpoints
        CREATE TABLE journal_floors (origin TEXT PRIMARY KEY, floor BIGINT NOT NULL);
    """),
    Migration(5, "outbox entries applied", """
        -- the entries of an instance's local outbox (changes made while the database could not answer) that
        -- are written: one row per (origin, seq), in the transaction that applies the entry, so a retried
        -- drain applies each once
        CREATE TABLE outbox_applied (
            origin TEXT NOT NULL,
            seq BIGINT NOT NULL,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            PRIMARY KEY (origin, seq)
        );
    """),
)
