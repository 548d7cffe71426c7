"""The usage ledger: buffered batch writes, persistence across reopen, summaries."""

import json
import sqlite3

import pytest

from runestone.telemetry.events import RequestFinished
from runestone.telemetry.ledger import UsageLedger

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


async def test_add_buffers_and_flush_writes_in_one_batch(tmp_path):
    path = str(tmp_path / "usage.db")
    ledger = UsageLedger(path)
    await ledger.open()
    for _ in range(5):
        ledger.add(rec())
    assert ledger.pending == 5
    assert rows(path) == []  # nothing touches the disk before a flush
    assert await ledger.flush() == 5
    assert ledger.pending == 0 and ledger.written == 5
    assert rows(path) == [("k1", "gpt-4o", 10, 250.0, "ok", 200)] * 5
    assert await ledger.flush() == 0
    await ledger.close()


async def test_wal_mode(tmp_path):
    ledger = UsageLedger(str(tmp_path / "u.db"))
    await ledger.open()
    with sqlite3.connect(ledger.path) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    await ledger.close()


async def test_close_flushes_and_reopen_keeps_rows(tmp_path):
    path = str(tmp_path / "usage.db")
    ledger = UsageLedger(path)
    await ledger.open()
    ledger.add(rec())
    await ledger.flush()
    ledger.add(rec(key="k2"))
    await ledger.close()  # the unflushed one is written here
    await ledger.close()  # idempotent

    again = UsageLedger(path)
    await again.open()
    again.add(rec(key="k3"))
    await again.flush()
    assert await again.totals() == {"requests": 3, "tokens_in": 30, "tokens_out": 60, "cost": pytest.approx(0.03),
                                    "errors": 0}
    await again.close()


async def test_summary_by_model_and_day_with_key_filter(tmp_path):
    ledger = UsageLedger(str(tmp_path / "usage.db"))
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


async def test_failed_write_keeps_the_batch_for_the_next_flush(tmp_path):
    path = str(tmp_path / "usage.db")
    ledger = UsageLedger(path, max_buffer=3)
    await ledger.open()
    for i in range(2):
        ledger.add(rec(key=f"k{i}"))
    with sqlite3.connect(path) as c:  # make inserts fail: a column the writer does not fill becomes required
        c.execute("ALTER TABLE usage RENAME TO usage_old")
    with pytest.raises(sqlite3.OperationalError):
        await ledger.flush()
    assert ledger.pending == 2
    ledger.add(rec(key="k2"))
    ledger.add(rec(key="k3"))
    with pytest.raises(sqlite3.OperationalError):
        await ledger.flush()
    assert ledger.pending == 3 and ledger.lost == 1  # bounded: the oldest went
    with sqlite3.connect(path) as c:
        c.execute("ALTER TABLE usage_old RENAME TO usage")
    assert await ledger.flush() == 3
    assert [r[0] for r in rows(path)] == ["k1", "k2", "k3"]
    await ledger.close()


async def test_flush_before_open_is_an_error(tmp_path):
    ledger = UsageLedger(str(tmp_path / "u.db"))
    ledger.add(rec())
    with pytest.raises(RuntimeError):
        await ledger.flush()


async def test_add_with_cost_override(tmp_path):
    ledger = UsageLedger(str(tmp_path / "u.db"))
    await ledger.open()
    ledger.add(rec(cost=0.0), cost=0.25)
    ledger.add(rec(cost=0.5))
    await ledger.close()
    with sqlite3.connect(ledger.path) as c:
        assert [r[0] for r in c.execute("SELECT cost FROM usage ORDER BY id")] == [0.25, 0.5]


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


async def test_rows_it_cannot_store_are_quarantined_and_the_rest_of_the_batch_is_stored(tmp_path):
    path = str(tmp_path / "usage.db")
    ledger = UsageLedger(path)
    await ledger.open()
    ledger.add(rec(key="before"))
    for fields in POISONED.values():
        ledger.add(poisoned(**fields))
    ledger.add(object())  # not a record at all
    ledger.add(rec(key="after", tin=1))
    assert await ledger.flush() == 2
    assert [(k, t) for k, _, t, *_ in rows(path)] == [("before", 10), ("after", 1)]
    assert ledger.quarantined == len(POISONED) + 1 and ledger.pending == 0 and ledger.lost == 0
    lines = [json.loads(line) for line in open(ledger.quarantine_path)]
    assert len(lines) == len(POISONED) + 1
    assert lines[0]["reason"] == "tokens_in out of range" and lines[0]["row"]["tokens_in"] == 2**64
    assert lines[0]["row"]["request_id"] == "r" and lines[0]["row"]["key_id"] == "k1"
    assert lines[6]["reason"] == "cost out of range" and lines[6]["row"]["cost"] == "nan"
    assert lines[9]["row"]["model"].endswith("...[100000 characters]")
    # Text SQLite cannot encode passes the checks; the insert refuses it, and that row alone is set aside.
    assert lines[-1]["reason"].startswith("UnicodeEncodeError") and lines[-1]["row"]["key_id"] == "\ud800"
    assert lines[-1]["row"]["latency"] == 0.25  # as the record had it
    # The ledger goes on as before.
    ledger.add(rec(key="later"))
    assert await ledger.flush() == 1
    assert (await ledger.totals())["requests"] == 3
    await ledger.close()


async def test_a_row_sqlite_refuses_after_the_checks_is_quarantined_alone(tmp_path, monkeypatch):
    path = str(tmp_path / "usage.db")
    ledger = UsageLedger(path)
    await ledger.open()
    with sqlite3.connect(path) as c:  # a constraint the checks know nothing of
        c.execute("CREATE TRIGGER no_k2 BEFORE INSERT ON usage WHEN NEW.key_id = 'k2' "
                  "BEGIN SELECT RAISE(ABORT, 'k2 refused'); END")
    for key in ("k1", "k2", "k3"):
        ledger.add(rec(key=key))
    assert await ledger.flush() == 2
    assert [r[0] for r in rows(path)] == ["k1", "k3"]
    [line] = [json.loads(line) for line in open(ledger.quarantine_path)]
    assert line["reason"] == "IntegrityError: k2 refused" and line["row"]["key_id"] == "k2"
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
