"""/dashboard without a browser: who may see it, what its feed sends, and that it costs nothing unwatched.

(tests/e2e/test_dashboard_browser.py drives the page itself in Chromium.)
"""

from __future__ import annotations

import base64

import httpx
import orjson
import pytest
import trio
import trio.testing

from gatewaytest import provider_toml
from runestone.front.dashboard import EVENTS_PER_TICK, FeedWindow
from runestone.telemetry.events import BreakerTransition

ADMIN = "ak-DASHBOARD-ADMIN-1111"
CLIENT = "ck-DASHBOARD-CLIENT-2222"


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0.01)


def _basic(password: str) -> dict:
    return {"authorization": "Basic " + base64.b64encode(f"operator:{password}".encode()).decode()}


async def test_the_admin_key_opens_it_as_bearer_or_basic_password(gateway_factory, fake_only_toml):
    gw = await gateway_factory(f'[auth]\napi_keys = ["{CLIENT}"]\nadmin_key = "{ADMIN}"\n' + fake_only_toml)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        for path in ("/dashboard", "/dashboard/dashboard.js", "/dashboard/state", "/dashboard/feed"):
            r = await http.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"].startswith("Basic realm=")
            assert r.json()["error"]["code"] == "invalid_api_key"
            for wrong in ({"authorization": f"Bearer {CLIENT}"}, _basic(CLIENT), {"authorization": "Basic !!"}):
                assert (await http.get(path, headers=wrong)).status_code == 401, (path, wrong)
        page = await http.get("/dashboard", headers=_basic(ADMIN))
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script src="/dashboard/dashboard.js">' in page.text and "http" not in page.text.split("<body>")[1]
        assert "script-src 'self'" in page.headers["content-security-policy"]
        js = await http.get("/dashboard/dashboard.js", headers={"authorization": f"Bearer {ADMIN}"})
        assert js.status_code == 200 and "EventSource" in js.text
        state = await http.get("/dashboard/state", headers={"authorization": f"Bearer {ADMIN}"})
        assert state.status_code == 200
        text = state.text
    assert ADMIN not in text and CLIENT not in text


