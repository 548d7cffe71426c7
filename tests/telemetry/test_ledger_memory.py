"""The usage ledger's memory is bounded: SQLite's page cache does not grow with the rows written.

SQLite allocates outside Python (tracemalloc does not see it), so this reads ``sqlite3_memory_used()``, the
bytes SQLite itself holds, from the library the ``sqlite3`` module is linked with.
"""

import ctypes
import sqlite3

import pytest

from runestone.telemetry.events import RequestFinished
from runestone.telemetry.ledger import UsageLedger


def _sqlite_memory_used():
    import _sqlite3

    try:
        used = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used
    except (OSError, AttributeError):
        pytest.skip("this Python's sqlite3 does not export sqlite3_memory_used")
    used.restype = ctypes.c_int64
    return used


def _record(i: int) -> RequestFinished:
    return RequestFinished(
        request_id=f"r{i}", key_id=None, provider="up", model="gpt-4o-mini", endpoint="chat", stream=True,
        status="error", http_status=499, error_type="client_disconnected", latency=0.01, ttft=0.01,
        tokens_in=0, tokens_out=0, cost=0.0, retries=0, failovers=0, route_reason="", wall_time=1_700_000_000.0 + i,
    )


async def _write(ledger: UsageLedger, start: int, n: int) -> None:
    for i in range(start, start + n):
        ledger.add(_record(i))
        if ledger.pending >= 500:
            await ledger.flush()
    await ledger.flush()


async def test_memory_stays_flat_however_many_rows_are_written(tmp_path):
    used = _sqlite_memory_used()
    ledger = UsageLedger(str(tmp_path / "usage.sqlite3"))
    await ledger.open()
    await _write(ledger, 0, 5_000)  # warm-up: the cache fills to its bound
    before = used()
    await _write(ledger, 5_000, 20_000)
    grown = used() - before
    await ledger.close()
    with sqlite3.connect(ledger.path) as c:
        assert c.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 25_000
    # With SQLite's default 2 MB page cache this was ~1.5 MB: every page appended stayed cached.
    assert grown < 128 * 1024, grown
