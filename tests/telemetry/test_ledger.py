"""The usage ledger: buffered batch writes, persistence across reopen, summaries; on both backends (SQLite,
and Postgres on a real server) wherever the behaviour is the backend's to keep."""

import json
import sqlite3

import pytest

from runestone.telemetry.events import RequestFinished
from runestone.telemetry.ledger import PostgresLedgerBackend, UsageLedger

DAY1 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
DAY2 = DAY1 + 86_400


def rec(key="k1", model="gpt-4o", *, ts=DAY1, tin=10, tout=20, cost=0.01, status="ok", provider="openai"):
    return RequestFinished(
        request_id="r", key_id=key, provider=provider, model=model, endpoint="chat", stream=False,
        status=status, http_status=200 if status == "ok" else 502, error_type=None, latency=0.25, ttft=None,
        tokens_in=tin, tokens_out=tout, cost=cost, retries=0, failovers=0, route_reason="default",
        wall_time=ts,
    )


def rows(path):
    with sqlite3.connect(path) as c:
        return c.execute("SELECT key_id, model, tokens_in, latency_ms, status, http_status FROM usage").fetchall()


class Store:
    """One database for a test's ledgers: an SQLite file, or a fresh Postgres database."""

    def __init__(self, kind, tmp_path, url=None):
        self.kind = kind
        self.path = str(tmp_path / "usage.db")
        self.url = url

    def ledger(self, **kw):
        if self.kind == "sqlite":
            return UsageLedger(self.path, **kw)
        return UsageLedger(self.path, backend=PostgresLedgerBackend(self.url), **kw)

    def sql(self, statement):
        if self.kind == "sqlite":
            with sqlite3.connect(self.path) as c:
                return c.execute(statement).fetchall()
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as c:
            cur = c.execute(statement)
            return cur.fetchall() if cur.description else []

    def rows(self):
        return [tuple(r) for r in self.sql(
            "SELECT key_id, model, tokens_in, latency_ms, status, http_status FROM usage ORDER BY id")]

    def refuse_key(self, key: str) -> str:
        """Make the database refuse rows of ``key`` (a constraint the ledger's checks know nothing of); the
        start of the reason the ledger then records."""
        if self.kind == "sqlite":
            self.sql(f"CREATE TRIGGER no_{key} BEFORE INSERT ON usage WHEN NEW.key_id = '{key}' "
                     f"BEGIN SELECT RAISE(ABORT, '{key} refused'); END")
            return f"IntegrityError: {key} refused"
        self.sql(f"ALTER TABLE usage ADD CONSTRAINT no_{key} CHECK (key_id <> '{key}')")
        return "CheckViolation: "

    @property
    def failure(self):
        if self.kind == "sqlite":
            return sqlite3.OperationalError
        import psycopg

        return psycopg.Error


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return Store("sqlite", tmp_path)
    return Store("postgres", tmp_path, request.getfixturevalue("postgres_url"))


async def test_add_buffers_and_flush_writes_in_one_batch(store):
    ledger = store.ledger()
    await ledger.open()
    for _ in range(5):
        ledger.add(rec())
    assert ledger.pending == 5
    assert store.rows() == []  # nothing touches the database before a flush
    assert await ledger.flush() == 5
    assert ledger.pending == 0 and ledger.written == 5
    assert store.rows() == [("k1", "gpt-4o", 10, 250.0, "ok", 200)] * 5
    assert await ledger.flush() == 0
    await ledger.close()


async def test_wal_mode(tmp_path):
    ledger = UsageLedger(str(tmp_path / "u.db"))
    await ledger.open()
    with sqlite3.connect(ledger.path) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    await ledger.close()


async def test_close_flushes_and_reopen_keeps_rows(store):
    ledger = store.ledger()
    await ledger.open()
    ledger.add(rec())
    await ledger.flush()
    ledger.add(rec(key="k2"))
    await ledger.close()  # the unflushed one is written here
    await ledger.close()  # idempotent

    again = store.ledger()
    await again.open()
    again.add(rec(key="k3"))
    await again.flush()
    assert await again.totals() == {"requests": 3, "tokens_in": 30, "tokens_out": 60, "cost": pytest.approx(0.03),
                                    "errors": 0}
    await again.close()


