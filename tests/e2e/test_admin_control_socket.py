"""The control socket /v1/control: every operation as a message, the live event feed, and bad messages."""

from runestone.telemetry.messages import Summary
import httpx
import orjson
import pytest
import trio
import trio_websocket

from gatewaytest import provider_toml

KEYS = '[auth]\napi_keys = ["client-key"]\nadmin_key = "admin-key"\n'
ADMIN = [(b"authorization", b"Bearer admin-key")]


async def send(ws, obj) -> None:
    await ws.send_message(orjson.dumps(obj).decode())


async def recv(ws) -> dict:
    with trio.fail_after(10):
        return orjson.loads(await ws.get_message())


async def reply(ws, rid) -> dict:
    """The reply to request ``rid``, skipping event messages in between."""
    while True:
        msg = await recv(ws)
        if msg.get("id") == rid and msg["type"] in ("result", "error", "pong"):
            return msg
        assert msg["type"] == "event", msg


async def call(ws, op, rid, **fields) -> dict:
    await send(ws, {"type": op, "id": rid, **fields})
    return await reply(ws, rid)


def url(gw) -> str:
    return f"ws://127.0.0.1:{gw.port}/v1/control"


async def test_every_operation_over_the_socket(gateway_factory):
    gw = await gateway_factory(KEYS + provider_toml("base", "fake", models=["fake-model"]))
    async with trio_websocket.open_websocket_url(url(gw), extra_headers=ADMIN) as ws:
        r = await call(ws, "register_provider", 1, provider={"name": "extra", "type": "fake",
                                                              "config": {"models": ["extra-model"]}})
        assert r["type"] == "result" and r["op"] == "register_provider" and r["result"]["status"] == "running"
        r = await call(ws, "list_providers", 2)
        assert [p["name"] for p in r["result"]] == ["base", "extra"]
        r = await call(ws, "update_provider", 3, name="extra", provider={"config": {"priority": 3}})
        assert r["result"]["config"]["priority"] == 3
        r = await call(ws, "create_group", 4, group={"name": "both", "providers": ["extra", "base"]})
        assert r["result"]["providers"] == ["extra", "base"]
        r = await call(ws, "update_group", "5", name="both", group={"strategy": "round_robin"})
        assert r["result"]["strategy"] == "round_robin"
        r = await call(ws, "list_groups", 6)
        assert [g["name"] for g in r["result"]] == ["both", "default"]
        r = await call(ws, "reset_circuit", 7, name="base")
        assert r["result"]["state"] == "closed"
        r = await call(ws, "dump_state", 8)
        dump = r["result"]
        assert dump["tree"]["name"] == "runestone" and dump["control"]["persisted_groups"] == ["both"]
        supervisor = next(c for c in dump["tree"]["children"] if c["id"] == "enhanced_provider_supervisor")
        assert sorted(c["id"] for c in supervisor["children"]) == ["base", "extra"]
        r = await call(ws, "delete_group", 9, name="both")
        assert r["result"] == {"name": "both", "deleted": True}
        r = await call(ws, "unregister_provider", 10, name="extra", grace_ms=1000)
        assert r["result"]["drained"] is True
        assert await call(ws, "ping", 11) == {"type": "pong", "id": 11}
        assert sorted(gw.app.catalog) == ["base"]


