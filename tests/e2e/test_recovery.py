"""A healed provider gets its traffic back, whatever excluded it: its health score, its breaker, a drain.

Real gateways and fake upstreams on loopback, time on a MockClock (a wait is a clock jump, never a sleep
of real time). Two ``openai`` providers serve one model; ``primary`` is preferred, its fake upstream is
made to fail and then healed, and each test states the time within which ``primary`` serves again:

* health (breaker off, active health checks off as by default): set aside below the 0.5 threshold, it
  gets one passive probe per 5 s, and is back to its normal share within 35 s of healing;
* breaker: open -> half-open after ``recovery_timeout`` -> closed after ``success_threshold`` probes:
  back within ``recovery_timeout`` of healing, first again in its priority group's listed order;
* drain: unregistered while others serve, registered again, or updated (a drain and a new registration):
  first again at once.
"""

from __future__ import annotations

import httpx
import pytest
import trio
import trio.testing

from gatewaytest import fake_requests, provider_toml

MODEL = "gpt-4o-mini"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
ADMIN = {"authorization": "Bearer admin-key"}
#: What a request of these tests may take on the MockClock: the clock jumps to the next deadline (the
#: telemetry handler's 0.2 s tick at most) whenever the machine leaves every task waiting 10 ms.
CADENCE_SLACK = 0.5


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0.01)


def _openai(name: str, port: int, **config) -> str:
    return provider_toml(name, "openai", base_url=f"http://127.0.0.1:{port}/v1", api_key="k", models=[MODEL],
                         **config)


async def _until(predicate, what: str) -> None:
    """Wait (bounded, without moving the clock) until the tree has published what ``predicate`` wants."""
    for _ in range(200):
        if predicate():
            return
        await trio.testing.wait_all_tasks_blocked(0.001)
    raise AssertionError(f"never published: {what}")


def _score(app, provider: str) -> float:
    table = app.health.value
    view = table.get(provider) if table is not None else None
    return 1.0 if view is None else view.score


async def _failing_primary_and_backup(gateway_factory, fake_factory, head: str = "", **primary_config):
    """A gateway with ``primary`` (preferred; its fake upstream answers 500 until healed) and ``backup``:
    (the started gateway, primary's upstream port, primary's knobs)."""
    primary, knobs = await fake_factory(fault_status=500)
    backup, _ = await fake_factory()
    gw = await gateway_factory(
        head + "[telemetry]\nusage_ledger = false\n"
        + _openai("primary", primary.port, priority=1, **primary_config)
        + _openai("backup", backup.port, priority=2))
    return gw, primary.port, knobs


async def _who(http: httpx.AsyncClient, model: str = MODEL) -> str:
    r = await http.post("/chat/completions", json={**BODY, "model": model})
    assert r.status_code == 200, r.text
    return r.headers["x-runestone-provider"]