async def test_summary_by_model_and_day_with_key_filter(store):
    ledger = store.ledger()
    await ledger.open()
    for r in (
        rec("k1", "gpt-4o", ts=DAY1, tin=1, tout=2, cost=0.1),
        rec("k1", "gpt-4o", ts=DAY1 + 60, tin=3, tout=4, cost=0.2, status="error"),
        rec("k1", "gpt-4o", ts=DAY2, tin=5, tout=6, cost=0.3),
        rec("k1", "claude", ts=DAY1, tin=7, tout=8, cost=0.4, provider="anthropic"),
        rec("k2", "gpt-4o", ts=DAY1, tin=100, tout=100, cost=1.0),
        rec(None, "gpt-4o", ts=DAY1, tin=1000, tout=0, cost=0.0),
    ):
        ledger.add(r)
    ledger.add(rec("k1", "gpt-4o", ts=DAY1))  # still buffered: summaries cover written rows only
    await ledger.flush()
    ledger.add(rec("k1", "gpt-4o", ts=DAY1))

    k1 = await ledger.summary("k1")
    assert k1 == [
        {"model": "claude", "day": "2023-11-14", "requests": 1, "tokens_in": 7, "tokens_out": 8,
         "cost": pytest.approx(0.4), "errors": 0},
        {"model": "gpt-4o", "day": "2023-11-14", "requests": 3, "tokens_in": 14, "tokens_out": 26,
         "cost": pytest.approx(0.31), "errors": 1},
        {"model": "gpt-4o", "day": "2023-11-15", "requests": 1, "tokens_in": 5, "tokens_out": 6,
         "cost": pytest.approx(0.3), "errors": 0},
    ]
    everyone = await ledger.summary(None, group_by=("model",))
    assert [(r["model"], r["requests"], r["tokens_in"]) for r in everyone] == [
        ("claude", 1, 7), ("gpt-4o", 6, 1119)]
    by_key = await ledger.summary(None, group_by=("key_id",))
    assert [(r["key_id"], r["requests"]) for r in by_key] == [(None, 1), ("k1", 5), ("k2", 1)]
    assert (await ledger.totals("k2"))["tokens_in"] == 100
    assert await ledger.summary("nobody") == []
    assert (await ledger.totals("nobody"))["requests"] == 0
    with pytest.raises(ValueError, match="cannot group"):
        await ledger.summary(None, group_by=("model; DROP TABLE usage",))
    await ledger.close()


async def opened(store, keys, **kw):
    """A ledger of ``store`` (``kw`` its settings), open, with one record per key of ``keys`` added."""
    ledger = store.ledger(**kw)
    await ledger.open()
    for key in keys:
        ledger.add(rec(key=key))
    return ledger


async def test_failed_write_keeps_the_batch_for_the_next_flush(store):
    ledger = await opened(store, ["k0", "k1"], max_buffer=3)
    store.sql("ALTER TABLE usage RENAME TO usage_old")  # the database fails every insert
    with pytest.raises(store.failure):
        await ledger.flush()
    assert ledger.pending == 2 and ledger.status().state == "degraded"
    ledger.add(rec(key="k2"))
    ledger.add(rec(key="k3"))
    with pytest.raises(store.failure):
        await ledger.flush()
    # Bounded: the oldest went to the quarantine file, not lost.
    assert ledger.pending == 3 and ledger.lost == 0 and ledger.overflowed == 1 and ledger.quarantined == 1
    [line] = [json.loads(line) for line in open(ledger.quarantine_path)]
    assert line["row"]["key_id"] == "k0" and line["reason"].startswith("buffer full (3 rows)")
    store.sql("ALTER TABLE usage_old RENAME TO usage")
    assert await ledger.flush() == 3
    assert [r[0] for r in store.rows()] == ["k1", "k2", "k3"]
    status = ledger.status()
    assert status.state == "ok" and status.failures == 2 and status.written == 3 and status.degraded_since is None
    await ledger.close()


async def test_a_full_buffer_spills_to_the_quarantine_file_before_any_flush(store):
    ledger = await opened(store, [f"k{i}" for i in range(5)], max_buffer=3)
    assert ledger.pending == 3 and ledger.status().pending == 5  # two wait for the quarantine file
    assert await ledger.flush() == 3
    assert [r[0] for r in store.rows()] == ["k2", "k3", "k4"]
    assert [json.loads(line)["row"]["key_id"] for line in open(ledger.quarantine_path)] == ["k0", "k1"]
    assert ledger.overflowed == 2 and ledger.lost == 0
    await ledger.close()


async def test_flush_before_open_is_an_error(tmp_path):
    ledger = UsageLedger(str(tmp_path / "u.db"))
    ledger.add(rec())
    with pytest.raises(RuntimeError):
        await ledger.flush()


async def test_add_with_cost_override(store):
    ledger = store.ledger()
    await ledger.open()
    ledger.add(rec(cost=0.0), cost=0.25)
    ledger.add(rec(cost=0.5))
    await ledger.close()
    assert [r[0] for r in store.sql("SELECT cost FROM usage ORDER BY id")] == [0.25, 0.5]


async def test_open_creates_the_directory(tmp_path):
    ledger = UsageLedger(str(tmp_path / "data" / "deeper" / "usage.db"))
    await ledger.open()
    ledger.add(rec())
    await ledger.close()
    assert len(rows(ledger.path)) == 1


