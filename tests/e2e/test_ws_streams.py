"""The WebSocket API at /v1/ws on a live gateway: streams by id, cancel, auth, and how bad input is met."""

import struct

import httpx
import orjson
import pytest
import trio
import trio_websocket
from trio.testing import MockClock

from gatewaytest import provider_toml

KEYS = '[auth]\napi_keys = ["client-key"]\nadmin_key = "admin-key"\n'
AUTH = [(b"authorization", b"Bearer client-key")]


def chat(sid, content="hello there", model="fake-model", **extra):
    return {"type": "chat", "id": sid, "request": {"model": model, "messages": [{"role": "user", "content": content}],
                                                   **extra}}


async def send(ws, obj) -> None:
    await ws.send_message(orjson.dumps(obj).decode())


async def recv(ws) -> dict:
    with trio.fail_after(10):
        return orjson.loads(await ws.get_message())


async def collect(ws, ids) -> dict:
    """Every message until each id in ``ids`` has ended: {id: (text, final message, chunk count)}."""
    text = {i: "" for i in ids}
    chunks = {i: 0 for i in ids}
    final = {}
    while len(final) < len(ids):
        msg = await recv(ws)
        sid = msg["id"]
        if msg["type"] == "chunk":
            assert sid not in final, "a chunk after the stream's end"
            chunks[sid] += 1
            for choice in msg["chunk"]["choices"]:
                text[sid] += choice["delta"].get("content") or ""
        else:
            assert msg["type"] in ("done", "error") and sid not in final
            final[sid] = msg
    return {i: (text[i], final[i], chunks[i]) for i in ids}


async def http_answer(gw, content: str, model: str = "fake-model") -> str:
    async with httpx.AsyncClient(base_url=gw.url, headers={"authorization": "Bearer client-key"}) as http:
        r = await http.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user",
                                                                                       "content": content}]})
    assert r.status_code == 200
    return r.json()["choices"][0]["message"]["content"]


def ws_url(gw, path="/v1/ws") -> str:
    return f"ws://127.0.0.1:{gw.port}{path}"


def upstream_toml(upstream, model="fake-model") -> str:
    """Provider ``up``: an OpenAI-type provider on ``upstream`` (a gated fake, whose streams wait at its gate)."""
    return provider_toml("up", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1", api_key="sk-up",
                         models=[model])


async def test_concurrent_streams_are_told_apart_by_id(gateway_factory):
    gw = await gateway_factory(KEYS + provider_toml("fake", "fake", models=["fake-model"], chunk_delay_ms=2))
    prompts = {"a": "first question", 7: "second question", "c": "third one"}
    async with trio_websocket.open_websocket_url(ws_url(gw), extra_headers=AUTH) as ws:
        for sid, content in prompts.items():
            await send(ws, chat(sid, content, stream_options={"include_usage": True}))
        results = await collect(ws, list(prompts))
        # The id is free again once its stream ended.
        await send(ws, chat("a", "again"))
        again = await collect(ws, ["a"])
    for sid, content in prompts.items():
        text, final, chunks = results[sid]
        assert final["type"] == "done" and final["provider"] == "fake"
        assert text == await http_answer(gw, content)
        assert final["usage"]["completion_tokens"] > 0
        assert final["usage"]["total_tokens"] == final["usage"]["prompt_tokens"] + final["usage"]["completion_tokens"]
        assert chunks >= 3
    assert again["a"][0] == await http_answer(gw, "again")


async def test_duplicate_live_id_unknown_model_and_cancel_of_unknown_id(gateway_factory, gated_factory):
    upstream, gate, _ = await gated_factory()
    gw = await gateway_factory(KEYS + upstream_toml(upstream))
    async with trio_websocket.open_websocket_url(ws_url(gw), extra_headers=AUTH) as ws:
        await send(ws, chat("s1"))
        await send(ws, chat("s1", "another"))
        dup = await recv(ws)
        while dup["type"] == "chunk":
            dup = await recv(ws)
        assert dup["type"] == "error" and dup["id"] == "s1" and dup["error"]["code"] == "duplicate_id"
        gate.open()  # s1 was live (held at the gate) all along
        done = await collect(ws, ["s1"])
        assert done["s1"][1]["type"] == "done"
        await send(ws, chat("s2", model="no-such-model"))
        err = await recv(ws)
        assert err == {"type": "error", "id": "s2", "status": 404, "error": err["error"]}
        assert err["error"]["code"] == "model_not_found" and "no-such-model" in err["error"]["message"]
        await send(ws, {"type": "cancel", "id": "nope"})
        err = await recv(ws)
        assert err["error"]["code"] == "unknown_id" and "nope" in err["error"]["message"]
        await send(ws, {"type": "chat", "id": "s3", "request": {"model": "fake-model", "messages": []}})
        err = await recv(ws)
        assert err["id"] == "s3" and err["status"] == 400 and err["error"]["param"] == "messages"