async def test_a_provider_set_aside_for_health_is_probed_and_back_within_35s_of_healing(
        clock, gateway_factory, fake_factory):
    # No breaker on primary: only its health score can exclude it.
    gw, primary_port, knobs = await _failing_primary_and_backup(gateway_factory, fake_factory,
                                                                circuit_breaker=False)
    app = gw.app
    async with httpx.AsyncClient(base_url=gw.v1, timeout=60) as http:
        # A burst of failures: (0 + 2) / (3 + 2) = 0.4 after three, below the 0.5 threshold.
        for n in (1, 2, 3):
            assert await _who(http) == "backup"
            assert await fake_requests(primary_port) == n
        await _until(lambda: _score(app, "primary") < 0.5, "primary below the threshold")

        # Set aside, still broken: its first probe at once, then one per 5 s however many requests come
        # (one every 0.2 s here). The gateway's own record of each probe is the time it was claimed.
        probes = app.selector.probes.last
        claims: list[float] = []
        started = trio.current_time()
        while trio.current_time() - started < 12.0:
            assert await _who(http) == "backup"
            if not claims or probes["primary"] != claims[-1]:
                claims.append(probes["primary"])
            await trio.sleep(0.2)
        assert claims[0] == started
        assert len(claims) >= 2 and all(b - a >= 5.0 for a, b in zip(claims, claims[1:])), claims
        assert all(b - a <= 5.0 + 0.2 + CADENCE_SLACK for a, b in zip(claims, claims[1:])), claims
        assert await fake_requests(primary_port) == 3 + len(claims)
        assert _score(app, "primary") < 0.5

        # Healed. One request every 0.5 s: the probes now succeed (and answer their clients), the failures
        # age out of the health window, and primary is first for every request again within 35 s (plus the
        # 0.5 s between two requests of this test).
        knobs.fault_status = 0
        healed = trio.current_time()
        served: list[tuple[float, str]] = []
        while trio.current_time() - healed < 60.0:
            served.append((trio.current_time() - healed, await _who(http)))
            if [p for _, p in served[-10:]] == ["primary"] * 10:
                break
            await trio.sleep(0.5)
        back = [t for t, p in served if p == "primary"]
        assert back and back[0] <= 5.0 + 0.5 + CADENCE_SLACK, served  # the first probe after healing
        assert [p for _, p in served[-10:]] == ["primary"] * 10, served
        normal_since = served[-10][0]
        assert normal_since <= 35.0 + 0.5 + CADENCE_SLACK, served
        # Before that, a probe at most every 5 s: the share it had while set aside stayed bounded.
        assert len(back) - 10 <= 7, served
        assert _score(app, "primary") >= 0.5


async def test_a_priority_group_member_whose_breaker_opened_is_first_again_after_recovery(
        clock, gateway_factory, fake_factory):
    recovery = 5.0
    first, knobs = await fake_factory(fault_status=500)
    second, _ = await fake_factory()
    gw = await gateway_factory(
        "[telemetry]\nusage_ledger = false\n"
        f"[circuit_breaker]\nfailure_threshold = 3\nrecovery_timeout_ms = {int(recovery * 1000)}\n"
        "half_open_limit = 1\nsuccess_threshold = 2\n"
        # Listed order, not names, decides: "zeta" is listed first, both keep the default priority.
        '[[failover.groups]]\nname = "chat"\nproviders = ["zeta", "alpha"]\nstrategy = "priority"\n'
        + _openai("alpha", second.port) + _openai("zeta", first.port))
    app = gw.app

    def breaker(state: str):
        return lambda: getattr((app.breaker_views.value or {}).get("zeta"), "state", None) == state

    async with httpx.AsyncClient(base_url=gw.v1, timeout=60) as http:
        knobs.fault_status = 0
        assert await _who(http, "chat") == "zeta"
        knobs.fault_status = 500
        for _ in range(3):
            assert await _who(http, "chat") == "alpha"
        await _until(breaker("open"), "zeta's breaker open")
        seen = await fake_requests(first.port)
        assert await _who(http, "chat") == "alpha"
        assert await fake_requests(first.port) == seen  # open: not even tried

        # Healed: the first request after recovery_timeout is its half-open probe, the next one closes it
        # (success_threshold 2), and it is first again. One request every 0.5 s.
        knobs.fault_status = 0
        healed = trio.current_time()
        served: list[tuple[float, str]] = []
        while trio.current_time() - healed < 30.0 and [p for _, p in served[-3:]] != ["zeta"] * 3:
            served.append((trio.current_time() - healed, await _who(http, "chat")))
            await trio.sleep(0.5)
        assert [p for _, p in served[-3:]] == ["zeta"] * 3, served
        assert served[-3][0] <= recovery + 0.5 + CADENCE_SLACK, served
        assert all(p == "alpha" for t, p in served if t < recovery - CADENCE_SLACK), served
        await _until(breaker("closed"), "zeta's breaker closed")


