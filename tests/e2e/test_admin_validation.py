"""The admin API refuses what it could not use as shown: URLs parsed once, numeric settings in their ranges.

A base URL is split by the one parser the transports use, and refused when two readers could disagree on it
(CR LF, user info, a fragment hiding an ``@``, a backslash) or when it is not plainly http(s) with a host; an
optional ``[admin] upstream_hosts`` allow-list limits where providers may point. Numbers have documented
ranges. Every refusal is a 400 naming the field, over HTTP and the control socket alike, and changes nothing.
"""

import httpx
import orjson
import pytest
import trio
import trio_websocket

from gatewaytest import provider_toml
from runestone.config import ConfigError, load_config

KEYS = '[auth]\napi_keys = ["client-key"]\nadmin_key = "admin-key"\n'
ADMIN = {"authorization": "Bearer admin-key"}


def openai(base_url: str, **config) -> dict:
    return {"name": "new", "type": "openai", "config": {"base_url": base_url, "models": ["m"], **config}}


BAD_URLS = [
    "http://127.0.0.1:9/v1\r\nX-Injected: 1",
    "http://127.0.0.1:9/v1\n",
    "http://evil.invalid#@127.0.0.1:9",
    "http://evil.invalid?@127.0.0.1:9",
    "http://user:pw-IN-URL@127.0.0.1:9/v1",
    "http://evil.invalid\\@127.0.0.1:9/v1",
    "http://127.0.0.1\\.evil.invalid/v1",
    "http://127.0.0.1:9/v1#frag",
    "http://127.0.0.1:9/v1?api-version=1",
    "http://127.0.0.1:0/v1",
    "http://127.0.0.1:99999/v1",
    "http://[::1/v1",
    "http://exämple.invalid/v1",
    "http://127.0.0.1 :9/v1",
]


@pytest.mark.parametrize("base_url", BAD_URLS)
async def test_a_base_url_two_parsers_could_read_differently_is_refused(gateway_factory, base_url):
    gw = await gateway_factory(KEYS + provider_toml("fake", "fake", models=["fake-model"]))
    store = gw.app.control_store.path
    async with httpx.AsyncClient(base_url=gw.url, headers=ADMIN) as http:
        before = (await http.get("/admin/providers")).json()
        r = await http.post("/admin/providers", json=openai(base_url))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_provider" and "config.base_url" in error["message"], error
        assert "pw-IN-URL" not in r.text and "\r" not in error["message"]
        # An update is checked the same way.
        r = await http.patch("/admin/providers/fake", json={"config": {"base_url": base_url}})
        assert r.status_code == 400 and "config.base_url" in r.json()["error"]["message"], r.text
        assert (await http.get("/admin/providers")).json() == before
    assert not store.exists()


async def test_a_plain_base_url_is_stored_and_listed_as_it_is_used(gateway_factory):
    gw = await gateway_factory(KEYS + provider_toml("fake", "fake", models=["fake-model"]))
    async with httpx.AsyncClient(base_url=gw.url, headers=ADMIN) as http:
        r = await http.post("/admin/providers", json=openai("HTTP://127.0.0.1:9/v1"))
        assert r.status_code == 201, r.text
        assert r.json()["config"]["base_url"] == "HTTP://127.0.0.1:9/v1"


@pytest.mark.parametrize("config, field", [
    ({"weight": 1e308}, "config.weight"),
    ({"priority": 10**12}, "config.priority"),
    ({"timeout_ms": 10**10}, "config.timeout_ms"),
    ({"connect_timeout_ms": 10**9}, "config.connect_timeout_ms"),
    ({"max_concurrency": 10**9}, "config.max_concurrency"),
    ({"pool_size": 10**9}, "config.pool_size"),
])
async def test_provider_numbers_out_of_range_are_400_naming_the_field(gateway_factory, config, field):
    gw = await gateway_factory(KEYS + provider_toml("fake", "fake", models=["fake-model"]))
    async with httpx.AsyncClient(base_url=gw.url, headers=ADMIN) as http:
        r = await http.post("/admin/providers", json=openai("http://127.0.0.1:9/v1", **config))
        assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
        r = await http.patch("/admin/providers/fake", json={"config": config})
        assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
        assert [p["name"] for p in (await http.get("/admin/providers")).json()["data"]] == ["fake"]