async def test_bad_messages_get_errors_and_the_connection_stays_up(gateway_factory):
    gw = await gateway_factory(KEYS + provider_toml("fake", "fake", models=["fake-model"]))
    async with trio_websocket.open_websocket_url(ws_url(gw), extra_headers=AUTH) as ws:
        await ws.send_message("{not json")
        err = await recv(ws)
        assert err["type"] == "error" and err["error"]["code"] == "invalid_json" and "not valid JSON" in \
            err["error"]["message"]
        await ws.send_message("[1, 2]")
        assert (await recv(ws))["error"]["code"] == "invalid_message"
        await send(ws, {"type": "subscribe_everything", "id": 3})
        err = await recv(ws)
        assert err["id"] == 3 and err["error"]["code"] == "unknown_type" and "subscribe_everything" in \
            err["error"]["message"]
        await send(ws, {"type": "chat", "request": {"model": "fake-model"}})
        assert (await recv(ws))["error"]["code"] == "invalid_id"
        await send(ws, {"type": "chat", "id": True, "request": {}})
        assert (await recv(ws))["error"]["code"] == "invalid_id"
        await send(ws, {"type": "chat", "id": "x", "request": "hello"})
        assert (await recv(ws))["error"]["param"] == "request"
        await send(ws, {"type": "ping", "id": 9})
        assert await recv(ws) == {"type": "pong", "id": 9}
        await ws.ping(b"still-there")  # a WebSocket ping is answered by the library
        await send(ws, chat(1))
        assert (await collect(ws, [1]))[1][1]["type"] == "done"


async def test_too_many_streams_on_one_connection(gateway_factory, gated_factory):
    upstream, gate, _ = await gated_factory()
    gw = await gateway_factory(KEYS + upstream_toml(upstream))
    limit = gw.app.ws_routes.max_streams
    async with trio_websocket.open_websocket_url(ws_url(gw), extra_headers=AUTH) as ws:
        for i in range(limit + 1):
            await send(ws, chat(i))
        refused = None
        ended = {}
        while len(ended) < limit:
            msg = await recv(ws)
            if msg["type"] == "error" and msg["id"] == limit:
                refused = msg
                gate.open()  # the others were all live (held at the gate) until now
            elif msg["type"] in ("done", "error"):
                ended[msg["id"]] = msg
        assert refused["error"]["code"] == "too_many_streams" and refused["status"] == 429
        assert all(m["type"] == "done" for m in ended.values())


async def test_cancel_closes_the_upstream_connection_at_once(gateway_factory, gated_factory):
    # Both streams wait at the gate after their first chunk: the upstream has nothing more to send, so only
    # the gateway closing the connection can end the cancelled one there, not a next chunk or its end.
    upstream, gate, fake = await gated_factory(chunks=200)
    gw = await gateway_factory(KEYS + upstream_toml(upstream, "gpt-4o-mini"))
    async with trio_websocket.open_websocket_url(ws_url(gw), extra_headers=AUTH) as ws:
        await send(ws, chat("long", model="gpt-4o-mini"))
        await send(ws, chat("other", model="gpt-4o-mini"))
        seen = set()
        while len(seen) < 2:
            msg = await recv(ws)
            assert msg["type"] == "chunk"
            seen.add(msg["id"])
        await send(ws, {"type": "cancel", "id": "long"})
        end = await recv(ws)
        while end["type"] == "chunk":
            end = await recv(ws)
        assert end["id"] == "long" and end["error"]["code"] == "cancelled"
        with trio.fail_after(60):  # only a hang trips this
            while not fake.stats.streams_cancelled:
                await trio.sleep(0.01)
        assert fake.stats.streams_cancelled == 1 and gate.held == 1 and not gate.opened.is_set()
        # The other stream on the same connection goes on.
        gate.open()
        msg = await recv(ws)
        assert msg["type"] == "chunk" and msg["id"] == "other"
        await send(ws, {"type": "cancel", "id": "other"})


