"""Breakers fleet-wide: three ``runestone serve`` processes and one redis-server.

Two ``openai`` providers serve one model, ``primary`` preferred; the fake upstream behind ``primary``
answers 500. Failures through instance 0 open its breaker, and the other two route away from ``primary``
without sending it anything; once the open period is over, a request on each instance at once sends one
half-open probe to ``primary`` in all (the probe slots are the fleet's, ``half_open_limit = 1``), where three
separate instances would each send their own.

States are polled under generous bounds; nothing asserts how long anything took.
"""

from __future__ import annotations

import time

import httpx
import orjson
import trio

from runestone.cluster.breakers import STATE_KEY

from fleettest import Fleet
from gatewaytest import fake_requests, provider_toml

MODEL = "gpt-4o-mini"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}


def _config(primary_port: int, backup_port: int, recovery_ms: int) -> str:
    return (
        "[telemetry]\nusage_ledger = false\n"
        f"[circuit_breaker]\nfailure_threshold = 3\nrecovery_timeout_ms = {recovery_ms}\n"
        "half_open_limit = 1\nsuccess_threshold = 1\n"
        + provider_toml("primary", "openai", base_url=f"http://127.0.0.1:{primary_port}/v1", api_key="k",
                        models=[MODEL], priority=1)
        + provider_toml("backup", "openai", base_url=f"http://127.0.0.1:{backup_port}/v1", api_key="k",
                        models=[MODEL], priority=2)
    )


async def _until(predicate, what: str, fleet: Fleet, bound: float = 20.0) -> None:
    with trio.move_on_after(bound):
        while not await predicate():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"{what} not reached within {bound} s\n{fleet.logs()}")


async def _circuit(http: httpx.AsyncClient, instance, provider: str = "primary") -> str:
    return (await instance.detailed(http))["providers"][provider]["circuit_state"]


async def test_breaker_opened_on_one_instance_routes_all_away(tmp_path, redis_server, fake_factory):
    primary, knobs = await fake_factory(fault_status=500)
    backup, _ = await fake_factory()
    async with Fleet(tmp_path, redis_server.url, _config(primary.port, backup.port, 600_000)) as fleet:
        async with httpx.AsyncClient(timeout=30) as http:
            for _ in range(3):
                r = await http.post(fleet[0].url + "/v1/chat/completions", json=BODY)
                assert r.status_code == 200 and r.headers["x-runestone-provider"] == "backup", r.text
            assert await fake_requests(primary.port) == 3
            assert await _circuit(http, fleet[0]) == "open"

            async def all_open():
                return all([await _circuit(http, inst) == "open" for inst in fleet.instances[1:]])

            await _until(all_open, "primary's breaker open on instances 1 and 2", fleet)
            for inst in fleet.instances[1:]:
                for _ in range(3):
                    r = await http.post(inst.url + "/v1/chat/completions", json=BODY)
                    assert r.status_code == 200 and r.headers["x-runestone-provider"] == "backup", r.text
            assert await fake_requests(primary.port) == 3  # nobody tried primary again
            metrics = (await http.get(fleet[1].url + "/metrics")).text
            assert "runestone_redis_up 1" in metrics
            cluster = (await fleet[1].detailed(http))["cluster"]
            assert cluster["status"] == "ok" and cluster["breakers"]["followed"] >= 1


async def test_half_open_probes_are_budgeted_fleet_wide(tmp_path, redis_server, fake_factory):
    primary, knobs = await fake_factory(fault_status=500)
    backup, _ = await fake_factory()
    recovery_ms = 1500
    async with Fleet(tmp_path, redis_server.url, _config(primary.port, backup.port, recovery_ms)) as fleet:
        async with httpx.AsyncClient(timeout=60) as http:
            for _ in range(3):
                r = await http.post(fleet[0].url + "/v1/chat/completions", json=BODY)
                assert r.status_code == 200, r.text

            async def all_open():
                return all([await _circuit(http, inst) == "open" for inst in fleet.instances])

            await _until(all_open, "primary open everywhere", fleet)

            # The fleet's open period (wall-clock time, in Redis) over: each instance would now send a probe.
            until = orjson.loads(redis_server.command("HGET", STATE_KEY, "primary"))["u"]

            async def open_period_over():
                return time.time() > until + 0.2

            await _until(open_period_over, "the end of primary's open period", fleet)
            # The probe is held at the upstream while the other two instances ask for theirs.
            knobs.fault_status = 0
            knobs.ttfb_ms = 3000
            before = await fake_requests(primary.port)
            answered = []

            async def ask(inst):
                r = await http.post(inst.url + "/v1/chat/completions", json=BODY)
                assert r.status_code == 200, r.text
                answered.append(r.headers["x-runestone-provider"])

            async with trio.open_nursery() as nursery:
                for inst in fleet.instances:
                    nursery.start_soon(ask, inst)
            assert sorted(answered) == ["backup", "backup", "primary"]
            assert await fake_requests(primary.port) == before + 1
            # The probe succeeded (success_threshold 1): closed there, and so everywhere.

            async def all_closed():
                return all([await _circuit(http, inst) == "closed" for inst in fleet.instances])

            await _until(all_closed, "primary closed everywhere after the probe", fleet)
