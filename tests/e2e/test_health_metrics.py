"""Health endpoints, Prometheus metrics and the usage summary, observed over HTTP on a live gateway."""

from runestone.telemetry.messages import Summary
import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from gatewaytest import provider_toml

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "count me"}]}


def _samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def _settle(gw) -> None:
    # Telemetry is asynchronous by design; a call through the handler's mailbox orders us after every cast.
    await gw.app.registry.whereis("telemetry_handler").call(Summary())


async def test_liveness_readiness_and_provider_health(gateway_factory):
    gw = await gateway_factory('[auth]\napi_keys = ["k1"]\n' + provider_toml("fake", "fake", models=["fake-model"]))
    async with httpx.AsyncClient(base_url=gw.url) as http:
        live = await http.get("/health")
        assert live.status_code == 200 and live.json()["status"] == "ok"
        ready = await http.get("/health/ready")
        assert ready.status_code == 200 and ready.json()["usable_providers"] == ["fake"]
        assert (await http.get("/health/providers")).status_code == 401  # not public
        h = {"authorization": "Bearer k1"}
        providers = (await http.get("/health/providers", headers=h)).json()
        fake = providers["providers"]["fake"]
        assert fake["healthy"] is True and fake["circuit_state"] == "closed" and fake["health_score"] == 1.0
        assert providers["status"] == "healthy"
        detailed = (await http.get("/health/detailed", headers=h)).json()
        assert [c["id"] for c in detailed["tree"]] == [
            "telemetry_handler", "circuit_breaker_manager", "enhanced_provider_supervisor", "failover_manager",
            "provider_pool", "alias_watcher", "key_store", "front"]


async def test_ready_is_503_when_no_provider_is_usable(gateway_factory):
    gw = await gateway_factory(provider_toml("fake", "fake", models=["fake-model"]))
    gw.app.providers.mark_draining("fake")
    async with httpx.AsyncClient(base_url=gw.url) as http:
        ready = await http.get("/health/ready")
    assert ready.status_code == 503 and ready.json()["reason"] == "no provider can take requests"


async def test_metrics_parse_and_count_the_requests_made(gateway_factory):
    gw = await gateway_factory(provider_toml("fake", "fake", models=["fake-model"]))
    async with httpx.AsyncClient(base_url=gw.url) as http:
        for _ in range(7):
            assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
        for _ in range(3):
            assert (await http.post("/v1/chat/completions", json={**CHAT, "stream": True})).status_code == 200
        assert (await http.post("/v1/chat/completions", json={**CHAT, "model": "nope"})).status_code == 404
        await _settle(gw)
        text = (await http.get("/metrics")).text
        s = _samples(text)
        ok = s[("runestone_requests_total", (("endpoint", "chat"), ("model", "fake-model"), ("provider", "fake"),
                                             ("status", "ok")))]
        assert ok == 10
        assert s[("runestone_request_duration_seconds_count", (("model", "fake-model"), ("provider", "fake")))] == 10
        tokens_out = s[("runestone_tokens_total", (("direction", "out"), ("model", "fake-model"), ("provider", "fake")))]
        assert tokens_out > 0
        assert s[("runestone_telemetry_events_dropped_total", ())] == 0
        summary = (await http.get("/health/metrics")).json()
        assert summary["totals"]["requests"] == 10 and summary["success_rate"] == 1.0


async def test_usage_is_per_key_and_admin_sees_all(gateway_factory):
    gw = await gateway_factory('[auth]\napi_keys = ["alpha", "beta"]\nadmin_key = "root"\n'
                               + provider_toml("fake", "fake", models=["fake-model"]))
    async with httpx.AsyncClient(base_url=gw.url) as http:
        for key, n in (("alpha", 3), ("beta", 2)):
            for _ in range(n):
                r = await http.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"})
                assert r.status_code == 200
        await _settle(gw)
        alpha = (await http.get("/v1/usage", headers={"authorization": "Bearer alpha"})).json()
        assert alpha["totals"]["requests"] == 3
        assert [r["model"] for r in alpha["rows"]] == ["fake-model"]
        everyone = (await http.get("/v1/usage", headers={"authorization": "Bearer root"})).json()
        assert everyone["totals"]["requests"] == 5
        assert "alpha" not in str(everyone) and "beta" not in str(everyone)  # keys appear only as key ids


async def test_route_header_names_the_policy_and_the_candidates_in_order(gateway_factory):
    gw = await gateway_factory(provider_toml("a", "fake", models=["m"], priority=1)
                               + provider_toml("b", "fake", models=["m"], priority=2))
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/v1/chat/completions", json={**CHAT, "model": "m"})
    assert r.headers["x-runestone-provider"] == "a"
    assert r.headers["x-runestone-route"] == "policy=default; candidates=a,b"