async def test_a_failure_mid_stream_ends_with_an_error_message(gateway_factory, fake_factory):
    upstream, knobs = await fake_factory(chunks=6, drop_mid_stream=True)
    gw = await gateway_factory(KEYS + provider_toml("up", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1",
                                                    api_key="sk-up", models=["gpt-4o-mini"]))
    async with trio_websocket.open_websocket_url(ws_url(gw), extra_headers=AUTH) as ws:
        await send(ws, chat("cut", model="gpt-4o-mini"))
        text, final, chunks = (await collect(ws, ["cut"]))["cut"]
    assert chunks >= 1
    assert final["type"] == "error" and final["provider"] == "up"
    assert final["error"]["message"]


async def test_auth_by_first_message_and_refusals(gateway_factory):
    gw = await gateway_factory(KEYS + provider_toml("fake", "fake", models=["fake-model"]))
    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
        async with trio_websocket.open_websocket_url(ws_url(gw), extra_headers=[(b"authorization", b"Bearer wrong")]):
            pass
    assert rejected.value.status_code == 401
    assert orjson.loads(rejected.value.body)["error"]["code"] == "invalid_api_key"
    # A browser cannot set headers: it authenticates with its first message.
    async with trio_websocket.open_websocket_url(ws_url(gw)) as ws:
        await send(ws, {"type": "auth", "key": "client-key", "id": "a"})
        ok = await recv(ws)
        assert ok["type"] == "authenticated" and ok["key_id"].startswith("key_")
        await send(ws, chat(1))
        assert (await collect(ws, [1]))[1][1]["type"] == "done"
    async with trio_websocket.open_websocket_url(ws_url(gw)) as ws:
        await send(ws, chat(1))
        err = await recv(ws)
        assert err["error"]["code"] == "authentication_required"
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.reason.code == 1008
    async with trio_websocket.open_websocket_url(ws_url(gw)) as ws:
        await send(ws, {"type": "auth", "key": "wrong"})
        assert (await recv(ws))["error"]["code"] == "invalid_api_key"
        with pytest.raises(trio_websocket.ConnectionClosed):
            await recv(ws)
    async with httpx.AsyncClient(base_url=gw.url) as http:
        plain = await http.get("/v1/ws", headers={"authorization": "Bearer client-key"})
    assert plain.status_code == 426 and plain.json()["error"]["code"] == "upgrade_required"


@pytest.fixture
def slow_autojump_clock():
    # Real sockets: jump only once everything has been idle for a while, so socket IO is not outrun.
    return MockClock(autojump_threshold=0.02)


async def test_no_auth_message_within_the_timeout_closes_1008(gateway_factory, slow_autojump_clock):
    gw = await gateway_factory(KEYS + provider_toml("fake", "fake", models=["fake-model"]))
    async with trio_websocket.open_websocket_url(ws_url(gw)) as ws:
        start = trio.current_time()
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason.code == 1008
        assert 5.0 <= trio.current_time() - start < 6.0


async def test_bad_frames_close_with_1003_1009_and_1007(gateway_factory):
    server = '[server]\nhost = "127.0.0.1"\nport = 0\nmax_ws_message_bytes = 2048\n'
    gw = await gateway_factory(server + KEYS + provider_toml("fake", "fake", models=["fake-model"]))
    async with trio_websocket.open_websocket_url(ws_url(gw), extra_headers=AUTH) as ws:
        await ws.send_message(b'{"type": "ping"}')
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.reason.code == 1003
    async with trio_websocket.open_websocket_url(ws_url(gw), extra_headers=AUTH) as ws:
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}
        await send(ws, {"type": "ping", "pad": "é" * 1100})  # 1,100 characters, 2,200 bytes
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.reason.code == 1009
    # A text frame that is not UTF-8: wsproto reports 1007 and trio-websocket (0.12) drops the TCP connection
    # at once without writing that close frame; either way the connection ends and nothing else is affected.
    assert await _raw_invalid_utf8(gw.port) in (1007, None)
    async with trio_websocket.open_websocket_url(ws_url(gw), extra_headers=AUTH) as ws:
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}


