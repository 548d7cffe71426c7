"""The control socket /v1/control over a real WebSocket: operations and refusals as messages, the live event
feed beside HTTP traffic, the admin key (the protocol message by message: tests/control/test_socket.py)."""

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


async def test_operations_and_refusals_over_the_socket(gateway_factory):
    # Every operation and every refusal: tests/control/test_socket.py, without the WebSocket.
    gw = await gateway_factory(KEYS + provider_toml("base", "fake", models=["fake-model"]))
    async with trio_websocket.open_websocket_url(url(gw), extra_headers=ADMIN) as ws:
        r = await call(ws, "register_provider", 1, provider={"name": "extra", "type": "fake",
                                                              "config": {"models": ["extra-model"]}})
        assert r["type"] == "result" and r["op"] == "register_provider" and r["result"]["status"] == "running"
        r = await call(ws, "list_providers", 2)
        assert [p["name"] for p in r["result"]] == ["base", "extra"]
        r = await call(ws, "register_provider", 3, provider={"name": "base", "type": "fake"})
        assert r["type"] == "error" and r["error"]["code"] == "conflict" and r["status"] == 409
        r = await call(ws, "unregister_provider", 4, name="extra", grace_ms=1000)
        assert r["result"]["drained"] is True
        await send(ws, {"type": "list_providers", "id": {"nested": 1}})
        assert (await recv(ws))["error"]["code"] == "invalid_id"
        await ws.send_message("not json at all")
        assert (await recv(ws))["error"]["code"] == "invalid_json"
        assert await call(ws, "ping", 5) == {"type": "pong", "id": 5}
    assert sorted(gw.app.catalog) == ["base"]


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
