"""Redis stopped (SIGSTOP: slow, then silent), resumed, killed and restarted while three instances serve.

Load: a bounded number of requests (chat, cached chat, and stored Responses), a few at a time, spread over
the three. Every one must succeed: Redis going away never crashes the tree and never turns a request that
would succeed without Redis into a 5xx. When Redis is back, every instance is connected again by itself
and shared operation resumes: a breaker opened through one instance opens on the others.

Phases are set by how many requests have completed, not by time; waits are polls under generous bounds.
"""

from __future__ import annotations

import itertools

import httpx
import trio

from fleettest import Fleet
from gatewaytest import provider_toml

MODEL = "gpt-4o-mini"
TOTAL = 500
CONCURRENCY = 6


def _config(primary_port: int, backup_port: int) -> str:
    return (
        "[telemetry]\nusage_ledger = false\n[cache]\nenabled = true\nttl_ms = 600000\n"
        "[circuit_breaker]\nfailure_threshold = 3\nrecovery_timeout_ms = 600000\n"
        + provider_toml("primary", "openai", base_url=f"http://127.0.0.1:{primary_port}/v1", api_key="k",
                        models=[MODEL], priority=1)
        + provider_toml("backup", "openai", base_url=f"http://127.0.0.1:{backup_port}/v1", api_key="k",
                        models=[MODEL], priority=2)
    )


async def test_redis_stopped_killed_and_restarted_under_load(tmp_path, redis_server, fake_factory):
    primary, primary_knobs = await fake_factory()
    backup, _ = await fake_factory()
    async with Fleet(tmp_path, redis_server.url, _config(primary.port, backup.port)) as fleet:
        done = 0
        failures: list[str] = []
        counter = itertools.count()
        phases = {100: redis_server.pause, 180: redis_server.resume, 260: redis_server.kill,
                  340: redis_server.start}

        async def one(http: httpx.AsyncClient, n: int) -> None:
            inst = fleet[n % 3]
            kind = n % 4
            if kind == 3:
                body = {"model": MODEL, "input": f"request {n}", "store": True}
                r = await http.post(inst.url + "/v1/responses", json=body)
            else:
                # kind 0 repeats one question (cache hits, local or shared); the others are all different
                text = "the same question" if kind == 0 else f"request {n}"
                r = await http.post(inst.url + "/v1/chat/completions",
                                    json={"model": MODEL, "messages": [{"role": "user", "content": text}]})
            if r.status_code != 200:
                failures.append(f"{n} on gw{n % 3}: {r.status_code} {r.text[:200]}")

        async def worker(http: httpx.AsyncClient) -> None:
            nonlocal done
            while (n := next(counter)) < TOTAL:
                await one(http, n)
                done += 1
                action = phases.pop(done, None)
                if action is not None:
                    action()

        with trio.fail_after(240):  # only a hang trips this
            async with httpx.AsyncClient(timeout=60) as http:
                async with trio.open_nursery() as nursery:
                    for _ in range(CONCURRENCY):
                        nursery.start_soon(worker, http)
        assert failures == [], "\n".join(failures[:20]) + "\n" + fleet.logs()
        assert done == TOTAL and not phases
        assert all(inst.proc.poll() is None for inst in fleet.instances)

        await fleet.wait_shared()  # every instance reconnected by itself
        async with httpx.AsyncClient(timeout=30) as http:
            for inst in fleet.instances:
                detailed = await inst.detailed(http)
                assert detailed["cluster"]["status"] == "ok"
                restarted = {c["id"]: c["restarts"] for c in detailed["tree"] if c["restarts"]}
                assert restarted == {}, restarted  # Redis going away crashed nothing
                assert all(c["status"] == "running" for c in detailed["tree"]), detailed["tree"]
            # Shared again: a breaker opened through instance 0 opens on the others.
            primary_knobs.fault_status = 500
            for n in range(3):
                r = await http.post(fleet[0].url + "/v1/chat/completions",
                                    json={"model": MODEL, "messages": [{"role": "user", "content": f"fail {n}"}]})
                assert r.status_code == 200 and r.headers["x-runestone-provider"] == "backup"
            with trio.move_on_after(20) as scope:
                for inst in fleet.instances[1:]:
                    while (await inst.detailed(http))["providers"]["primary"]["circuit_state"] != "open":
                        await trio.sleep(0.02)
            assert not scope.cancelled_caught, "the breaker did not open fleet-wide after Redis came back"
