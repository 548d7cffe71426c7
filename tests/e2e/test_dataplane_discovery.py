"""An ``openai``-type provider configured without a model list asks its upstream's ``GET /v1/models`` at start
and then serves what it listed; one whose upstream cannot answer still starts, serves nothing, and says why."""

import httpx

from gatewaytest import provider_toml


async def test_models_are_discovered_from_the_upstream(gateway_factory, fake_factory):
    upstream, knobs = await fake_factory(models=("disc-a", "disc-b"))
    gw = await gateway_factory(provider_toml("up", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1",
                                             api_key="sk"))
    assert gw.app.providers.value["up"].info.models == frozenset({"disc-a", "disc-b"})
    async with httpx.AsyncClient(base_url=gw.url) as http:
        listed = {m["id"]: m["owned_by"] for m in (await http.get("/v1/models")).json()["data"]}
        assert listed["disc-a"] == "up" and listed["disc-b"] == "up"
        r = await http.post("/v1/chat/completions", json={"model": "disc-b", "messages": [
            {"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.headers["x-runestone-provider"] == "up"


async def test_a_provider_whose_discovery_fails_starts_and_serves_nothing(gateway_factory, fake_factory):
    upstream, _ = await fake_factory()
    gw = await gateway_factory(
        provider_toml("fake", "fake", models=["fake-model"])
        + provider_toml("down", "openai", base_url="http://127.0.0.1:1/v1", api_key="sk-discovery-secret",
                        connect_timeout_ms=500))
    entry = gw.app.providers.value["down"]
    assert entry.info.models == frozenset()
    snap = gw.app.registry.whereis("provider:down").actor.snapshot()
    assert snap.discovery_error and "sk-discovery-secret" not in snap.discovery_error
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/v1/chat/completions", json={"model": "fake-model", "messages": [
            {"role": "user", "content": "hi"}]})
        assert r.status_code == 200  # the rest of the gateway is unaffected
