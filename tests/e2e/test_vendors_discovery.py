"""Model ids as the vendors name them: ``anthropic``, ``gemini`` and ``azure`` providers without a model list learn
theirs from the vendor's listing, dated ids and their aliases are one model, ids the vendor adds later are served
after the next listing (MockClock: an hour passes at once), ``provider:model`` reaches any model the vendor serves,
and ``/v1/models`` says which models came from discovery."""

from __future__ import annotations

import httpx
import pytest
import trio

from gatewaytest import provider_toml

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0.01)


async def _models(gw) -> dict:
    async with httpx.AsyncClient(base_url=gw.url) as http:
        return {m["id"]: m for m in (await http.get("/v1/models")).json()["data"]}


async def _chat(gw, model: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        return await http.post("/v1/chat/completions", json={"model": model, "messages": USER})


async def test_anthropic_discovers_dated_ids_and_serves_their_aliases(gateway_factory, fake_factory):
    upstream, _ = await fake_factory(models=("claude-3-5-haiku-20241022", "claude-sonnet-4-5-20250929"))
    gw = await gateway_factory(provider_toml("claude", "anthropic", base_url=f"http://127.0.0.1:{upstream.port}",
                                             api_key="ak-test-0123456789"))
    listed = await _models(gw)
    assert listed["claude-3-5-haiku-20241022"]["source"] == "discovered"
    assert listed["claude-sonnet-4-5-20250929"]["owned_by"] == "claude"
    for model in ("claude-3-5-haiku-20241022", "claude-3-5-haiku-latest", "claude-sonnet-4-5"):
        r = await _chat(gw, model)
        assert r.status_code == 200, (model, r.text)
        assert r.headers["x-runestone-provider"] == "claude"
    r = await _chat(gw, "claude-opus-9")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_the_env_anthropic_provider_serves_a_dated_id(gateway_factory, fake_factory):
    """The reported bug: with ANTHROPIC_API_KEY set, claude-3-5-haiku-20241022 was a 404 from the gateway."""
    upstream, _ = await fake_factory(models=("claude-3-5-haiku-20241022",))
    gw = await gateway_factory("", env={"ANTHROPIC_API_KEY": "ak-env-0123456789",
                                        "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{upstream.port}"})
    r = await _chat(gw, "claude-3-5-haiku-20241022")
    assert r.status_code == 200, r.text
    assert r.headers["x-runestone-provider"] == "anthropic-default"
    assert (await _models(gw))["claude-3-5-haiku-latest"]["source"] == "configured"


async def test_gemini_discovers_every_page_of_its_listing(gateway_factory, fake_factory):
    models = tuple(f"gemini-test-{i:04d}" for i in range(1005))
    upstream, _ = await fake_factory(models=models)
    gw = await gateway_factory(provider_toml("gem", "gemini", base_url=f"http://127.0.0.1:{upstream.port}/v1beta",
                                             api_key="AIzaSyFAKE0123456789abcdefghijk"))
    assert gw.app.providers.value["gem"].info.models == frozenset(models)
    assert gw.app.providers.value["gem"].discovered == frozenset(models)
    r = await _chat(gw, "gemini-test-1004")
    assert r.status_code == 200 and r.headers["x-runestone-provider"] == "gem"
    async with httpx.AsyncClient() as http:
        recent = (await http.get(f"http://127.0.0.1:{upstream.port}/_fake/stats")).json()["requests"]
    assert recent["GET /v1beta/models"] == 2


async def test_azure_discovers_deployments_and_the_models_they_run(gateway_factory, fake_factory):
    upstream, _ = await fake_factory(models=("gpt-4o",), azure_deployments={"prod-4o": "gpt-4o", "prod-mini": "gpt-4o-mini"})
    gw = await gateway_factory(provider_toml("az", "azure", base_url=f"http://127.0.0.1:{upstream.port}",
                                             api_key="azure-key-0123456789"))
    listed = await _models(gw)
    assert {"prod-4o", "prod-mini", "gpt-4o-mini"} <= set(listed)
    assert all(listed[m]["source"] == "discovered" for m in ("prod-4o", "prod-mini", "gpt-4o-mini"))
    r = await _chat(gw, "gpt-4o-mini")
    assert r.status_code == 200, r.text
    async with httpx.AsyncClient() as http:
        sent = (await http.get(f"http://127.0.0.1:{upstream.port}/_fake/stats")).json()["recent"][-1]
    assert sent["target"].startswith("/openai/deployments/prod-mini/chat/completions?")


async def test_azure_v1_discovers_from_its_models_listing(gateway_factory, fake_factory):
    upstream, _ = await fake_factory(models=("prod-4o", "prod-embed"))
    gw = await gateway_factory(provider_toml("az", "azure", base_url=f"http://127.0.0.1:{upstream.port}/openai/v1",
                                             api_key="azure-key-0123456789"))
    assert gw.app.providers.value["az"].info.models == frozenset({"prod-4o", "prod-embed"})


async def test_ids_the_vendor_adds_later_are_served_after_the_next_listing(gateway_factory, fake_factory,
                                                                          autojump_clock):
    upstream, _ = await fake_factory(models=("gemini-2.5-flash",))
    base = f"http://127.0.0.1:{upstream.port}"
    gw = await gateway_factory(provider_toml("gem", "gemini", base_url=base + "/v1beta", api_key="AIzaSyFAKE012345678901234",
                                             models_refresh_ms=60_000))
    assert (await _chat(gw, "gemini-3-pro")).status_code == 404
    async with httpx.AsyncClient() as http:
        await http.post(base + "/_fake/knobs", json={"models": ["gemini-2.5-flash", "gemini-3-pro"]})
    await trio.sleep(61)
    r = await _chat(gw, "gemini-3-pro")
    assert r.status_code == 200, r.text
    assert (await _models(gw))["gemini-3-pro"]["source"] == "discovered"
    # a listing that fails keeps what was known
    async with httpx.AsyncClient() as http:
        await http.post(base + "/_fake/knobs", json={"fault_status": 503})
    await trio.sleep(61)
    async with httpx.AsyncClient() as http:
        await http.post(base + "/_fake/knobs", json={"fault_status": 0})
    assert "gemini-3-pro" in gw.app.providers.value["gem"].info.models


async def test_a_configured_list_is_not_relisted_and_says_configured(gateway_factory, fake_factory, autojump_clock):
    upstream, _ = await fake_factory(models=("claude-haiku-4-5", "claude-opus-4-1"))
    gw = await gateway_factory(provider_toml("claude", "anthropic", base_url=f"http://127.0.0.1:{upstream.port}",
                                             api_key="ak-0123456789", models=["claude-haiku-4-5"],
                                             models_refresh_ms=1000))
    await trio.sleep(5)
    listed = await _models(gw)
    assert listed["claude-haiku-4-5"]["source"] == "configured" and "claude-opus-4-1" not in listed
    async with httpx.AsyncClient() as http:
        stats = (await http.get(f"http://127.0.0.1:{upstream.port}/_fake/stats")).json()["requests"]
    assert "GET /v1/models" not in stats


@pytest.mark.parametrize(("kind", "path", "model"), [
    ("anthropic", "", "claude-opus-4-1-20250805"),
    ("gemini", "/v1beta", "gemini-2.0-flash-001"),
    ("azure", "", "other-deployment"),
])
async def test_a_pin_reaches_any_model_the_vendor_serves(gateway_factory, fake_factory, kind, path, model):
    upstream, _ = await fake_factory(models=("listed-model", model))
    gw = await gateway_factory(provider_toml("up", kind, base_url=f"http://127.0.0.1:{upstream.port}{path}",
                                             api_key="AIzaSyFAKE-key-0123456789", models=["listed-model"]))
    assert (await _chat(gw, model)).status_code == 404  # not listed: not routed without a pin
    r = await _chat(gw, f"up:{model}")
    assert r.status_code == 200, r.text
    assert r.headers["x-runestone-provider"] == "up"


FIXTURES = __import__("pathlib").Path(__file__).parent.parent / "wire" / "fixtures"


async def _azure_listing_server(nursery, deployments_status: int):
    """A loopback Azure resource answering its two data-plane listings from the fixtures (written from the
    published examples), recording each request's target."""
    from runestone.http.server import Response, serve_http

    seen: list[str] = []

    async def handler(request):
        target = request.path + ("?" + request.query if request.query else "")
        seen.append(target)
        assert request.header(b"api-key") == b"azure-key-0123456789"
        if request.path == "/openai/deployments" and deployments_status == 200:
            return Response(200, [(b"content-type", b"application/json")],
                            (FIXTURES / "azure_deployments_list.json").read_bytes())
        if request.path == "/openai/models":
            return Response(200, [(b"content-type", b"application/json")],
                            (FIXTURES / "azure_models_list.json").read_bytes())
        return Response(404, [(b"content-type", b"application/json")],
                        b'{"error": {"code": "404", "message": "Resource not found"}}')

    server = await nursery.start(lambda task_status: serve_http(handler, "127.0.0.1", 0, task_status=task_status))
    return f"http://127.0.0.1:{server.port}", seen


async def test_azure_discovery_uses_the_published_deployments_listing(gateway_factory, nursery):
    base, seen = await _azure_listing_server(nursery, 200)
    gw = await gateway_factory(provider_toml("az", "azure", base_url=base, api_key="azure-key-0123456789"))
    assert seen == ["/openai/deployments?api-version=2022-12-01"]
    # each deployment that succeeded, and the model it runs; the failed deployment is not served
    assert gw.app.providers.value["az"].info.models == frozenset({"prod-4o", "gpt-4o", "embed-small",
                                                                  "text-embedding-3-small"})


async def test_azure_discovery_falls_back_to_the_models_listing(gateway_factory, nursery):
    base, seen = await _azure_listing_server(nursery, 404)
    gw = await gateway_factory(provider_toml("az", "azure", base_url=base, api_key="azure-key-0123456789",
                                             api_version="2024-10-21"))
    assert seen == ["/openai/deployments?api-version=2022-12-01", "/openai/models?api-version=2024-10-21"]
    # what the resource can run (inference), taken as deployed under its own name; fine-tune-only models are not
    assert gw.app.providers.value["az"].info.models == frozenset({
        "gpt-4o-2024-08-06", "gpt-4o-mini-2024-07-18.ft-72a2792ef7d24ba7b82c7fe4a37e379f"})
