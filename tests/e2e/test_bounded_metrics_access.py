"""``[metrics] require_key``: ``/metrics`` only for the admin key or the metrics key, sent as a bearer token."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gatewaytest import provider_toml

FAKE = provider_toml("fake", "fake", models=["fake-model"])


def _bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


async def test_metrics_are_open_by_default(gateway_factory):
    gw = await gateway_factory('[auth]\napi_keys = ["client"]\nadmin_key = "root"\n' + FAKE)
    async with httpx.AsyncClient(base_url=gw.url) as http:
        assert (await http.get("/metrics")).status_code == 200


async def test_required_key_is_the_admin_key_or_the_metrics_key(gateway_factory):
    gw = await gateway_factory('[auth]\napi_keys = ["client"]\nadmin_key = "root"\n'
                               '[metrics]\nrequire_key = true\nkey = "scrape"\n' + FAKE)
    async with httpx.AsyncClient(base_url=gw.url) as http:
        missing = await http.get("/metrics")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        error = missing.json()["error"]
        assert (error["type"], error["code"]) == ("authentication_error", "missing_api_key")
        assert "the admin key or the metrics key" in error["message"]
        for wrong in ("client", "nope", "scrape2"):
            r = await http.get("/metrics", headers=_bearer(wrong))
            assert (r.status_code, r.json()["error"]["code"]) == (401, "invalid_api_key"), wrong
        # A metrics key in x-api-key (the Anthropic-style header) is not how Prometheus sends it: refused too.
        assert (await http.get("/metrics", headers={"x-api-key": "scrape"})).status_code == 401
        for key in ("root", "scrape"):
            r = await http.get("/metrics", headers=_bearer(key))
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
            assert "runestone_requests_total" in {f.name + "_total" for f in text_string_to_metric_families(r.text)}
        # The metrics key opens nothing else.
        assert (await http.get("/admin/providers", headers=_bearer("scrape"))).status_code == 401
        assert (await http.get("/health/providers", headers=_bearer("scrape"))).status_code == 401
        assert (await http.get("/health")).status_code == 200


async def test_required_key_from_the_environment_with_the_admin_key_only(gateway_factory):
    gw = await gateway_factory(FAKE, env={"RUNESTONE_METRICS_REQUIRE_KEY": "true", "RUNESTONE_ADMIN_KEY": "root"})
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.get("/metrics")
        assert r.status_code == 401 and "needs the admin key as" in r.json()["error"]["message"]
        # Open loopback mode (no client keys) does not open metrics that require a key.
        assert (await http.get("/metrics", headers=_bearer("anything"))).status_code == 401
        assert (await http.get("/metrics", headers=_bearer("root"))).status_code == 200