async def test_closed_without_an_admin_key_unless_open_mode(gateway_factory, fake_only_toml):
    closed = await gateway_factory(f'[auth]\napi_keys = ["{CLIENT}"]\n' + fake_only_toml)
    opened = await gateway_factory(fake_only_toml)
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(closed.url + "/dashboard", headers={"authorization": f"Bearer {CLIENT}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
        assert (await http.get(opened.url + "/dashboard")).status_code == 200


async def test_state_shows_the_tree_providers_groups_and_requests(gateway_factory, fake_only_toml):
    gw = await gateway_factory(fake_only_toml)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        r = await http.post("/v1/chat/completions", json={"model": "fake-model", "messages": [{"role": "user",
                                                                                                "content": "hi"}]})
        assert r.status_code == 200
        tick = (await http.get("/dashboard/state")).json()
    assert tick["type"] == "tick"
    tree = tick["tree"]
    assert tree["id"] == "runestone" and tree["kind"] == "supervisor"
    ids = [c["id"] for c in tree["children"]]
    assert ids[:2] == ["telemetry_handler", "circuit_breaker_manager"] and ids[-1] == "front"
    handler = tree["children"][0]
    assert handler["status"] == "running" and handler["restarts"] == 0 and handler["mailbox"][1] == 10_000
    assert "snapshot" not in handler
    supervisor = next(c for c in tree["children"] if c["id"] == "enhanced_provider_supervisor")
    assert [c["id"] for c in supervisor["children"]] == ["fake"]
    (fake,) = tick["providers"]
    assert fake["name"] == "fake" and fake["type"] == "fake" and fake["breaker"] == "closed"
    assert fake["in_flight"] == 0 and fake["status"] == "running"
    assert [g["name"] for g in tick["groups"]] == ["default"]
    assert tick["in_flight"] == {"count": 0, "oldest": []}


async def test_the_feed_ticks_with_the_events_and_leaves_no_subscription_behind(clock, gateway_factory,
                                                                                fake_only_toml):
    gw = await gateway_factory(fake_only_toml)
    handler = gw.app.registry.whereis("telemetry_handler").actor
    assert handler.subscribers == []
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        async with http.stream("GET", "/dashboard/feed") as feed:
            assert feed.headers["content-type"].startswith("text/event-stream")
            lines = feed.aiter_lines()

            async def tick() -> dict:
                async for line in lines:
                    if line.startswith("data: "):
                        return orjson.loads(line[6:])
                raise AssertionError("the feed ended")

            first = await tick()
            assert first["tree"]["id"] == "runestone" and first["providers"][0]["name"] == "fake"
            assert len(handler.subscribers) == 1 and gw.app.dashboard.feeds == 1
            for i in range(3):
                r = await http.post("/v1/chat/completions", json={"model": "fake-model", "stream": i == 0,
                                                                  "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200
            bad = await http.post("/v1/chat/completions", json={"model": "fake-model", "runestone": {"prefer": 5},
                                                                "messages": [{"role": "user", "content": "hi"}]})
            assert bad.status_code == 400
            gw.app.telemetry.emit(BreakerTransition("fake", "closed", "open", "test"))
            seen = {"attempts": 0, "finished": 0, "events": []}
            for _ in range(5):
                t = await tick()
                seen["attempts"] += t["window"].get("fake", {}).get("attempts", 0)
                seen["finished"] += t["requests"]["finished"]
                seen["events"] += t["events"]
                if seen["finished"] >= 3 and seen["events"]:
                    break
            assert seen["attempts"] == 3 and seen["finished"] == 3
            kinds = [e["kind"] for e in seen["events"]]
            # The transition, then the health alert it causes; request outcomes come aggregated, not as events.
            assert kinds[0] == "breaker_transition" and "provider_unhealthy" in kinds
            assert not {"attempt_finished", "request_finished"} & set(kinds)
            assert t["keys"][0]["key_id"] == "(no key)" and t["keys"][0]["requests"] == 3
    # The client went away: the feed left the handler's list, nothing runs for it any more.
    for _ in range(100):
        if not handler.subscribers and gw.app.dashboard.feeds == 0:
            break
        await trio.sleep(0.05)
    assert handler.subscribers == [] and gw.app.dashboard.feeds == 0


async def test_a_feed_resumes_after_the_telemetry_handler_restarts(clock, gateway_factory, fake_only_toml):
    gw = await gateway_factory(fake_only_toml)
    app = gw.app
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        async with http.stream("GET", "/dashboard/feed") as feed:
            lines = feed.aiter_lines()

            async def tick() -> dict:
                async for line in lines:
                    if line.startswith("data: "):
                        return orjson.loads(line[6:])
                raise AssertionError("the feed ended")

            await tick()
            old = app.registry.whereis("telemetry_handler")

            async def boom(message):
                raise RuntimeError("injected crash in telemetry_handler")

            old.actor.handle_cast = boom
            old.cast(("injected",))
            restarted = None
            for _ in range(20):
                t = await tick()
                node = next(c for c in t["tree"]["children"] if c["id"] == "telemetry_handler")
                if node["restarts"] == 1:
                    restarted = node
                    break
            assert restarted is not None and "injected crash" in restarted["last_error"]
            new = app.registry.whereis("telemetry_handler")
            assert new is not old
            for _ in range(20):
                await tick()
                if new.actor.subscribers:
                    break
            assert len(new.actor.subscribers) == 1
            r = await http.post("/v1/chat/completions", json={"model": "fake-model",
                                                              "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
            for _ in range(5):
                t = await tick()
                if t["requests"]["finished"]:
                    break
            assert t["requests"]["finished"] == 1


def test_a_tick_forwards_a_bounded_number_of_events():
    window = FeedWindow()
    for i in range(EVENTS_PER_TICK * 3):
        window.add({"kind": "retry_scheduled", "provider": "p", "attempt": 2, "delay": 0.1, "reason": "x"})
    for i in range(5000):
        window.add({"kind": "attempt_finished", "provider": "p", "model": "m", "ok": i % 10 != 0,
                    "error_type": None, "latency": (i % 100) / 1000, "ttft": None})
    out = window.take()
    assert len(out["events"]) == EVENTS_PER_TICK and out["events_skipped"] == EVENTS_PER_TICK * 2
    p = out["window"]["p"]
    assert p["attempts"] == 5000 and p["errors"] == 500
    assert 0.04 <= p["p50"] <= 0.06 and p["p95"] >= 0.09 and p["ttft_p50"] is None
    assert window.take()["window"] == {}


PRICED = '[pricing."fake-model"]\ninput_per_mtok = 0.0\noutput_per_mtok = 1000.0\n'  # an output token: $0.001


async def _spend_setup(gateway_factory, fake_factory):
    """A gateway with an admin key, a team of two managed keys and a key of no team, each having spent."""
    upstream, _ = await fake_factory(text="aaa bbb ccc ddd", chunks=1)
    gw = await gateway_factory(f'[auth]\nadmin_key = "{ADMIN}"\n' + PRICED + provider_toml(
        "up", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1", api_key="sk-up", models=["fake-model"]))
    admin = {"authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        for team in ("search", "support"):
            assert (await http.post("/admin/teams", headers=admin, json={"name": team})).status_code == 201
        keys = {}
        for name, team in (("indexer", "search"), ("ranker", "search"), ("helpdesk", "support"), ("lonely", None)):
            r = await http.post("/admin/keys", headers=admin, json={"name": name, "team": team})
            assert r.status_code == 201, r.text
            keys[name] = r.json()
        for name, n in (("indexer", 3), ("ranker", 1), ("helpdesk", 2), ("lonely", 1)):
            for _ in range(n):
                r = await http.post("/v1/chat/completions", headers={"authorization": f"Bearer {keys[name]['secret']}"},
                                    json={"model": "fake-model", "max_tokens": 4,
                                          "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200, r.text
    return gw, keys


async def test_the_feed_shows_the_busiest_managed_keys_and_teams_by_spend(gateway_factory, fake_factory):
    gw, keys = await _spend_setup(gateway_factory, fake_factory)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        async with http.stream("GET", "/dashboard/feed", headers={"authorization": f"Bearer {ADMIN}"}) as feed:
            async for line in feed.aiter_lines():
                if line.startswith("data: "):
                    tick = orjson.loads(line[6:])
                    break
    spend = tick["spend"]
    assert [(k["key_name"], k["team"], k["requests"]) for k in spend["keys"]] == [
        ("indexer", "search", 3), ("helpdesk", "support", 2), ("ranker", "search", 1), ("lonely", None, 1)]
    assert spend["keys"][0]["name"] == keys["indexer"]["id"]
    assert spend["keys"][0]["spent_usd"] == pytest.approx(3 * 4 * 0.001)
    assert [(t["name"], t["requests"]) for t in spend["teams"]] == [("search", 4), ("support", 2)]
    assert spend["teams"][0]["spent_usd"] == pytest.approx(4 * 4 * 0.001)
    # never a secret
    assert not any(k["secret"] in line for k in keys.values())