def poisoned(**fields):
    """A record as an upstream or a bug could make it: ``rec()`` with ``fields`` replaced, types unchecked."""
    import attrs

    return attrs.evolve(rec(), **fields)


POISONED = {
    "tokens 2**64": dict(tokens_in=2**64),
    "tokens 2**63 - 1": dict(tokens_out=2**63 - 1),
    "negative tokens": dict(tokens_in=-1),
    "tokens as text": dict(tokens_in="12"),
    "tokens as bool": dict(tokens_out=True),
    "tokens 1e300": dict(tokens_in=1e300),
    "NaN cost": dict(cost=float("nan")),
    "infinite cost": dict(cost=float("inf")),
    "negative cost": dict(cost=-0.5),
    "huge model": dict(model="m" * 100_000),
    "lone surrogate key": dict(key_id="\ud800"),
    "no provider": dict(provider=None),
    "latency as text": dict(latency="slow"),
    "NaN wall time": dict(wall_time=float("nan")),
    "status 10**6": dict(http_status=10**6),
}


async def test_rows_it_cannot_store_are_quarantined_and_the_rest_of_the_batch_is_stored(store):
    ledger = store.ledger()
    await ledger.open()
    ledger.add(rec(key="before"))
    for fields in POISONED.values():
        ledger.add(poisoned(**fields))
    ledger.add(object())  # not a record at all
    ledger.add(rec(key="after", tin=1))
    assert await ledger.flush() == 2
    assert [(k, t) for k, _, t, *_ in store.rows()] == [("before", 10), ("after", 1)]
    assert ledger.quarantined == len(POISONED) + 1 and ledger.pending == 0 and ledger.lost == 0
    lines = [json.loads(line) for line in open(ledger.quarantine_path)]
    assert len(lines) == len(POISONED) + 1
    assert lines[0]["reason"] == "tokens_in out of range" and lines[0]["row"]["tokens_in"] == 2**64
    assert lines[0]["row"]["request_id"] == "r" and lines[0]["row"]["key_id"] == "k1"
    assert lines[6]["reason"] == "cost out of range" and lines[6]["row"]["cost"] == "nan"
    assert lines[9]["row"]["model"].endswith("...[100000 characters]")
    # Text the database cannot encode passes the checks; the insert refuses it, and that row alone is set aside.
    assert lines[-1]["reason"].startswith("UnicodeEncodeError") and lines[-1]["row"]["key_id"] == "\ud800"
    assert lines[-1]["row"]["latency"] == 0.25  # as the record had it
    # The ledger goes on as before.
    ledger.add(rec(key="later"))
    assert await ledger.flush() == 1
    assert (await ledger.totals())["requests"] == 3
    await ledger.close()


async def test_a_row_the_database_refuses_after_the_checks_is_quarantined_alone(store):
    ledger = store.ledger()
    await ledger.open()
    reason = store.refuse_key("k2")  # a constraint the checks know nothing of
    for key in ("k1", "k2", "k3"):
        ledger.add(rec(key=key))
    assert await ledger.flush() == 2
    assert [r[0] for r in store.rows()] == ["k1", "k3"]
    [line] = [json.loads(line) for line in open(ledger.quarantine_path)]
    assert line["reason"].startswith(reason) and line["row"]["key_id"] == "k2"
    await ledger.close()


async def test_a_batch_of_many_rows_is_stored_whole_in_order_and_a_refused_row_alone_is_set_aside(store):
    # More rows than one multi-row statement holds, and a remainder: each row once, in order, fields intact.
    ledger = store.ledger()
    await ledger.open()
    store.refuse_key("bad")
    for i in range(123):
        ledger.add(rec(key="bad" if i == 70 else f"k{i}", tin=i))
    assert await ledger.flush() == 122
    assert store.rows() == [(f"k{i}", "gpt-4o", i, 250.0, "ok", 200) for i in range(123) if i != 70]
    [line] = [json.loads(line) for line in open(ledger.quarantine_path)]
    assert line["row"]["key_id"] == "bad" and line["row"]["tokens_in"] == 70
    for i in range(100):  # exactly two statements' worth, no remainder
        ledger.add(rec(key="again", tin=i))
    assert await ledger.flush() == 100
    assert [r[2] for r in store.rows() if r[0] == "again"] == list(range(100))
    await ledger.close()


