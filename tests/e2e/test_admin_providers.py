"""Hot registration over the admin HTTP API of a live gateway: under load, draining, updates, groups, circuits."""

import httpx
import orjson
import trio

from gatewaytest import provider_toml

KEYS = '[auth]\napi_keys = ["client-key"]\nadmin_key = "admin-key"\n'
ADMIN = {"authorization": "Bearer admin-key"}
CLIENT = {"authorization": "Bearer client-key"}


def body(model: str, content: str = "hello there", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def stream_text(http: httpx.AsyncClient, model: str, content: str, started=None) -> tuple[str, str]:
    """One streamed chat: (text, provider); fails on anything but a clean end with [DONE]."""
    text = ""
    async with http.stream("POST", "/v1/chat/completions", json=body(model, content, stream=True),
                           headers=CLIENT) as r:
        assert r.status_code == 200
        provider = r.headers["x-runestone-provider"]
        events = []
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if started is not None and len(events) == 1:
                started()
    assert events[-1] == "[DONE]", events[-3:]
    for data in events[:-1]:
        chunk = orjson.loads(data)
        assert "error" not in chunk
        for choice in chunk["choices"]:
            text += choice["delta"].get("content") or ""
    return text, provider


async def complete(http: httpx.AsyncClient, model: str, content: str = "hello there") -> httpx.Response:
    return await http.post("/v1/chat/completions", json=body(model, content), headers=CLIENT)


async def test_register_while_100_streams_are_in_flight(gateway_factory, gated_factory):
    # The streams wait at the gate after their first event until the checks are done: they are in flight
    # then whatever the machine's speed.
    upstream, gate, _ = await gated_factory(chunks=10)
    gw = await gateway_factory(KEYS + provider_toml("steady", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1",
                                                    api_key="sk-steady", models=["fake-model"]))
    app = gw.app
    streams = 100
    started = 0
    all_started = trio.Event()
    results = []

    def one_started():
        nonlocal started
        started += 1
        if started == streams:
            all_started.set()

    limits = httpx.Limits(max_connections=streams + 10)
    async with httpx.AsyncClient(base_url=gw.url, limits=limits, timeout=60) as http:
        expected = (await complete(http, "fake-model", "stream me")).json()["choices"][0]["message"]["content"]

        async def one():
            results.append(await stream_text(http, "fake-model", "stream me", one_started))

        async with trio.open_nursery() as n:
            for _ in range(streams):
                n.start_soon(one)
            with trio.fail_after(60):  # only a hang trips this
                await all_started.wait()
            assert app.telemetry.in_flight["steady"] == streams and gate.held == streams
            r = await http.post("/admin/providers", headers=ADMIN, json={
                "name": "fresh", "type": "fake", "config": {"models": ["fresh-model"], "text": "brand new"}})
            assert r.status_code == 201, r.text
            assert r.json()["status"] == "running" and r.json()["source"] == "control"
            fresh = await complete(http, "fresh-model")
            assert fresh.status_code == 200 and fresh.headers["x-runestone-provider"] == "fresh"
            assert fresh.json()["choices"][0]["message"]["content"].startswith("brand new")
            # Registered while every stream was still running; the state dump shows them, with their ages.
            assert app.telemetry.in_flight["steady"] == streams
            tree = (await http.get("/admin/state", headers=ADMIN)).json()["tree"]
            pool = next(c for c in tree["children"] if c["id"] == "provider_pool")["snapshot"]["in_flight"]
            assert len(pool) == streams and {r["provider"] for r in pool} == {"steady"}
            assert all(r["stream"] and r["age_s"] > 0 for r in pool)
            assert not results  # none has ended yet
            gate.open()
    assert len(results) == streams
    assert all(r == (expected, "steady") for r in results)
    children = {c.id: c for c in app.provider_supervisor.which_children()}
    assert children["steady"].restarts == 0 and "fresh" in children
    assert app.catalog["fresh"].config.text == "brand new"


async def test_unregister_under_load_drains_and_new_requests_route_elsewhere(gateway_factory, gated_factory):
    upstream, gate, _ = await gated_factory(chunks=8)  # its streams wait after their first event
    gw = await gateway_factory(
        KEYS
        + provider_toml("leaving", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1", api_key="sk-l",
                        models=["gpt-4o-mini"], priority=1)
        + provider_toml("staying", "fake", models=["gpt-4o-mini"], priority=50))
    app = gw.app
    streams = 20
    started = trio.Event()
    count = 0
    results = []

    def one_started():
        nonlocal count
        count += 1
        if count == streams:
            started.set()

    async with httpx.AsyncClient(base_url=gw.url, timeout=30, limits=httpx.Limits(max_connections=50)) as http:
        assert (await complete(http, "gpt-4o-mini")).headers["x-runestone-provider"] == "leaving"
        removal = {}

        async def one():
            results.append(await stream_text(http, "leaving:gpt-4o-mini", "keep going", one_started))

        async def remove():
            removal["response"] = await http.delete("/admin/providers/leaving", params={"grace_ms": 300_000},
                                                    headers=ADMIN)
            removal["after_the_streams_went_on"] = gate.opened.is_set()
            removal["in_flight"] = app.telemetry.in_flight.get("leaving", 0)

        async with trio.open_nursery() as n:
            for _ in range(streams):
                n.start_soon(one)
            with trio.fail_after(60):  # only a hang trips these
                await started.wait()
            n.start_soon(remove)
            with trio.fail_after(60):
                while not app.providers.value["leaving"].draining:
                    await trio.sleep(0.005)
            # Draining: new requests go to the other provider, a request pinned to it is refused.
            for _ in range(5):
                r = await complete(http, "gpt-4o-mini")
                assert r.status_code == 200 and r.headers["x-runestone-provider"] == "staying"
            pinned = await complete(http, "leaving:gpt-4o-mini")
            assert pinned.status_code == 503 and pinned.json()["error"]["code"] == "provider_unavailable"
            assert "response" not in removal  # still draining
            gate.open()
        r = removal["response"]
        assert r.status_code == 200, r.text
        assert r.json() == {"name": "leaving", "type": "openai", "unregistered": True, "drained": True,
                            "in_flight_left": 0}
        # It waited for its streams, which all ended cleanly.
        assert removal["after_the_streams_went_on"] and removal["in_flight"] == 0
        assert len(results) == streams and all(p == "leaving" and t for t, p in results)
        listed = (await http.get("/admin/providers", headers=ADMIN)).json()["data"]
        assert [p["name"] for p in listed] == ["staying"]
        assert (await complete(http, "leaving:gpt-4o-mini")).status_code == 404
        assert app.registry.whereis("provider:leaving") is None


async def test_unregister_grace_is_bounded(gateway_factory, gated_factory):
    upstream, gate, _ = await gated_factory(chunks=8)  # the stream waits at the gate, which never opens
    gw = await gateway_factory(KEYS + provider_toml("slow", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1",
                                                    api_key="sk-slow", models=["fake-model"])
                               + provider_toml("other", "fake", models=["m2"]))
    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as http:
        opened = trio.Event()
        async with trio.open_nursery() as n:
            async def hold():
                async with http.stream("POST", "/v1/chat/completions", json=body("fake-model", stream=True),
                                       headers=CLIENT) as r:
                    assert r.status_code == 200
                    async for _ in r.aiter_bytes():
                        opened.set()
            n.start_soon(hold)
            await opened.wait()
            began = trio.current_time()
            r = await http.delete("/admin/providers/slow", params={"grace_ms": 500}, headers=ADMIN)
            took = trio.current_time() - began
            n.cancel_scope.cancel()
    assert r.status_code == 200
    assert r.json()["drained"] is False and r.json()["in_flight_left"] == 1
    # It waited the grace, and no longer: the stream could not have ended by itself.
    assert took >= 0.5 and not gate.opened.is_set()


async def test_update_provider_restarts_only_it_with_the_new_settings(gateway_factory):
    gw = await gateway_factory(KEYS + provider_toml("p", "fake", models=["m"], text="old words", api_key="sk-keep")
                               + provider_toml("q", "fake", models=["m2"]))
    app = gw.app
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        assert (await complete(http, "m")).json()["choices"][0]["message"]["content"].startswith("old words")
        q_actor = app.registry.whereis("provider:q")
        listed = (await http.get("/admin/providers/p", headers=ADMIN)).json()
        assert listed["config"]["api_key"] == "***"
        # Sending back what a listing shows ("***") keeps the key.
        r = await http.patch("/admin/providers/p", headers=ADMIN,
                             json={"config": {"text": "new words", "api_key": "***", "models": ["m", "m3"]}})
        assert r.status_code == 200, r.text
        assert r.json()["models"] == ["m", "m3"] and r.json()["status"] == "running"
        assert app.catalog["p"].config.api_key == "sk-keep"
        assert (await complete(http, "m3")).json()["choices"][0]["message"]["content"].startswith("new words")
        assert app.registry.whereis("provider:q") is q_actor
        # A null unsets a setting; the same settings again change nothing.
        r = await http.patch("/admin/providers/p", headers=ADMIN, json={"config": {"text": None}})
        assert r.status_code == 200 and "text" not in r.json()["config"]
        actor = app.registry.whereis("provider:p")
        assert (await http.patch("/admin/providers/p", headers=ADMIN, json={"config": {}})).status_code == 200
        assert app.registry.whereis("provider:p") is actor


async def test_bad_control_requests_are_refused_and_change_nothing(gateway_factory):
    gw = await gateway_factory(KEYS + provider_toml("fake", "fake", models=["fake-model"]))
    store = gw.app.control_store.path
    cases = [
        ("POST", "/admin/providers", b"{nope", 400, "invalid_json", "not valid JSON"),
        ("POST", "/admin/providers", [1], 400, "invalid_json", "JSON object"),
        ("POST", "/admin/providers", {"name": "x"}, 400, "invalid_provider", "type"),
        ("POST", "/admin/providers", {"name": "x", "type": "nope"}, 400, "invalid_provider", "must be one of"),
        ("POST", "/admin/providers", {"name": "x", "type": "fake", "config": {"timeout_ms": "slow"}}, 400,
         "invalid_provider", "config.timeout_ms"),
        ("POST", "/admin/providers", {"name": "x", "type": "fake", "config": {"colour": "red"}}, 400,
         "invalid_provider", "config.colour"),
        ("POST", "/admin/providers", {"name": "x", "type": "fake", "extra": 1}, 400, "invalid_provider", "extra"),
        ("POST", "/admin/providers", {"name": "bad name!", "type": "fake"}, 400, "invalid_provider", "name"),
        ("POST", "/admin/providers", {"name": "fake", "type": "fake"}, 409, "conflict", "already registered"),
        ("DELETE", "/admin/providers/ghost", None, 404, "not_found", "ghost"),
        ("PATCH", "/admin/providers/ghost", {"config": {}}, 404, "not_found", "ghost"),
        ("PATCH", "/admin/providers/fake", {"config": {"weight": -1}}, 400, "invalid_provider", "config.weight"),
        ("PATCH", "/admin/providers/fake", {"name": "other"}, 400, "invalid_provider", "renamed"),
        ("PATCH", "/admin/providers/fake", {"config": "fast"}, 400, "invalid_provider", "config"),
        ("DELETE", "/admin/providers/fake?grace_ms=soon", None, 400, "invalid_value", "grace_ms"),
        ("POST", "/admin/groups", {"name": "g", "providers": ["ghost"]}, 400, "invalid_group", "ghost"),
        ("POST", "/admin/groups", {"name": "g", "providers": ["fake"], "strategy": "random"}, 400, "invalid_group",
         "strategy"),
        ("POST", "/admin/groups", {"name": "g", "providers": []}, 400, "invalid_group", "providers"),
        ("POST", "/admin/groups", {"name": "default", "providers": ["fake"]}, 409, "conflict", "already exists"),
        ("PATCH", "/admin/groups/ghost", {"strategy": "priority"}, 404, "not_found", "ghost"),
        ("PATCH", "/admin/groups/default", {"max_attempts": 0}, 400, "invalid_group", "max_attempts"),
        ("DELETE", "/admin/groups/default", None, 400, "invalid_group", "cannot be deleted"),
        ("DELETE", "/admin/groups/ghost", None, 404, "not_found", "ghost"),
        ("POST", "/admin/circuits/ghost/reset", None, 404, "not_found", "ghost"),
        ("POST", "/admin/circuits/fake/open", None, 404, "not_found", "no route"),
        ("PUT", "/admin/providers", {}, 405, "method_not_allowed", "PUT"),
    ]
    async with httpx.AsyncClient(base_url=gw.url, headers=ADMIN) as http:
        before = ((await http.get("/admin/providers")).json(), (await http.get("/admin/groups")).json())
        for method, path, payload, status, code, fragment in cases:
            content = payload if isinstance(payload, bytes) else None if payload is None else orjson.dumps(payload)
            r = await http.request(method, path, content=content)
            assert r.status_code == status, (method, path, r.text)
            error = r.json()["error"]
            assert error["code"] == code and fragment in error["message"], (method, path, error)
        after = ((await http.get("/admin/providers")).json(), (await http.get("/admin/groups")).json())
    assert after == before
    assert not store.exists()
    assert gw.app.providers.value["fake"].draining is False


async def test_admin_api_needs_the_admin_key(gateway_factory):
    gw = await gateway_factory(KEYS + provider_toml("fake", "fake", models=["fake-model"]))
    async with httpx.AsyncClient(base_url=gw.url) as http:
        assert (await http.get("/admin/state")).status_code == 401
        r = await http.get("/admin/providers", headers=CLIENT)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = await http.post("/admin/providers", headers=CLIENT, json={"name": "x", "type": "fake"})
        assert r.status_code == 401
        assert (await http.get("/admin/state", headers=ADMIN)).status_code == 200
    closed = await gateway_factory('[auth]\napi_keys = ["client-key"]\n' + provider_toml("fake", "fake"))
    async with httpx.AsyncClient(base_url=closed.url) as http:
        r = await http.get("/admin/providers", headers=CLIENT)
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
    open_mode = await gateway_factory(provider_toml("fake", "fake"))
    async with httpx.AsyncClient(base_url=open_mode.url) as http:
        assert (await http.get("/admin/providers")).status_code == 200


async def test_groups_and_circuit_reset(gateway_factory, fake_factory):
    failing, _ = await fake_factory(fault_status=500)
    gw = await gateway_factory(
        KEYS + "[circuit_breaker]\nfailure_threshold = 2\n[retry]\nmax_attempts = 1\n"
        + provider_toml("good", "fake", models=["fake-model"])
        + provider_toml("bad", "openai", base_url=f"http://127.0.0.1:{failing.port}/v1", api_key="sk-x",
                        models=["bad-model"]))
    async with httpx.AsyncClient(base_url=gw.url, headers=ADMIN) as http:
        r = await http.post("/admin/groups", json={"name": "pair", "providers": ["bad", "good"],
                                                   "strategy": "priority"})
        assert r.status_code == 201, r.text
        assert r.json() == {"name": "pair", "providers": ["bad", "good"], "strategy": "priority", "max_attempts": 3,
                            "health_threshold": 0.5}
        served = await http.post("/v1/chat/completions", json=body("pair"))
        assert served.status_code == 200 and served.headers["x-runestone-provider"] == "good"
        r = await http.patch("/admin/groups/pair", json={"strategy": "round_robin", "max_attempts": 2})
        assert r.status_code == 200 and r.json()["strategy"] == "round_robin"
        groups = {g["name"]: g for g in (await http.get("/admin/groups")).json()["data"]}
        assert groups["pair"]["stats"]["group"]["requests"] == 1 and groups["pair"]["source"] == "control"
        assert (await http.get("/admin/groups/pair")).json()["max_attempts"] == 2
        assert (await http.delete("/admin/groups/pair")).json() == {"name": "pair", "deleted": True}
        assert (await http.post("/v1/chat/completions", json=body("pair"))).status_code == 404

        for _ in range(2):
            await http.post("/v1/chat/completions", json=body("bad-model"))
        with trio.fail_after(60):  # only a hang trips this
            while (await http.get("/admin/providers/bad")).json()["circuit_state"] != "open":
                await trio.sleep(0.01)
        r = await http.post("/admin/circuits/bad/reset")
        assert r.status_code == 200 and r.json()["state"] == "closed" and r.json()["provider"] == "bad"
        assert (await http.get("/admin/providers/bad")).json()["circuit_state"] == "closed"
        r = await http.post("/admin/circuits/good/reset")
        assert r.status_code == 200 and r.json()["state"] == "closed"
