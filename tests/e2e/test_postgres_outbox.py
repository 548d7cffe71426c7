"""``[database] url`` while Postgres cannot answer: key, team and control changes are answered and in force at
once and wait in the local outbox, then reach Postgres once each, in order; ledger rows a failed flush spooled
survive a SIGKILL; a control document another instance changed meanwhile is merged, not a cause to stay
degraded.

Real Postgres servers on loopback (``pgserver``), real ``runestone serve`` processes (``test_postgres``'s).
"""

from __future__ import annotations

import sqlite3

import httpx
import psycopg
import pytest
import trio

from test_postgres import ADMIN_KEY, CLIENT_KEY, Instance, _table, instances  # noqa: F401 - the fixture

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
CLIENT = {"authorization": f"Bearer {CLIENT_KEY}"}


async def _until(predicate) -> None:
    with trio.fail_after(120):  # bounded; only a hang trips it (no timing is asserted)
        while not await predicate():
            await trio.sleep(0.05)


async def _detailed(http) -> dict:
    r = await http.get("/health/detailed", headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


async def _chat(http, model: str, headers: dict, rid: str | None = None) -> httpx.Response:
    return await http.post("/v1/chat/completions", headers={**headers, **({"x-request-id": rid} if rid else {})},
                           json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


def _provider(name: str) -> dict:
    return {"name": name, "type": "fake", "config": {"models": [f"{name}-model"], "api_key": f"sk-{name}-secret",
                                                    "text": f"from {name}"}}


@pytest.fixture
def server():
    """A Postgres server of the test's own (it is stopped and started again)."""
    from pgserver import PostgresServer, postgres_bin

    server = PostgresServer(postgres_bin())
    server.start()
    yield server
    server.close()


async def _started_then_cut(server, instances, name: str) -> tuple[str, Instance]:
    """An instance started with its database, then the database stopped."""
    inst = instances(name, server.url())
    await inst.start()
    await trio.to_thread.run_sync(server.stop)
    return server.url(), inst


async def test_changes_made_while_postgres_is_stopped_are_in_force_at_once_and_reach_it_once(tmp_path, server,
                                                                                            instances):
    url, first = await _started_then_cut(server, instances, "first")
    async with httpx.AsyncClient(base_url=first.url, timeout=60) as http:
        r = await http.post("/admin/teams", headers=ADMIN, json={"name": "eng"})
        assert r.status_code == 201, r.text
        r = await http.post("/admin/keys", headers=ADMIN, json={"name": "while-down", "team": "eng"})
        assert r.status_code == 201, r.text
        secret, kid = r.json()["secret"], r.json()["id"]
        r = await http.post("/admin/providers", headers=ADMIN, json=_provider("added"))
        assert r.status_code == 201, r.text
        # In force here at once: the new key authenticates, the new provider serves.
        r = await _chat(http, "fake-model", {"authorization": f"Bearer {secret}"})
        assert r.status_code == 200, r.text
        r = await _chat(http, "added-model", CLIENT)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("from added")
        database = (await _detailed(http))["database"]
        assert database["state"] == "degraded" and database["outbox"] == {"keys": 2, "control": 1}
        # The outbox holds digests and names, never a secret.
        for name in ("keys.copy.sqlite3", "control.outbox.json"):
            assert secret.encode() not in (tmp_path / "first" / name).read_bytes()
        assert b"sk-added-secret" not in (tmp_path / "first" / "control.outbox.json").read_bytes()

        await trio.to_thread.run_sync(server.start)

        async def drained() -> bool:
            d = (await _detailed(http))["database"]
            return d["state"] == "ok" and d["outbox"] == {"keys": 0, "control": 0}

        await _until(drained)
    assert _table(url, "SELECT id FROM keys") == [(kid,)]
    assert _table(url, "SELECT name FROM teams") == [("eng",)]
    [(doc,)] = _table(url, "SELECT doc FROM control_state")
    assert b'"added"' in bytes(doc)
    # Each outbox entry written once: the two key-store changes and the one control change.
    assert sorted(n for (n,) in _table(url, "SELECT count(*) FROM outbox_applied GROUP BY origin")) == [1, 2]
    assert await first.stop() == 0

    # A second instance on the same database, its data directory empty, sees them.
    second = instances("second", url)
    await second.start()
    async with httpx.AsyncClient(base_url=second.url, timeout=60) as http:
        r = await _chat(http, "added-model", {"authorization": f"Bearer {secret}"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("from added")
        assert (await http.get("/admin/teams/eng", headers=ADMIN)).json()["keys"] == [kid]
    assert await second.stop() == 0


async def test_ledger_rows_spooled_while_postgres_is_stopped_survive_a_sigkill(server, instances):
    url, inst = await _started_then_cut(server, instances, "gw")
    answered = []
    async with httpx.AsyncClient(base_url=inst.url, timeout=60) as http:
        for i in range(25):
            r = await _chat(http, "fake-model", CLIENT, rid=f"down-{i}")
            assert r.status_code == 200, r.text
            answered.append(f"down-{i}")

        async def spooled() -> bool:
            ledger = (await _detailed(http))["ledger"]
            return ledger["spooled"] == len(answered) and ledger["pending"] == 0

        await _until(spooled)  # a failed flush committed them to the local spool
    inst.kill()  # SIGKILL: nothing is flushed on the way out
    await trio.to_thread.run_sync(server.start)
    await inst.start()
    async with httpx.AsyncClient(base_url=inst.url, timeout=60) as http:
        async def stored() -> bool:
            return (await _detailed(http))["ledger"]["spooled"] == 0
        await _until(stored)
    assert await inst.stop() == 0
    rows = [r for (r,) in _table(url, "SELECT request_id FROM usage")]
    assert sorted(rows) == sorted(answered)  # each once


def _exec(url: str, sql: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)


async def test_a_control_document_another_instance_changed_meanwhile_is_merged(postgres_url, instances):
    # The first instance reaches the database as its own role: taking the role's login away (and cutting its
    # connections) is the database going away for that instance only, while the second one goes on using it.
    _exec(postgres_url, "CREATE ROLE cut_off SUPERUSER LOGIN")
    cut_url = postgres_url.replace("runestone@", "cut_off@")
    first, second = instances("first", cut_url), instances("second", postgres_url)
    await first.start()
    await second.start()
    async with httpx.AsyncClient(base_url=first.url, timeout=60) as a, \
            httpx.AsyncClient(base_url=second.url, timeout=60) as b:
        _exec(postgres_url, "ALTER ROLE cut_off NOLOGIN")
        _exec(postgres_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'cut_off'")
        r = await a.post("/admin/providers", headers=ADMIN, json=_provider("from-a"))
        assert r.status_code == 201, r.text
        r = await a.delete("/admin/providers/fake", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert (await _detailed(a))["database"]["outbox"]["control"] == 2
        # Meanwhile the other instance changes the document this one has not loaded.
        r = await b.post("/admin/providers", headers=ADMIN, json=_provider("from-b"))
        assert r.status_code == 201, r.text
        _exec(postgres_url, "ALTER ROLE cut_off LOGIN")

        async def merged() -> bool:
            d = (await _detailed(a))["database"]
            return d["state"] == "ok" and d["outbox"]["control"] == 0

        await _until(merged)

        async def adopted() -> bool:
            return (await _chat(a, "from-b-model", CLIENT)).status_code == 200

        await _until(adopted)  # the other instance's change is in force here too
        r = await _chat(a, "from-a-model", CLIENT)
        assert r.status_code == 200, r.text
        names = sorted(p["name"] for p in (await a.get("/admin/providers", headers=ADMIN)).json()["data"])
        assert names == ["from-a", "from-b"]  # this instance's removal of "fake" held too
    [(doc,)] = _table(postgres_url, "SELECT doc FROM control_state")
    doc = bytes(doc)
    assert b'"from-a"' in doc and b'"from-b"' in doc and b'"removed_providers": [\n    "fake"' in doc
    assert await first.stop() == 0
    assert await second.stop() == 0
    # Restarted on the merged document: both instances hold the same state.
    await second.start()
    async with httpx.AsyncClient(base_url=second.url, timeout=60) as b:
        names = sorted(p["name"] for p in (await b.get("/admin/providers", headers=ADMIN)).json()["data"])
        assert names == ["from-a", "from-b"]
    assert await second.stop() == 0


async def test_an_outbox_change_postgres_refuses_is_set_aside_and_the_changes_after_it_reach_it(tmp_path, server,
                                                                                             instances):
    url = server.url()
    inst = instances("gw", url)
    await inst.start()
    _exec(url, "ALTER TABLE teams ADD CONSTRAINT no_refused CHECK (name <> 'refused')")
    await trio.to_thread.run_sync(server.stop)
    async with httpx.AsyncClient(base_url=inst.url, timeout=60) as http:
        for name in ("refused", "ok"):
            r = await http.post("/admin/teams", headers=ADMIN, json={"name": name})
            assert r.status_code == 201, r.text
        r = await http.post("/admin/keys", headers=ADMIN, json={"name": "after-refused", "team": "ok"})
        assert r.status_code == 201, r.text
        secret, kid = r.json()["secret"], r.json()["id"]
        assert (await _detailed(http))["database"]["outbox"]["keys"] == 3

        await trio.to_thread.run_sync(server.start)

        async def drained() -> bool:
            d = (await _detailed(http))["database"]
            return d["state"] == "ok" and d["outbox"]["keys"] == 0

        await _until(drained)  # the refused change at the outbox's head did not hold up the two after it
        assert (await _detailed(http))["database"]["refused"] == {"keys": 1}
        assert _table(url, "SELECT name FROM teams ORDER BY name") == [("ok",)]
        assert _table(url, "SELECT id FROM keys") == [(kid,)]
        assert _table(url, "SELECT count(*) FROM outbox_applied") == [(2,)]  # the refused one left no trace
        # Later changes reach Postgres directly, and the key made after the refused change authenticates.
        r = await http.post("/admin/teams", headers=ADMIN, json={"name": "later"})
        assert r.status_code == 201, r.text
        assert _table(url, "SELECT name FROM teams ORDER BY name") == [("later",), ("ok",)]
        assert (await _detailed(http))["database"]["outbox"]["keys"] == 0
        r = await _chat(http, "fake-model", {"authorization": f"Bearer {secret}"})
        assert r.status_code == 200, r.text
    assert await inst.stop() == 0
    # Set aside in the local copy with the database's reason, counted again after a restart.
    with sqlite3.connect(tmp_path / "gw" / "keys.copy.sqlite3") as copy:
        [(ops, reason)] = copy.execute("SELECT ops, reason FROM outbox_refused").fetchall()
    assert '"refused"' in ops and "no_refused" in reason
    log = (tmp_path / "gw.log1").read_text()
    assert "refused a change that waited in the local outbox, team 'refused'" in log
    await inst.start()
    async with httpx.AsyncClient(base_url=inst.url, timeout=60) as http:
        assert (await _detailed(http))["database"]["refused"] == {"keys": 1}
        # This start read the database: the refused team is no longer in force here.
        assert (await http.get("/admin/teams/refused", headers=ADMIN)).status_code == 404
    assert await inst.stop() == 0