async def test_bad_control_messages_name_the_problem_and_change_nothing(gateway_factory):
    gw = await gateway_factory(KEYS + provider_toml("base", "fake", models=["fake-model"]))
    cases = [
        ({"type": "launch_rockets"}, "unknown_type", "launch_rockets"),
        ({"id": 1}, "unknown_type", "needs a \"type\""),
        ({"type": "register_provider"}, "invalid_provider", "must be an object"),
        ({"type": "register_provider", "provider": {"name": "x", "type": "fake", "config": {"chunks": -1}}},
         "invalid_provider", "config.chunks"),
        ({"type": "register_provider", "provider": {"name": "base", "type": "fake"}}, "conflict", "base"),
        ({"type": "update_provider", "provider": {"config": {"priority": 1}}}, "invalid_value", "'name'"),
        ({"type": "update_provider", "name": "ghost", "provider": {}}, "not_found", "ghost"),
        ({"type": "unregister_provider", "name": "base", "grace_ms": -5}, "invalid_value", "grace_ms"),
        ({"type": "unregister_provider", "name": 42}, "invalid_value", "'name'"),
        ({"type": "create_group", "group": {"name": "g", "providers": ["base"], "colour": 1}}, "invalid_group",
         "colour"),
        ({"type": "create_group", "group": "g"}, "invalid_group", "must be an object"),
        ({"type": "delete_group", "name": "ghost"}, "not_found", "ghost"),
        ({"type": "reset_circuit"}, "invalid_value", "'name'"),
        ({"type": "list_providers", "id": {"nested": 1}}, "invalid_id", "'id'"),
    ]
    async with trio_websocket.open_websocket_url(url(gw), extra_headers=ADMIN) as ws:
        before = (await call(ws, "list_providers", "before"))["result"]
        for i, (message, code, fragment) in enumerate(cases):
            rid = message.get("id", f"case-{i}")
            message = {**message, "id": rid} if code != "invalid_id" else message
            await send(ws, message)
            got = await recv(ws)
            assert got["type"] == "error" and got["error"]["code"] == code, (message, got)
            assert fragment in got["error"]["message"], (message, got)
            if code != "invalid_id":
                assert got["id"] == rid
        await ws.send_message("not json at all")
        assert (await recv(ws))["error"]["code"] == "invalid_json"
        after = (await call(ws, "list_providers", "after"))["result"]
    assert after == before
    assert not gw.app.control_store.path.exists()


async def test_live_event_feed(gateway_factory):
    gw = await gateway_factory(KEYS + provider_toml("base", "fake", models=["fake-model"]))
    async with trio_websocket.open_websocket_url(url(gw), extra_headers=ADMIN) as ws:
        assert (await call(ws, "subscribe", "s"))["result"] == {"subscribed": True}
        async with httpx.AsyncClient(base_url=gw.url) as http:
            r = await http.post("/v1/chat/completions", headers={"authorization": "Bearer client-key"},
                                json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
        await send(ws, {"type": "register_provider", "id": "r",
                        "provider": {"name": "late", "type": "fake", "config": {"models": ["late-model"]}}})
        kinds = []
        got_reply = False
        while not (got_reply and "provider_registered" in kinds):
            msg = await recv(ws)
            if msg["type"] == "event":
                kinds.append(msg["event"]["kind"])
                if msg["event"]["kind"] == "request_finished":
                    assert msg["event"]["provider"] == "base" and msg["event"]["status"] == "ok"
            else:
                assert msg["id"] == "r" and msg["type"] == "result"
                got_reply = True
        assert "request_finished" in kinds and "attempt_finished" in kinds
        assert (await call(ws, "unsubscribe", "u"))["result"] == {"subscribed": False}
        with trio.fail_after(60):  # only a hang trips this
            while gw.app.registry.whereis("telemetry_handler").actor.snapshot().subscribers:
                await trio.sleep(0.01)
        # Unsubscribed: a new request brings no event.
        async with httpx.AsyncClient(base_url=gw.url) as http:
            await http.post("/v1/chat/completions", headers={"authorization": "Bearer client-key"},
                            json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})
        await gw.app.registry.whereis("telemetry_handler").call(Summary())  # every event so far is handled
        await send(ws, {"type": "ping", "id": "p"})
        assert await recv(ws) == {"type": "pong", "id": "p"}


async def test_control_socket_needs_the_admin_key(gateway_factory):
    gw = await gateway_factory(KEYS + provider_toml("base", "fake"))
    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
        async with trio_websocket.open_websocket_url(url(gw), extra_headers=[(b"authorization",
                                                                              b"Bearer client-key")]):
            pass
    assert rejected.value.status_code == 401
    async with trio_websocket.open_websocket_url(url(gw)) as ws:
        await send(ws, {"type": "auth", "key": "client-key", "id": 1})
        assert (await recv(ws))["error"]["code"] == "invalid_api_key"
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.reason.code == 1008
    async with trio_websocket.open_websocket_url(url(gw)) as ws:
        await send(ws, {"type": "auth", "key": "admin-key", "id": 1})
        assert (await recv(ws))["type"] == "authenticated"
        assert (await call(ws, "list_groups", 2))["type"] == "result"
    closed_admin = await gateway_factory('[auth]\napi_keys = ["client-key"]\n' + provider_toml("base", "fake"))
    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
        async with trio_websocket.open_websocket_url(url(closed_admin)):
            pass
    assert rejected.value.status_code == 403
