"""The key store's outbox against a real Postgres (``pgserver``, the session's server): an entry the database
refuses is set aside (in the local copy's ``outbox_refused``, counted across restarts) and the entries after it
go on; a database that becomes unavailable midway keeps what it did not take, in order, for the next drain."""

from __future__ import annotations

import psycopg

from runestone.governance import KeyStore
from runestone.governance.records import Team


def _exec(url: str, sql: str) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


async def test_a_refused_entry_is_set_aside_and_an_unavailable_database_midway_keeps_the_rest(tmp_path,
                                                                                              postgres_url):
    store = KeyStore(tmp_path, database_url=postgres_url)
    store.load()
    _exec(postgres_url, "ALTER TABLE teams ADD CONSTRAINT no_refused CHECK (name <> 'refused')")
    write, drain = store.backend.write, store.backend.drain

    def down(*_):
        raise psycopg.OperationalError("the database is down")

    store.backend.write = store.backend.drain = down
    for name in ("refused", "a", "b"):
        await store.put_team(Team(name))  # queued: in force here, waiting in the outbox
    assert store.outbox == 3

    def down_at_b(origin, entries):  # the batch reaches the database (and is refused); then it goes away at b
        if [ops[0][1] for _, ops in entries] == ["b"]:
            down()
        drain(origin, entries)

    store.backend.write, store.backend.drain = write, down_at_b
    assert not await store.drain()
    assert isinstance(store._drain_error, psycopg.OperationalError)
    assert (store.outbox, store.refused) == (1, 1)
    assert [ops[0][1] for _, ops in store.copy.pending()] == ["b"]  # "a" was written and cleared
    assert _exec(postgres_url, "SELECT name FROM teams ORDER BY name") == [("a",)]

    store.backend.drain = drain
    assert await store.drain()
    assert (store.outbox, store.refused) == (0, 1)
    assert _exec(postgres_url, "SELECT name FROM teams ORDER BY name") == [("a",), ("b",)]
    await store.put_team(Team("later"))  # straight to the database: nothing holds it up
    assert _exec(postgres_url, "SELECT name FROM teams ORDER BY name") == [("a",), ("b",), ("later",)]
    [(reason,)] = store.copy._connect().execute("SELECT reason FROM outbox_refused").fetchall()
    assert "no_refused" in reason and "Failing row" not in reason  # the reason, not the row repeated
    await store.close()

    again = KeyStore(tmp_path, database_url=postgres_url)
    loaded = again.load()
    assert again.refused == 1 and sorted(t.name for t in loaded.teams) == ["a", "b", "later"]
    await again.close()
