"""``[database] url``: the ledger, keys and teams in Postgres, shared by every instance; migrations that hold
when instances start together; and a Postgres killed and restarted under load.

Every test runs against a real Postgres server on loopback (``pgserver``): the session's, with a fresh
database per test, or (for the kill) one of its own. The gateways are real ``runestone serve`` processes.
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import psycopg
import pytest
import trio

from runestone import storage
from runestone.storage.migrations import MIGRATIONS

from gatewaytest import free_port, provider_toml, start_gateway_process, wait_ready

ADMIN_KEY = "ak-postgres-admin"
CLIENT_KEY = "ck-postgres-client"


def _config(tmp_path, name: str, database_url: str, extra: str = "") -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'[data]\ndir = "{tmp_path / name}"\n[auth]\napi_keys = ["{CLIENT_KEY}"]\nadmin_key = "{ADMIN_KEY}"\n'
                    f'[database]\nurl = "{database_url}"\n[telemetry]\nledger_flush_ms = 200\n' + extra
                    + provider_toml("fake", "fake", models=["fake-model"]))
    return str(path)


class Instance:
    def __init__(self, tmp_path, name: str, database_url: str) -> None:
        self.tmp_path, self.name = tmp_path, name
        self.config = _config(tmp_path, name, database_url)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.runs = 0

    async def start(self) -> None:
        self.runs += 1
        self.proc = start_gateway_process(self.config, self.port, self.tmp_path / f"{self.name}.log{self.runs}")
        await wait_ready(self.url, self.proc)

    async def stop(self) -> int:
        """SIGTERM (a graceful stop flushes the ledger); the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return await trio.to_thread.run_sync(self.proc.wait, 60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def instances(tmp_path):
    made: list[Instance] = []

    def make(name: str, database_url: str) -> Instance:
        made.append(Instance(tmp_path, name, database_url))
        return made[-1]

    yield make
    for inst in made:
        inst.kill()


def _table(url: str, sql: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


# -- migrations ------------------------------------------------------------------------------------------


def test_migrations_are_applied_once_even_by_instances_starting_together(postgres_url):
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []
    applied: list[list[int]] = []

    def start_one() -> None:
        try:
            conn = psycopg.connect(postgres_url, autocommit=True)
            barrier.wait(timeout=30)
            try:
                applied.append(storage.migrate(conn))
            finally:
                conn.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start_one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    versions = [m.version for m in MIGRATIONS]
    # One of them applied every migration, the others found them applied.
    assert sorted(applied, key=len) == [[]] * 7 + [versions]
    assert _table(postgres_url, "SELECT version FROM schema_migrations ORDER BY version") == [(v,) for v in versions]
    # Idempotent: again, nothing to do, and connect() (which migrates) works on the migrated database.
    with storage.connect(postgres_url) as conn:
        assert storage.migrate(conn) == []
        assert conn.execute("SELECT count(*) FROM usage").fetchone() == (0,)


def test_a_database_migrated_by_a_newer_runestone_is_refused_with_the_reason(postgres_url):
    storage.connect(postgres_url).close()
    _table_exec(postgres_url, "INSERT INTO schema_migrations (version, name) VALUES (999, 'from the future')")
    with pytest.raises(storage.DatabaseError, match="schema is at version 999, newer than this Runestone"):
        storage.connect(postgres_url)


def _table_exec(url: str, sql: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)


# -- the ledger across three instances -------------------------------------------------------------------


async def test_the_ledger_in_postgres_equals_what_the_clients_of_three_instances_received(postgres_url, instances):
    fleet = [instances(f"gw{i}", postgres_url) for i in range(3)]
    async with trio.open_nursery() as n:
        for inst in fleet:
            n.start_soon(inst.start)
    received: dict[str, tuple[int, int]] = {}
    per_instance = 40

    async def client(inst: Instance, w: int) -> None:
        async with httpx.AsyncClient(base_url=inst.url, timeout=30) as http:
            for i in range(per_instance // 2):
                rid = f"{inst.name}-w{w}-{i}"
                stream = i % 3 == 0
                body = {"model": "fake-model", "stream": stream, "messages": [{"role": "user", "content": rid * (i + 1)}]}
                if stream:
                    body["stream_options"] = {"include_usage": True}
                r = await http.post("/v1/chat/completions", json=body,
                                    headers={"authorization": f"Bearer {CLIENT_KEY}", "x-request-id": rid})
                assert r.status_code == 200, r.text
                if stream:
                    import orjson

                    chunks = [orjson.loads(line[6:]) for line in r.text.splitlines()
                              if line.startswith("data: {")]
                    usage = [c["usage"] for c in chunks if c.get("usage")][-1]
                else:
                    usage = r.json()["usage"]
                received[rid] = (usage["prompt_tokens"], usage["completion_tokens"])

    async with trio.open_nursery() as n:
        for inst in fleet:
            for w in range(2):
                n.start_soon(client, inst, w)
    async with trio.open_nursery() as n:
        for inst in fleet:
            async def stop(inst=inst):
                assert await inst.stop() == 0
            n.start_soon(stop)

    rows = _table(postgres_url, "SELECT request_id, tokens_in, tokens_out, status, http_status FROM usage")
    assert len(rows) == len(received) == 3 * per_instance  # one row per answer, none twice, none extra
    assert {r[0]: (r[1], r[2]) for r in rows} == received
    assert {(r[3], r[4]) for r in rows} == {("ok", 200)}

    # Any instance reads the whole fleet's ledger back: one restarted on a new data directory.
    reader = instances("reader", postgres_url)
    await reader.start()
    async with httpx.AsyncClient(base_url=reader.url, timeout=30) as http:
        r = await http.get("/v1/usage?group_by=model", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, r.text
    totals = r.json()["totals"]
    assert totals["requests"] == len(received)
    assert totals["tokens_in"] == sum(t for t, _ in received.values())
    assert totals["tokens_out"] == sum(t for _, t in received.values())
    assert await reader.stop() == 0


# -- keys and teams --------------------------------------------------------------------------------------


async def test_keys_and_teams_made_on_one_instance_are_there_after_a_restart_on_another(postgres_url, instances):
    first = instances("first", postgres_url)
    await first.start()
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=first.url, timeout=30) as http:
        r = await http.post("/admin/teams", headers=admin, json={"name": "eng", "budget": {"usd": 5, "period": "month"}})
        assert r.status_code == 201, r.text
        r = await http.post("/admin/keys", headers=admin, json={"name": "ci", "team": "eng", "models": ["fake-model"]})
        assert r.status_code == 201, r.text
        secret, kid = r.json()["secret"], r.json()["id"]
        r = await http.post("/v1/chat/completions", headers={"authorization": f"Bearer {secret}"},
                            json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
    assert await first.stop() == 0
    # The secret itself is not in the database, only its digest.
    assert secret not in str(_table(postgres_url, "SELECT id, digest, doc FROM keys"))

    # Another instance, its data directory empty: everything comes from Postgres.
    second = instances("second", postgres_url)
    await second.start()
    async with httpx.AsyncClient(base_url=second.url, timeout=30) as http:
        team = (await http.get("/admin/teams/eng", headers=admin)).json()
        assert team["keys"] == [kid] and team["budget"] == {"usd": 5.0, "period": "month"}
        assert team["spend"]["requests"] == 1
        r = await http.post("/v1/chat/completions", headers={"authorization": f"Bearer {secret}"},
                            json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        r = await http.post("/v1/chat/completions", headers={"authorization": "Bearer rsk-not-a-key"},
                            json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 401
    assert await second.stop() == 0
    assert not (first.tmp_path / "second" / "keys.sqlite3").exists()


# -- Postgres killed and restarted under load ------------------------------------------------------------


async def test_postgres_killed_and_restarted_under_load_costs_no_request_and_no_row(tmp_path, instances):
    from pgserver import PostgresServer, postgres_bin

    server = PostgresServer(postgres_bin())
    server.start()
    try:
        await _kill_and_restart_under_load(tmp_path, instances, server)
    finally:
        server.close()


async def _kill_and_restart_under_load(tmp_path, instances, server) -> None:
    inst = instances("gw", server.url())
    await inst.start()
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    answered: list[str] = []
    statuses: dict[int, int] = {}
    stop = trio.Event()

    async def worker(w: int) -> None:
        async with httpx.AsyncClient(base_url=inst.url, timeout=30) as http:
            for i in range(100_000):
                if stop.is_set():
                    return
                rid = f"w{w}-{i}"
                body = {"model": "fake-model", "stream": i % 2 == 1, "messages": [{"role": "user", "content": rid}]}
                r = await http.post("/v1/chat/completions", json=body, headers={**headers, "x-request-id": rid})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    answered.append(rid)

    async def ledger(http) -> dict:
        r = await http.get("/health/detailed", headers=admin)
        assert r.status_code == 200, r.text
        return r.json()["ledger"]

    async def until(predicate, what: str) -> None:
        with trio.fail_after(120):  # bounded; only a hang trips it (no timing is asserted)
            while not await predicate():
                await trio.sleep(0.05)

    async with httpx.AsyncClient(base_url=inst.url, timeout=30) as http, trio.open_nursery() as n:
        for w in range(4):
            n.start_soon(worker, w)
        await until(lambda: _async(len(answered) >= 100), "load")
        await trio.to_thread.run_sync(server.kill)
        # The ledger notices at its next flush, and says so; requests go on being answered.
        await until(lambda: _state(ledger(http), "degraded"), "degraded")
        metrics = (await http.get("/metrics", headers=admin)).text
        assert 'runestone_ledger_degraded{backend="postgres"} 1' in metrics
        during = len(answered)
        await until(lambda: _async(len(answered) >= during + 200), "load while down")
        status = await ledger(http)
        assert status["last_error"] and status["failures"] >= 1 and status["lost"] == 0
        r = await http.get("/v1/usage", headers=admin)
        assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable"
        await trio.to_thread.run_sync(server.start)
        restarted = time.monotonic()
        await until(lambda: _state(ledger(http), "ok"), "resumed")
        resumed_after = time.monotonic() - restarted
        metrics = (await http.get("/metrics", headers=admin)).text
        assert 'runestone_ledger_degraded{backend="postgres"} 0' in metrics
        after = len(answered)
        await until(lambda: _async(len(answered) >= after + 100), "load after")
        stop.set()
    assert await inst.stop() == 0
    assert set(statuses) == {200}, statuses  # no 5xx, nor anything else, at any point
    rows = [r[0] for r in _table(server.url(), "SELECT request_id FROM usage")]
    assert len(rows) == len(set(rows)) == len(answered)  # none twice
    assert set(rows) == set(answered)  # every answered request, also those answered while Postgres was down
    print(f"answered {len(answered)} ({after - during} while Postgres was down); resumed {resumed_after:.2f} s "
          f"after Postgres was back")


async def _async(value):
    return value


async def _state(status, wanted: str) -> bool:
    return (await status)["state"] == wanted


# -- the control store -----------------------------------------------------------------------------------


async def test_a_provider_registered_on_one_instance_is_there_after_a_restart_on_another(postgres_url, instances):
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    client = {"authorization": f"Bearer {CLIENT_KEY}"}
    first = instances("first", postgres_url)
    await first.start()
    async with httpx.AsyncClient(base_url=first.url, timeout=30) as http:
        r = await http.post("/admin/providers", headers=admin, json={
            "name": "added", "type": "fake", "config": {"models": ["added-model"], "api_key": "sk-added-secret",
                                                       "text": "added at run time"}})
        assert r.status_code == 201, r.text
        r = await http.delete("/admin/providers/fake", headers=admin)  # a configured one, removed at run time
        assert r.status_code == 200, r.text
    assert await first.stop() == 0
    assert not (first.tmp_path / "first" / "control.json").exists()  # in Postgres, not in the data directory
    [(doc,)] = _table(postgres_url, "SELECT doc FROM control_state")
    assert b"sk-added-secret" in bytes(doc)  # whole, as a restart needs it (the database is the operator's)

    second = instances("second", postgres_url)
    await second.start()
    async with httpx.AsyncClient(base_url=second.url, timeout=30) as http:
        names = [p["name"] for p in (await http.get("/admin/providers", headers=admin)).json()["data"]]
        assert names == ["added"]
        r = await http.post("/v1/chat/completions", headers=client,
                            json={"model": "added-model", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("added at run time")
    assert await second.stop() == 0


# -- an instance that starts without its database ----------------------------------------------------------


async def test_an_instance_starts_without_its_database_and_catches_up_when_it_comes(tmp_path, instances):
    from pgserver import PostgresServer, postgres_bin

    server = PostgresServer(postgres_bin())  # made (initdb), not started: the first ever start finds it down
    try:
        await _start_without_database(tmp_path, instances, server)
    finally:
        server.close()


async def _start_without_database(tmp_path, instances, server) -> None:
    url = server.url().replace("runestone@", "runestone:pw-secret@")  # trust auth: the password only must not leak
    inst = instances("gw", url)
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    answered: list[str] = []

    async def serve(http, n: int, prefix: str, headers: dict) -> None:
        for i in range(n):
            rid = f"{prefix}-{i}"
            r = await http.post("/v1/chat/completions", headers={**headers, "x-request-id": rid},
                                json={"model": "fake-model", "stream": i % 2 == 1,
                                      "messages": [{"role": "user", "content": rid}]})
            assert r.status_code == 200, r.text
            answered.append(rid)

    async def database(http) -> dict:
        r = await http.get("/health/detailed", headers=admin)
        assert r.status_code == 200, r.text
        assert "pw-secret" not in r.text
        return r.json()

    async def until(predicate) -> None:
        with trio.fail_after(120):  # bounded; only a hang trips it (no timing is asserted)
            while not await predicate():
                await trio.sleep(0.05)

    await inst.start()  # Postgres is down, and there is no local copy yet: the configuration's keys only
    async with httpx.AsyncClient(base_url=inst.url, timeout=30) as http:
        detailed = await database(http)
        assert detailed["database"]["state"] == "degraded" and detailed["database"]["keys"] == "nothing"
        assert detailed["database"]["control"] == "nothing"
        await serve(http, 20, "down", {"authorization": f"Bearer {CLIENT_KEY}"})
        assert (await database(http))["ledger"]["state"] == "degraded"
        r = await http.post("/admin/keys", headers=admin, json={"name": "made-while-down"})
        assert r.status_code == 201, r.text  # in force here, waiting in the local outbox for the database
        early = r.json()
        await serve(http, 2, "early", {"authorization": f"Bearer {early['secret']}"})
        assert (await database(http))["database"]["outbox"]["keys"] == 1
        await trio.to_thread.run_sync(server.start)
        # Migrations run on the first connection, the key store is read again, the buffered rows are flushed.
        await until(lambda: _database_ok(database(http)))
        await until(lambda: _async(len(_table(url, "SELECT request_id FROM usage")) >= len(answered)))
        assert _table(url, f"SELECT id FROM keys WHERE id = '{early['id']}'") == [(early["id"],)]
        r = await http.post("/admin/keys", headers=admin, json={"name": "made-after"})
        assert r.status_code == 201, r.text
        secret = r.json()["secret"]
        await serve(http, 10, "up", {"authorization": f"Bearer {secret}"})
    assert await inst.stop() == 0
    log = (tmp_path / "gw.log1").read_text()
    assert "starting without the database" in log and "the configuration's keys only" in log
    assert "pw-secret" not in log
    rows = [r[0] for r in _table(url, "SELECT request_id FROM usage")]
    assert len(rows) == len(set(rows)) == len(answered) and set(rows) == set(answered)  # each once
    assert _table(url, "SELECT count(*) FROM schema_migrations") == [(len(MIGRATIONS),)]

    # Down again: the next start reads keys from the local copy the database left in the data directory.
    await trio.to_thread.run_sync(server.stop)
    await inst.start()
    async with httpx.AsyncClient(base_url=inst.url, timeout=30) as http:
        detailed = await database(http)
        assert detailed["database"]["state"] == "degraded" and detailed["database"]["keys"] == "local copy"
        await serve(http, 4, "copy", {"authorization": f"Bearer {secret}"})  # the managed key, from the copy
    assert await inst.stop() == 0


async def _database_ok(detailed) -> bool:
    d = await detailed
    return d["database"]["state"] == "ok" and d["ledger"]["state"] == "ok"
