"""With ``[database] url`` the budget journal stays in the data directory: a SIGKILL loses no settled spend.

A real gateway process in Postgres mode with a managed key in a team (both with budgets) and a flush
interval far longer than the run (``[budgets] flush_ms``): nothing of the run's spend reaches Postgres
before the kill, so only the local journal holds it. Four clients keep the gateway busy with answers of
known cost while two streams are held open by the upstream; then SIGKILL, and a restart on the same data
directory and database. The spend rows in Postgres are then what the clients received, give or take the
answers settled in the instant before the kill that were still on their way (at most one per client, never
less than received); the held streams' reservations are released; and a second restart replays nothing
again (the checkpoint's floor, per data directory, is in Postgres with the spend).
"""

from __future__ import annotations

import re

import psycopg
import pytest

from budgettest import ANSWER_USD, budget_config, spend_after_restart, spend_then_sigkill
from gatewaytest import start_gateway_process

ADMIN = {"authorization": "Bearer ak-pg-journal"}
WORKERS = 4
HELD = 2
ENOUGH = 150


def _spend(url: str) -> dict:
    with psycopg.connect(url) as conn:
        return {(s, n): (nano, req) for s, n, nano, req in
                conn.execute("SELECT scope, name, nano, requests FROM spend").fetchall()}


async def test_a_sigkill_in_postgres_mode_loses_no_settled_spend(tmp_path, gated_factory, postgres_url):
    upstream, gate, _ = await gated_factory(after=1, text="aaa bbb ccc ddd", chunks=1)
    config, url, port = budget_config(tmp_path, upstream, "ak-pg-journal", f'[database]\nurl = "{postgres_url}"\n'
                                      '[budgets]\nflush_ms = 3600000\n[telemetry]\nusage_ledger = false\n')
    proc = start_gateway_process(config, port, tmp_path / "log1")
    key_id, received = await spend_then_sigkill(url, proc, gate, admin=ADMIN, team="pg", workers=WORKERS, held=HELD,
                                                enough=ENOUGH)
    before = _spend(postgres_url)
    assert before.get(("key", key_id), (0, 0))[0] == 0  # the run's spend never reached Postgres: only the journal

    for run in (2, 3):  # the restart replays the journal into Postgres; the next one finds nothing to replay
        key, _ = await spend_after_restart(config, url, port, tmp_path / f"log{run}", admin=ADMIN, key_id=key_id,
                                           team="pg")
        stored = _spend(postgres_url)
        got = sum(received)
        nano, requests = stored[("key", key_id)]
        extra = round((nano / 1e9 - got) / ANSWER_USD, 6)
        assert extra == int(extra) and 0 <= extra <= WORKERS, (run, nano, got)
        assert stored[("team", "pg")][0] == nano
        assert key["spent_usd"] == pytest.approx(nano / 1e9) and key["reserved_usd"] == 0
        assert requests == len(received) + extra  # those that ended (the held streams had not)
        log = (tmp_path / f"log{run}").read_text()
        m = re.search(r"budget journal replayed .*?: (\d+) ended request\(s\) counted", log)
        if run == 2:
            assert m, log
            assert int(m.group(1)) == requests
            first = stored
        else:
            assert not m, log  # replayed once: the floor was stored with the spend
            assert stored == first
    print(f"received {len(received)} answers (${got:.3f}); Postgres holds ${nano / 1e9:.3f} ({int(extra)} in transit)")
