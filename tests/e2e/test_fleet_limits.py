"""Limits and budgets exact across the fleet: three ``runestone serve`` processes sharing one redis-server.

- A team budget that fits exactly ten reservations, 300 concurrent requests spread over the three
  instances: exactly ten are admitted (and reach the upstream), and the settled spend is within the budget.
- A requests-per-minute limit held fleet-wide: N + k requests over three instances, exactly N pass (the
  requests are all sent at once; the bucket refills one request per 20 s, far longer than they take).
- Redis killed under load: no 5xx; each instance applies its share (limit / live instances); Redis
  restarted: every instance shares again by itself (polled under a bound).

Waits are polls under generous bounds; nothing asserts how long anything took.
"""

from __future__ import annotations

import httpx
import trio

from fleettest import ADMIN, ASK, Fleet, priced_config, until
from gatewaytest import fake_requests


def _config(upstream_port: int, extra: str = "") -> str:
    return priced_config(upstream_port, ["client-key", "load-key", "probe-key"], extra)


def _bearer(secret: str) -> dict:
    return {"authorization": f"Bearer {secret}"}


async def _limits(http: httpx.AsyncClient, inst) -> dict:
    return (await inst.detailed(http))["cluster"]["limits"]


async def test_a_budget_for_ten_holds_under_300_concurrent_requests_over_three(tmp_path, redis_server, fake_factory):
    upstream, _ = await fake_factory(text="aaa bbb ccc ddd", chunks=1, ttfb_ms=20)
    async with Fleet(tmp_path, redis_server.url, _config(upstream.port), headers=ADMIN) as fleet:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=400)) as http:
            secrets = []
            for i, inst in enumerate(fleet.instances):
                # the team exists on every instance (created there, or shared by the fleet's control stream)
                r = await http.post(inst.url + "/admin/teams", headers=ADMIN,
                                    json={"name": "eng", "budget": {"usd": 0.04, "period": "total"}})
                assert r.status_code in (201, 409), r.text
                r = await http.post(inst.url + "/admin/keys", headers=ADMIN, json={"name": f"k{i}", "team": "eng"})
                assert r.status_code == 201, r.text
                secrets.append(r.json()["secret"])
            before = await fake_requests(upstream.port, http=http)
            outcomes: list[str] = []

            async def one(n: int) -> None:
                i = n % 3
                r = await http.post(fleet[i].url + "/v1/chat/completions", headers=_bearer(secrets[i]), json=ASK)
                if r.status_code == 200:
                    outcomes.append("ok")
                elif r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded":
                    outcomes.append("refused")
                else:
                    outcomes.append(f"{r.status_code} {r.text[:200]}")

            with trio.fail_after(120):  # only a hang trips this
                async with trio.open_nursery() as nursery:
                    for n in range(300):
                        nursery.start_soon(one, n)
            odd = [o for o in outcomes if o not in ("ok", "refused")]
            assert odd == [], odd[:5]
            assert outcomes.count("ok") == 10 and outcomes.count("refused") == 290
            assert await fake_requests(upstream.port, http=http) - before == 10

            period = "runestone:lim:team:eng:p:0"

            async def settled() -> bool:
                return int(redis_server.command("HGET", period, "reserved") or 0) == 0

            await until("every reservation settled in Redis", settled)
            spent = int(redis_server.command("HGET", period, "spent"))
            assert 0 < spent <= 40_000_000  # nano-USD: $0.04
            assert int(redis_server.command("HGET", period, "requests")) == 10


async def test_a_requests_per_minute_limit_holds_across_the_fleet(tmp_path, redis_server, fake_factory):
    upstream, _ = await fake_factory()
    config = _config(upstream.port, "[limits]\nrequests_per_minute = 3\n")
    async with Fleet(tmp_path, redis_server.url, config, headers=ADMIN) as fleet:
        async with httpx.AsyncClient(timeout=60) as http:
            statuses: list[int] = []

            async def one(n: int) -> None:
                r = await http.post(fleet[n % 3].url + "/v1/chat/completions", headers=_bearer("client-key"),
                                    json=ASK)
                statuses.append(r.status_code)
                if r.status_code == 429:
                    assert r.json()["error"]["code"] == "rate_limit_exceeded", r.text

            async with trio.open_nursery() as nursery:
                for n in range(9):  # three per instance: each alone would admit all of its three
                    nursery.start_soon(one, n)
            assert sorted(statuses) == [200] * 3 + [429] * 6


async def test_redis_killed_under_load_gives_the_local_share_and_restarted_shares_again(
        tmp_path, redis_server, fake_factory):
    upstream, _ = await fake_factory()
    config = _config(upstream.port, "[limits]\nrequests_per_hour = 60\n")  # a share of 20 per instance
    async with Fleet(tmp_path, redis_server.url, config, headers=ADMIN) as fleet:
        async with httpx.AsyncClient(timeout=60) as http:
            async def three_live() -> bool:
                return all([(await _limits(http, inst))["instances"] == 3 for inst in fleet.instances])

            await until("three live instances counted by heartbeat", three_live)
            bad: list[str] = []
            load_done = trio.Event()

            async def load() -> None:  # a bounded load on its own key, across the kill and the restart
                for n in range(150):
                    r = await http.post(fleet[n % 3].url + "/v1/chat/completions", headers=_bearer("load-key"),
                                        json=ASK)
                    if r.status_code not in (200, 429):
                        bad.append(f"load {n}: {r.status_code} {r.text[:200]}")
                    if n == 20:
                        redis_server.kill()
                load_done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(load)

                async def all_see_redis_down() -> bool:
                    return redis_server.proc is None and all(
                        [(await inst.detailed(http))["cluster"]["redis"]["state"] != "up" for inst in fleet.instances])

                await until("every instance sees Redis down", all_see_redis_down)
                # Each instance admits its share of client-key's 60 per hour: 20 of 30.
                for inst in fleet.instances:
                    statuses = []
                    for _ in range(30):
                        r = await http.post(inst.url + "/v1/chat/completions", headers=_bearer("client-key"),
                                            json=ASK)
                        statuses.append(r.status_code)
                    assert statuses.count(200) == 20 and statuses.count(429) == 10, statuses
                    assert (await _limits(http, inst))["mode"] == "local"
                    metrics = (await http.get(inst.url + "/metrics", headers=ADMIN)).text
                    assert "runestone_fleet_limits_shared 0" in metrics
                await load_done.wait()
            assert bad == [], bad[:5]

            redis_server.start()

            async def all_shared() -> bool:
                for inst in fleet.instances:
                    await http.post(inst.url + "/v1/chat/completions", headers=_bearer("probe-key"), json=ASK)
                return all([(await _limits(http, inst))["mode"] == "shared" for inst in fleet.instances])

            await until("every instance sharing again", all_shared)
            for inst in fleet.instances:
                metrics = (await http.get(inst.url + "/metrics", headers=ADMIN)).text
                assert "runestone_fleet_limits_shared 1" in metrics
            # shared again: client-key's fleet-wide bucket in the new Redis holds, over the three, 60 more
            statuses = []
            for n in range(63):
                r = await http.post(fleet[n % 3].url + "/v1/chat/completions", headers=_bearer("client-key"),
                                    json=ASK)
                statuses.append(r.status_code)
            assert statuses.count(200) == 60 and statuses.count(429) == 3