async def test_group_max_attempts_out_of_range_is_refused_for_every_group(gateway_factory):
    gw = await gateway_factory(KEYS + provider_toml("fake", "fake", models=["fake-model"]))
    async with httpx.AsyncClient(base_url=gw.url, headers=ADMIN) as http:
        before = (await http.get("/admin/groups")).json()["data"]
        for method, path, payload in [
            ("POST", "/admin/groups", {"name": "g", "providers": ["fake"], "max_attempts": 1_000_000}),
            ("PATCH", "/admin/groups/default", {"max_attempts": 1_000_000}),
            ("PATCH", "/admin/groups/default", {"providers": [], "max_attempts": 1_000_000}),
            ("PATCH", "/admin/groups/default", {"providers": [], "health_threshold": 2.0}),
        ]:
            r = await http.request(method, path, content=orjson.dumps(payload))
            assert r.status_code == 400, (path, payload, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_group", error
            assert next(iter(set(payload) - {"name", "providers"})) in error["message"], error
        after = (await http.get("/admin/groups")).json()["data"]
    strip = [{k: v for k, v in g.items() if k != "stats"} for g in before]
    assert [{k: v for k, v in g.items() if k != "stats"} for g in after] == strip


async def test_the_control_socket_goes_through_the_same_checks(gateway_factory):
    gw = await gateway_factory(KEYS + provider_toml("fake", "fake", models=["fake-model"]))
    async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{gw.port}/v1/control",
                                                 extra_headers=[(b"authorization", b"Bearer admin-key")]) as ws:
        for rid, msg in enumerate([
            {"type": "register_provider", "provider": openai("http://evil.invalid#@127.0.0.1:9")},
            {"type": "register_provider", "provider": openai("http://127.0.0.1:9/v1", weight=1e308)},
            {"type": "create_group", "group": {"name": "g", "providers": ["fake"], "max_attempts": 1_000_000}},
        ]):
            await ws.send_message(orjson.dumps({**msg, "id": rid}).decode())
            with trio.fail_after(10):
                while True:
                    answer = orjson.loads(await ws.get_message())
                    if answer.get("id") == rid:
                        break
            assert answer["type"] == "error" and answer["status"] == 400, answer
    assert set(gw.app.providers.value) == {"fake"}


async def test_upstream_hosts_allow_list(gateway_factory):
    gw = await gateway_factory(KEYS + '[admin]\nupstream_hosts = ["127.0.0.1", "*.example.internal"]\n'
                               + provider_toml("fake", "fake", models=["fake-model"]))
    async with httpx.AsyncClient(base_url=gw.url, headers=ADMIN) as http:
        for url in ("http://localhost:9/v1", "http://example.internal/v1", "http://api.example.internal.evil/v1",
                    "https://api.openai.com/v1"):
            r = await http.post("/admin/providers", json=openai(url))
            assert r.status_code == 400, (url, r.text)
            assert "admin.upstream_hosts" in r.json()["error"]["message"] and "config.base_url" in r.text
        # Leaving base_url out means the vendor's own URL, which is checked too.
        r = await http.post("/admin/providers", json={"name": "vendor", "type": "openai", "config": {"models": ["m"]}})
        assert r.status_code == 400 and "admin.upstream_hosts" in r.text, r.text
        for name, url in (("a", "http://127.0.0.1:9/v1"), ("b", "https://api.example.internal/v1")):
            r = await http.post("/admin/providers", json={**openai(url), "name": name})
            assert r.status_code == 201, r.text


def test_configured_providers_get_the_same_checks(tmp_path):
    def load(body: str):
        path = tmp_path / "runestone.toml"
        path.write_text(body)
        return load_config(path, env={})

    for config, field in [
        ('base_url = "http://evil.invalid#@127.0.0.1:9"', "base_url"),
        ("weight = inf", "weight"),
        ("weight = nan", "weight"),
        ("priority = 1_000_000_000", "priority"),
    ]:
        with pytest.raises(ConfigError) as info:
            load(provider_toml("p", "openai", models=["m"]) + config + "\n")
        assert f"providers[0].config.{field}" in str(info.value), info.value
    with pytest.raises(ConfigError) as info:
        load("[failover]\nmax_attempts = 1000000\n")
    assert "failover.max_attempts" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load('[admin]\nupstream_hosts = ["127.0.0.1"]\n'
             + provider_toml("p", "openai", base_url="http://10.0.0.1/v1", models=["m"]))
    assert "providers[0].config.base_url" in str(info.value) and "admin.upstream_hosts" in str(info.value)