async def _raw_invalid_utf8(port: int) -> int | None:
    """Send a text frame that is not UTF-8 on a hand-made connection; the close code received, or None
    when the connection was closed without a close frame. Fails if it stays open."""
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                          b"Authorization: Bearer client-key\r\n\r\n")
    data = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some()
        assert data.startswith(b"HTTP/1.1 101")
        data = data.split(b"\r\n\r\n", 1)[1]
        payload = b"\xff\xfe\xfd"
        mask = b"\x01\x02\x03\x04"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await stream.send_all(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
        while len(data) < 4:
            chunk = await stream.receive_some()
            if not chunk:
                break
            data += chunk
    await stream.aclose()
    if not data:
        return None
    assert data[0] == 0x88, data  # a close frame
    return struct.unpack("!H", data[2:4])[0]


async def test_per_key_limits_apply_to_streams(gateway_factory, gated_factory):
    upstream, gate, _ = await gated_factory()
    gw = await gateway_factory(KEYS + "[limits]\nmax_concurrent_per_tenant = 1\n" + upstream_toml(upstream))
    async with trio_websocket.open_websocket_url(ws_url(gw), extra_headers=AUTH) as ws:
        await send(ws, chat("first"))
        first = await recv(ws)
        assert first["type"] == "chunk"
        await send(ws, chat("second"))
        ended = {}
        while len(ended) < 2:
            msg = await recv(ws)
            if msg["type"] != "chunk":
                ended[msg["id"]] = msg
                gate.open()  # the first was live (held at the gate) until the second's answer
        assert ended["first"]["type"] == "done"
        assert ended["second"]["status"] == 429 and ended["second"]["error"]["type"] == "rate_limit_error"
        # The lease went back with the first stream's end.
        await send(ws, chat("third"))
        assert (await collect(ws, ["third"]))["third"][1]["type"] == "done"


async def test_message_limit_above_one_mebibyte_is_honoured(gateway_factory):
    # trio-websocket's own default limit is 1 MiB; the configured limit must be what applies.
    server = '[server]\nhost = "127.0.0.1"\nport = 0\nmax_ws_message_bytes = 2097152\n'
    gw = await gateway_factory(server + KEYS + provider_toml("fake", "fake", models=["fake-model"]))
    async with trio_websocket.open_websocket_url(ws_url(gw), extra_headers=AUTH,
                                                 max_message_size=4 * 1024 * 1024) as ws:
        await send(ws, {"type": "ping", "pad": "x" * 1_500_000})
        assert await recv(ws) == {"type": "pong"}
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:  # during the send or the receive
            await send(ws, {"type": "ping", "pad": "x" * 2_200_000})
            await recv(ws)
        assert closed.value.reason.code == 1009


async def test_a_client_that_stops_reading_gets_its_own_timeout_and_keeps_its_connection(
        gateway_factory, fake_factory, slow_autojump_clock):
    # The client reads nothing while a large stream fills the connection's queue and socket buffers and the
    # request deadline passes: the stream's wait for the queue is never cancelled by its deadline (which
    # ended the connection with 1007 before); the client then reads everything, the stream's own timeout
    # error, and the connection still answers.
    upstream, _ = await fake_factory(chunks=400, chunk_delay_ms=2, text="x" * 2_000_000)
    gw = await gateway_factory(KEYS + "[server]\nhost = \"127.0.0.1\"\nport = 0\nrequest_timeout_ms = 1500\n"
                               + provider_toml("up", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1",
                                               api_key="sk-up", models=["gpt-4o-mini"]))
    async with trio_websocket.open_websocket_url(ws_url(gw), extra_headers=AUTH, message_queue_size=1) as ws:
        await send(ws, chat("big", model="gpt-4o-mini"))
        await trio.sleep(5)  # past the deadline, reading nothing
        chunks = 0
        while True:
            msg = await recv(ws)
            if msg["type"] != "chunk":
                break
            chunks += 1
        assert msg["type"] == "error" and msg["id"] == "big", msg
        assert msg["error"]["type"] == "timeout_error"
        await send(ws, {"type": "ping"})
        assert (await recv(ws))["type"] == "pong"
    assert chunks >= 1
