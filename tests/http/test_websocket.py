"""WebSocket on the HTTP server's port, with trio-websocket as the client."""

from __future__ import annotations

import logging
import os

import pytest
import trio
import trio.testing
import trio_websocket

from runestone.http.server import Request, Response, WebSocketAccept


async def echo_session(ws: trio_websocket.WebSocketConnection) -> None:
    while True:
        message = await ws.get_message()
        if message == "close please":
            await ws.aclose(4001, "asked to")
            return
        if message == "fail please":
            raise RuntimeError("handler broke")
        await ws.send_message(message)


def ws_handler(seen: list[Request] | None = None):
    async def handler(request: Request):
        if seen is not None:
            seen.append(request)
        if not request.websocket:
            return Response(200, body=b"plain")
        offered = (request.header(b"sec-websocket-protocol") or b"").decode()
        if "forbidden" in request.path:
            return Response.json({"error": {"message": "no"}}, status=403)
        subprotocol = "chat.v1" if "chat.v1" in offered else None
        return WebSocketAccept(echo_session, subprotocol=subprotocol, extra_headers=[(b"x-served-by", b"test")])

    return handler


def url(server, path: str = "/ws") -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


async def wait_closed(server) -> None:
    with trio.fail_after(5):
        while server.statistics().connections_open:
            await trio.testing.wait_all_tasks_blocked()
            if server.statistics().connections_open:
                await trio.sleep(0.001)


async def test_round_trip_text_binary_ping_subprotocol_and_close_code(start_server):
    seen: list[Request] = []
    server = await start_server(ws_handler(seen))
    async with trio_websocket.open_websocket_url(url(server, "/ws?room=1"), subprotocols=["other", "chat.v1"]) as ws:
        assert ws.subprotocol == "chat.v1"
        assert (b"x-served-by", b"test") in ws.handshake_headers
        await ws.send_message("hello")
        assert await ws.get_message() == "hello"
        await ws.send_message(b"\x00\x01binary")
        assert await ws.get_message() == b"\x00\x01binary"
        big = os.urandom(200_000)
        await ws.send_message(big)
        assert await ws.get_message() == big
        with trio.fail_after(5):
            await ws.ping(b"are you there")
        assert server.statistics().websockets_open == 1
        await ws.send_message("close please")
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason.code == 4001
        assert closed.value.reason.reason == "asked to"
    [request] = seen
    assert request.websocket and request.path == "/ws" and request.query == "room=1"
    await wait_closed(server)
    assert server.statistics().websockets_open == 0


async def test_unproposed_subprotocol_is_not_selected(start_server):
    server = await start_server(ws_handler())
    async with trio_websocket.open_websocket_url(url(server)) as ws:
        assert ws.subprotocol is None
        await ws.send_message("x")
        assert await ws.get_message() == "x"


async def test_a_response_refuses_the_upgrade(start_server, autojump_clock):
    # (virtual time: trio-websocket leaves its socket open after a rejection, so the
    # server's bounded lingering close is what ends the connection)
    server = await start_server(ws_handler())
    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
        async with trio_websocket.open_websocket_url(url(server, "/forbidden")):
            pass  # pragma: no cover
    assert rejected.value.status_code == 403
    await wait_closed(server)


async def test_handler_failure_closes_with_1011(start_server, caplog):
    server = await start_server(ws_handler())
    with caplog.at_level(logging.ERROR, logger="runestone.http"):
        async with trio_websocket.open_websocket_url(url(server)) as ws:
            await ws.send_message("fail please")
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == 1011
    assert any("handler broke" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    await wait_closed(server)


async def test_client_going_away_ends_the_session(start_server):
    ended = trio.Event()

    async def session(ws):
        try:
            while True:
                await ws.get_message()
        finally:
            ended.set()

    async def handler(request: Request):
        return WebSocketAccept(session)

    server = await start_server(handler)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(
        b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 101 ")
    await stream.aclose()
    with trio.fail_after(5):
        await ended.wait()
    await wait_closed(server)


def masked_text_frame(text: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    payload = bytes(byte ^ mask[i % 4] for i, byte in enumerate(text))
    return bytes([0x81, 0x80 | len(text)]) + mask + payload


async def test_frames_sent_with_the_handshake_are_not_lost(start_server):
    """Bytes read together with the upgrade request are handed to the WebSocket."""
    server = await start_server(ws_handler())
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            + masked_text_frame(b"early"))
        received = b""
        with trio.fail_after(5):
            while b"early" not in received:
                received += await stream.receive_some(65536)
    head, _, frames = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # the accept key for the sample nonce (RFC 6455)
    assert frames == b"\x81\x05early"


async def test_other_upgrades_are_plain_requests_and_close_the_connection(start_server):
    seen: list[Request] = []
    server = await start_server(ws_handler(seen))
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")
        received = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                received += chunk
    assert received.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nconnection: close\r\n" in received and received.endswith(b"plain")
    assert not seen[0].websocket


@pytest.mark.parametrize("key", [
    None,
    b"not base64 at all!!",
    b"dGhlIHNhbXBsZSBub25j",  # base64, but of 15 bytes
    b"dGhlIHNhbXBsZSBub25jZQ=?",  # 24 characters, not base64
    b"dGhlIHNhbXBsZSBub25jZSEh",  # base64 of 18 bytes
])
async def test_an_upgrade_with_an_invalid_key_is_400_and_never_reaches_the_handler(start_server, key):
    seen: list[Request] = []
    server = await start_server(ws_handler(seen))
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + (b"Sec-WebSocket-Key: " + key + b"\r\n" if key is not None else b"")
            + b"Sec-WebSocket-Version: 13\r\n\r\n")
        received = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                received += chunk
    assert received.startswith(b"HTTP/1.1 400 "), received
    assert b"Sec-WebSocket-Key" in received
    assert seen == []