async def test_a_priority_group_tries_the_second_member_when_the_first_is_refused_by_its_breaker(
        clock, gateway_factory, fake_factory):
    recovery = 5.0
    first, knobs = await fake_factory(fault_status=500)
    second, _ = await fake_factory()
    third, _ = await fake_factory()
    gw = await gateway_factory(
        "[telemetry]\nusage_ledger = false\n"
        f"[circuit_breaker]\nfailure_threshold = 1\nrecovery_timeout_ms = {int(recovery * 1000)}\n"
        "half_open_limit = 1\nsuccess_threshold = 1\n"
        '[[failover.groups]]\nname = "chat"\nproviders = ["p1", "p2", "p3"]\nstrategy = "priority"\n'
        + _openai("p1", first.port) + _openai("p2", second.port) + _openai("p3", third.port))
    app = gw.app
    async with httpx.AsyncClient(base_url=gw.v1, timeout=60) as http:
        assert await _who(http, "chat") == "p2"  # p1 failed: its breaker opens
        await _until(lambda: (app.breaker_views.value or {}).get("p1") is not None
                     and app.breaker_views.value["p1"].state == "open", "p1 open")
        # Due for a probe: a slow one takes p1's only half-open slot ...
        knobs.fault_status = 0
        knobs.ttfb_ms = 10_000
        clock.jump(recovery + 0.5)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_who, http, "chat")
            for _ in range(200):
                if await fake_requests(first.port) == 2:
                    break
                await trio.testing.wait_all_tasks_blocked(0.001)
            # ... so the breaker refuses p1 to the next request, which must go to p2, the next listed.
            assert await _who(http, "chat") == "p2"
            nursery.cancel_scope.cancel()


async def test_a_provider_unregistered_and_registered_again_is_first_again_at_once(
        clock, gateway_factory, fake_factory):
    gw, primary_port, knobs = await _failing_primary_and_backup(gateway_factory, fake_factory,
                                                                '[auth]\nadmin_key = "admin-key"\n')
    app = gw.app
    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as http:
        v1 = httpx.AsyncClient(base_url=gw.v1, timeout=60)
        async with v1:
            # Failing, then demoted by its score: the operator takes it out.
            for _ in range(3):
                assert await _who(v1) == "backup"
            await _until(lambda: _score(app, "primary") < 0.5, "primary below the threshold")
            r = await http.delete("/admin/providers/primary", headers=ADMIN)
            assert r.status_code == 200 and r.json()["drained"] is True, r.text
            assert await _who(v1) == "backup"
            # Fixed and registered again: it starts afresh and is first at once.
            knobs.fault_status = 0
            seen = await fake_requests(primary_port)
            r = await http.post("/admin/providers", headers=ADMIN, json={
                "name": "primary", "type": "openai",
                "config": {"base_url": f"http://127.0.0.1:{primary_port}/v1", "api_key": "k", "models": [MODEL],
                           "priority": 1}})
            assert r.status_code == 201, r.text
            assert [await _who(v1) for _ in range(5)] == ["primary"] * 5
            assert await fake_requests(primary_port) == seen + 5


async def test_a_provider_updated_while_set_aside_for_health_is_first_again_at_once(
        clock, gateway_factory, fake_factory):
    """An update is a drain and a new registration: the new settings start with a clean record."""
    gw, primary_port, knobs = await _failing_primary_and_backup(gateway_factory, fake_factory,
                                                                '[auth]\nadmin_key = "admin-key"\n',
                                                                circuit_breaker=False)
    app = gw.app
    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as http, \
            httpx.AsyncClient(base_url=gw.v1, timeout=60) as v1:
        for _ in range(3):
            assert await _who(v1) == "backup"
        await _until(lambda: _score(app, "primary") < 0.5, "primary below the threshold")
        knobs.fault_status = 0
        r = await http.patch("/admin/providers/primary", headers=ADMIN, json={"config": {"timeout_ms": 30_000}})
        assert r.status_code == 200, r.text
        await _until(lambda: _score(app, "primary") == 1.0, "primary's record started afresh")
        assert [await _who(v1) for _ in range(5)] == ["primary"] * 5