async def test_a_new_file_indexes_by_team_only_the_rows_of_a_team(tmp_path):
    ledger = UsageLedger(str(tmp_path / "u.db"))
    await ledger.open()
    with sqlite3.connect(ledger.path) as c:
        (sql,) = c.execute("SELECT sql FROM sqlite_master WHERE name = 'usage_team_ts'").fetchone()
        assert sql.endswith("WHERE team IS NOT NULL")
        plan = " ".join(r[-1] for r in c.execute(
            "EXPLAIN QUERY PLAN SELECT COUNT(*) FROM usage WHERE team = ? AND ts >= ?", ("t", 0.0)))
        assert "usage_team_ts" in plan  # a lookup by team still uses it
        # Append-only ids need no AUTOINCREMENT bookkeeping table.
        assert c.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'sqlite_sequence'").fetchone() == (0,)
    await ledger.close()


async def test_a_database_from_before_request_ids_gets_the_column(tmp_path):
    path = str(tmp_path / "usage.db")
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE usage (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, key_id TEXT,"
                  " provider TEXT NOT NULL, model TEXT NOT NULL, endpoint TEXT NOT NULL, tokens_in INTEGER NOT NULL,"
                  " tokens_out INTEGER NOT NULL, cost REAL NOT NULL, latency_ms REAL NOT NULL, status TEXT NOT NULL,"
                  " http_status INTEGER NOT NULL)")
        c.execute("INSERT INTO usage (ts, key_id, provider, model, endpoint, tokens_in, tokens_out, cost, latency_ms,"
                  " status, http_status) VALUES (1, 'old', 'p', 'm', 'chat', 1, 2, 0.0, 5.0, 'ok', 200)")
    ledger = UsageLedger(path)
    await ledger.open()
    ledger.add(rec(key="new"))
    await ledger.flush()
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT key_id, request_id FROM usage ORDER BY id").fetchall() == [("old", None), ("new", "r")]
    await ledger.close()


async def test_a_batch_retried_after_a_commit_whose_answer_was_lost_is_stored_once(postgres_url, tmp_path):
    import psycopg

    store = Store("postgres", tmp_path, postgres_url)
    ledger = await opened(store, ["k0", "k1"])
    insert = ledger.backend.insert

    def committed_then_cut(rows):
        insert(rows)  # the server commits...
        raise psycopg.OperationalError("server closed the connection unexpectedly")  # ...the answer is lost

    ledger.backend.insert = committed_then_cut
    with pytest.raises(psycopg.OperationalError):
        await ledger.flush()
    ledger.backend.insert = insert
    ledger.add(rec(key="k2"))
    assert ledger.pending == 3
    await ledger.flush()
    assert [r[0] for r in store.rows()] == ["k0", "k1", "k2"] and ledger.quarantined == 0
    await ledger.close()


async def test_postgres_down_at_open_starts_degraded_and_a_stop_quarantines_what_is_buffered(tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ledger = UsageLedger(str(tmp_path / "usage"), backend=PostgresLedgerBackend(f"postgresql://u:pw@127.0.0.1:{port}/x"))
    await ledger.open()  # no error: the first flush connects
    status = ledger.status()
    assert status.state == "degraded" and status.where == f"postgresql://***@127.0.0.1:{port}/x"
    assert "pw" not in status.last_error
    ledger.add(rec(key="k0"))
    ledger.add(rec(key="k1"))
    with pytest.raises(ledger.backend.failures):
        await ledger.flush()
    assert ledger.pending == 2
    assert await ledger.quarantine_pending("stopping") == 2
    assert ledger.pending == 0 and ledger.quarantined == 2 and ledger.lost == 0
    lines = [json.loads(line) for line in open(ledger.quarantine_path)]
    assert [(x["row"]["key_id"], x["reason"]) for x in lines] == [("k0", "stopping"), ("k1", "stopping")]
    await ledger.close()


async def test_a_postgres_that_stops_answering_fails_the_flush_instead_of_holding_it(postgres_url, tmp_path,
                                                                                     monkeypatch):
    import os
    import signal

    from runestone.storage import postgres

    monkeypatch.setattr(postgres, "OPERATION_TIMEOUT", 0.5)  # real seconds: what a wait on the server may take
    store = Store("postgres", tmp_path, postgres_url)
    ledger = await opened(store, ["k0"])
    assert await ledger.flush() == 1
    backend_pid = ledger.backend._session._conn.info.backend_pid
    os.kill(backend_pid, signal.SIGSTOP)  # the server process of the ledger's connection freezes
    try:
        ledger.add(rec(key="k1"))
        with pytest.raises(ledger.backend.failures):
            await ledger.flush()  # returns (with the failure) instead of waiting forever
        assert ledger.pending == 1 and ledger.status().state == "degraded"
    finally:
        os.kill(backend_pid, signal.SIGCONT)
    ledger.add(rec(key="k2"))
    await ledger.flush()  # on a new connection
    assert sorted(r[0] for r in store.rows()) == ["k0", "k1", "k2"] and ledger.status().state == "ok"
    await ledger.close()
