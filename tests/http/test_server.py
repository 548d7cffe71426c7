"""The HTTP/1.1 server over real loopback sockets, checked by h11 as a strict client."""

from __future__ import annotations

import logging
from email.utils import parsedate_to_datetime

import h11
import orjson
import pytest
import trio
import trio.testing

from runestone.http.server import (
    BodyTooLarge,
    Limits,
    Request,
    Response,
    WebSocketAccept,
    serve_http,
)


def header(response: h11.Response, name: bytes) -> bytes | None:
    for key, value in response.headers:
        if key == name:
            return value
    return None


def error_message(body: bytes, error_type: str = "invalid_request_error") -> str:
    error = orjson.loads(body)["error"]
    assert error["type"] == error_type
    assert error["param"] is None and error["code"] is None
    return error["message"]


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` then read until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        received = bytearray()
        while chunk := await stream.receive_some(65536):
            received += chunk
    return bytes(received)


def parse_responses(data: bytes, methods: list[str]) -> list[tuple[h11.Response, bytes]]:
    """Parse responses to requests sent with ``methods`` in order, strictly, from raw bytes."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    conn.receive_data(b"")
    responses = []
    for method in methods:
        conn.send(h11.Request(method=method, target="/", headers=[("host", "test")]))
        conn.send(h11.EndOfMessage())
        response = conn.next_event()
        assert isinstance(response, h11.Response), response
        body = bytearray()
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            body += event.data
        responses.append((response, bytes(body)))
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
    return responses


async def echo(request: Request) -> Response:
    body = await request.body()
    return Response.json({
        "method": request.method,
        "path": request.path,
        "query": request.query,
        "version": request.http_version,
        "body": body.decode(),
        "keep_alive": request.keep_alive,
        "user_agent": (request.header(b"user-agent") or b"").decode(),
    })


async def wait_connections_closed(server) -> None:
    with trio.fail_after(5):
        while server.statistics().connections_open:
            await trio.testing.wait_all_tasks_blocked()
            if server.statistics().connections_open:
                await trio.sleep(0.001)


# -- basics -----------------------------------------------------------------------------


async def test_keep_alive_connection_serves_several_requests_with_server_headers(start_server, connect):
    server = await start_server(echo)
    client = await connect(server)
    first, body = await client.request("GET", "/v1/models?limit=2", headers=[("User-Agent", "t/1")])
    assert first.status_code == 200
    assert orjson.loads(body) == {
        "method": "GET", "path": "/v1/models", "query": "limit=2", "version": "1.1", "body": "",
        "keep_alive": True, "user_agent": "t/1",
    }
    assert header(first, b"server") == b"runestone"
    assert header(first, b"content-type") == b"application/json"
    assert header(first, b"content-length") == str(len(body)).encode()
    assert header(first, b"connection") == b"keep-alive"
    assert parsedate_to_datetime(header(first, b"date").decode()).tzinfo is not None
    second, body = await client.request("POST", "/v1/chat", body=b"hello")
    assert second.status_code == 200
    assert orjson.loads(body)["body"] == "hello"
    await trio.testing.wait_all_tasks_blocked()
    statistics = server.statistics()
    assert statistics.connections_total == 1
    assert statistics.connections_open == 1
    assert statistics.requests_total == 2
    assert statistics.requests_in_flight == 0


async def test_request_exposes_lowercased_headers_client_and_absolute_form_target(start_server, connect):
    seen: list[Request] = []

    async def handler(request: Request) -> Response:
        seen.append(request)
        return Response(204)

    server = await start_server(handler)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        # h11 would refuse to send the trailing spaces: raw bytes
        await stream.send_all(
            b"GET http://example.com/a%20b?x=1 HTTP/1.1\r\nHost: t\r\nX-Trace: abc  \r\nConnection: close\r\n\r\n")
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
        local_port = stream.socket.getsockname()[1]
    [(response, body)] = parse_responses(bytes(data), ["GET"])
    assert response.status_code == 204 and body == b""
    assert header(response, b"content-length") is None
    request = seen[0]
    assert request.path == "/a%20b" and request.query == "x=1"
    assert (b"x-trace", b"abc") in request.headers
    assert request.header(b"x-trace") == b"abc"
    assert request.header(b"missing") is None
    assert request.client is not None and request.client[0] == "127.0.0.1"
    assert request.client[1] == local_port
    assert not request.websocket


async def test_pipelined_requests_are_answered_in_order_one_at_a_time(start_server, connect):
    active = 0
    most_active = 0
    order: list[str] = []

    async def handler(request: Request) -> Response:
        nonlocal active, most_active
        active += 1
        most_active = max(most_active, active)
        order.append(request.path)
        # give a concurrent handler (a bug) every chance to start meanwhile
        await trio.testing.wait_all_tasks_blocked()
        body = await request.body()
        active -= 1
        return Response(200, [("content-type", "text/plain")], request.path.encode() + b":" + body)

    server = await start_server(handler)
    client = await connect(server)
    requests = [
        (h11.Request(method="POST", target="/one", headers=[("host", "t"), ("content-length", "3")]), b"abc"),
        (h11.Request(method="GET", target="/two", headers=[("host", "t")]), b""),
        (h11.Request(method="POST", target="/three",
                     headers=[("host", "t"), ("transfer-encoding", "chunked")]), b"xyz"),
    ]
    wire = bytearray()
    for request, body in requests:
        writer = h11.Connection(h11.CLIENT)
        wire += writer.send(request)
        if body:
            wire += writer.send(h11.Data(data=body))
        wire += writer.send(h11.EndOfMessage())
    await client.stream.send_all(bytes(wire))  # all three in one write
    bodies = []
    for request, body in requests:
        # replay each request into the parsing client's state machine; its bytes are already sent
        client.conn.send(request)
        if body:
            client.conn.send(h11.Data(data=body))
        client.conn.send(h11.EndOfMessage())
        response, body = await client.read_response()
        assert response.status_code == 200
        bodies.append(body)
        client.conn.start_next_cycle()
    assert bodies == [b"/one:abc", b"/two:", b"/three:xyz"]
    assert order == ["/one", "/two", "/three"]
    assert most_active == 1


async def test_pipelined_request_after_a_malformed_one_is_not_served(start_server):
    server = await start_server(echo)
    data = await raw_exchange(
        server.port,
        b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\nGET /bad HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n"
        b"GET /never HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    (ok, ok_body), (bad, bad_body) = parse_responses(data, ["GET", "GET"])
    assert ok.status_code == 200 and orjson.loads(ok_body)["path"] == "/ok"
    assert bad.status_code == 400 and header(bad, b"connection") == b"close"
    assert "malformed" in error_message(bad_body)
    assert b"/never" not in data
    assert server.statistics().requests_total == 1


# -- bodies -----------------------------------------------------------------------------


async def test_chunked_request_body_is_reassembled(start_server, connect):
    server = await start_server(echo)
    client = await connect(server)
    await client.send(
        h11.Request(method="POST", target="/", headers=[("host", "t"), ("transfer-encoding", "chunked")]),
        h11.Data(data=b"hel"),
    )
    await client.send(h11.Data(data=b"lo "), h11.Data(data=b"world"), h11.EndOfMessage())
    response, body = await client.read_response()
    assert response.status_code == 200
    assert orjson.loads(body)["body"] == "hello world"


async def test_streamed_response_and_streamed_request_body_interleave(start_server, connect):
    """Request body pieces are echoed back as chunks while the client is still sending."""

    async def handler(request: Request) -> Response:
        async def upper():
            async for piece in request.iter_body():
                yield piece.upper()

        return Response(200, [("content-type", "text/plain")], stream=upper())

    server = await start_server(handler)
    client = await connect(server)
    await client.send(
        h11.Request(method="POST", target="/", headers=[("host", "t"), ("transfer-encoding", "chunked")]),
        h11.Data(data=b"hello"),
    )
    response = await client.next_event()
    assert isinstance(response, h11.Response) and response.status_code == 200
    assert header(response, b"transfer-encoding") == b"chunked"
    assert header(response, b"content-length") is None
    assert (await client.next_event()).data == b"HELLO"
    await client.send(h11.Data(data=b"world"))
    assert (await client.next_event()).data == b"WORLD"
    await client.send(h11.EndOfMessage())
    assert isinstance(await client.next_event(), h11.EndOfMessage)
    client.conn.start_next_cycle()
    again, _ = await client.request("GET", "/")
    assert again.status_code == 200


async def test_stream_items_become_chunks_and_empty_items_are_skipped(start_server, connect):
    closed = []

    async def handler(request: Request) -> Response:
        async def events():
            try:
                for item in (b"data: 1\n\n", b"", b"data: 2\n\n"):
                    yield item
            finally:
                closed.append(True)

        return Response(200, [("content-type", "text/event-stream")], stream=events())

    server = await start_server(handler)
    client = await connect(server)
    assert await chunked_items(client, "/") == [b"data: 1\n\n", b"data: 2\n\n"]
    assert closed == [True]


async def chunked_items(client, path: str) -> list[bytes]:
    """GET ``path``: the chunks of its chunked body, as received, after checking the body ended cleanly."""
    await client.send(h11.Request(method="GET", target=path, headers=[("host", "t")]), h11.EndOfMessage())
    response = await client.next_event()
    assert header(response, b"transfer-encoding") == b"chunked"
    received = []
    while isinstance(event := await client.next_event(), h11.Data):
        received.append(event.data)
    assert isinstance(event, h11.EndOfMessage)
    return received


async def test_a_ready_first_item_goes_out_with_the_head_and_a_last_item_with_the_end(
        start_server, connect, monkeypatch):
    from runestone.http import LastItem
    from runestone.http import _connection

    writes = []
    send = _connection._Connection._send

    async def counted(self, data):
        writes.append(bytes(data))
        await send(self, data)

    monkeypatch.setattr(_connection._Connection, "_send", counted)
    steps = []

    async def handler(request: Request) -> Response:
        # /two: the first item, then the last one; /one: the first item is the last
        async def events():
            try:
                steps.append("first")
                if request.path == "/one":
                    yield LastItem(b"data: 1\n\n")
                else:
                    yield b"data: 1\n\n"
                    yield LastItem(b"data: 2\n\n")
                steps.append("read past the last item")
                yield b"data: never\n\n"
            finally:
                steps.append("closed")

        return Response(200, [("content-type", "text/event-stream")], stream=events(), first_ready=True)

    server = await start_server(handler)
    client = await connect(server)
    for path, expected, n_writes in (("/two", [b"data: 1\n\n", b"data: 2\n\n"], 2), ("/one", [b"data: 1\n\n"], 1)):
        writes.clear()
        steps.clear()
        assert await chunked_items(client, path) == expected
        # one write per item: the head rides with the first, the end of the body with the last
        assert len(writes) == n_writes
        assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b"data: 1\n\n\r\n" if n_writes == 2
                                                                                   else b"0\r\n\r\n")
        assert writes[-1].endswith(b"0\r\n\r\n")
        assert steps == ["first", "closed"]
        client.conn.start_next_cycle()  # the connection is kept for the next request


async def test_a_ready_first_item_that_is_the_end_still_makes_a_well_formed_body(start_server, connect):
    async def handler(request: Request) -> Response:
        async def nothing():
            return
            yield b""  # an async generator that ends at once

        return Response(200, [("content-type", "text/event-stream")], stream=nothing(), first_ready=True)

    server = await start_server(handler)
    client = await connect(server)
    for _ in range(2):
        response, body = await client.request("GET", "/")
        assert response.status_code == 200 and body == b""


async def test_unread_body_is_drained_and_the_connection_reused(start_server, connect):
    async def handler(request: Request) -> Response:
        return Response(200, body=b"ignored your body")

    server = await start_server(handler)
    client = await connect(server)
    await client.send(
        h11.Request(method="POST", target="/", headers=[("host", "t"), ("content-length", "10")]),
        h11.Data(data=b"12345"),
    )
    response, body = await client.read_response()
    assert response.status_code == 200 and body == b"ignored your body"
    assert header(response, b"connection") == b"keep-alive"
    await client.send(h11.Data(data=b"67890"), h11.EndOfMessage())
    client.conn.start_next_cycle()
    again, body = await client.request("GET", "/next")
    assert again.status_code == 200 and body == b"ignored your body"
    assert server.statistics().connections_total == 1


async def test_unread_body_too_big_to_drain_closes_the_connection(start_server, connect):
    async def handler(request: Request) -> Response:
        return Response(200, body=b"no")

    server = await start_server(handler)
    client = await connect(server)
    await client.send(
        h11.Request(method="POST", target="/", headers=[("host", "t"), ("content-length", str(2 * 1024 * 1024))]),
        h11.Data(data=b"x" * 1000),
    )
    response, body = await client.read_response()
    assert response.status_code == 200 and header(response, b"connection") == b"close"
    assert await client.read_until_eof() == b""
    await client.aclose()
    await wait_connections_closed(server)


async def test_expect_100_continue_is_sent_when_the_handler_reads_the_body(start_server, connect):
    server = await start_server(echo)
    client = await connect(server)
    await client.send(h11.Request(method="POST", target="/", headers=[
        ("host", "t"), ("content-length", "4"), ("expect", "100-continue")]))
    interim = await client.next_event()
    assert isinstance(interim, h11.InformationalResponse) and interim.status_code == 100
    await client.send(h11.Data(data=b"ping"), h11.EndOfMessage())
    response, body = await client.read_response()
    assert response.status_code == 200 and orjson.loads(body)["body"] == "ping"


async def test_expect_100_continue_is_not_sent_when_the_handler_answers_without_the_body(start_server, connect):
    async def handler(request: Request) -> Response:
        return Response.json({"error": "no"}, status=403)

    server = await start_server(handler)
    client = await connect(server)
    await client.send(h11.Request(method="POST", target="/", headers=[
        ("host", "t"), ("content-length", "4"), ("expect", "100-continue")]))
    response = await client.next_event()
    assert isinstance(response, h11.Response) and response.status_code == 403
    # the client may never send that body: the connection cannot be reused
    assert header(response, b"connection") == b"close"


async def test_head_gets_the_content_length_but_no_body(start_server, connect):
    async def handler(request: Request) -> Response:
        return Response(200, [("content-type", "text/plain")], b"twelve bytes")

    server = await start_server(handler)
    client = await connect(server)
    response, body = await client.request("HEAD", "/")
    assert header(response, b"content-length") == b"12" and body == b""
    response, body = await client.request("GET", "/")
    assert body == b"twelve bytes"


async def test_head_with_a_stream_sends_headers_only_and_closes_the_stream(start_server, connect):
    closed = []

    class Parts:
        def __aiter__(self):
            return self

        async def __anext__(self):
            raise AssertionError("a HEAD response must not consume the stream")

        async def aclose(self):
            closed.append(True)

    async def handler(request: Request) -> Response:
        return Response(200, [("content-type", "text/event-stream")], stream=Parts())

    server = await start_server(handler)
    client = await connect(server)
    response, body = await client.request("HEAD", "/")
    assert response.status_code == 200 and body == b""
    assert closed == [True]
    response, _ = await client.request("HEAD", "/")  # and the connection goes on
    assert response.status_code == 200


# -- HTTP/1.0 and connection management -----------------------------------------------------


async def test_http_10_closes_by_default(start_server):
    server = await start_server(echo)
    data = await raw_exchange(server.port, b"GET /old HTTP/1.0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"\r\nconnection: close" in head
    assert orjson.loads(body)["version"] == "1.0"
    await wait_connections_closed(server)


async def test_http_10_keep_alive_when_asked(start_server):
    server = await start_server(echo)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        request = b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        await stream.send_all(request)
        first = await stream.receive_some(65536)
        assert b"\r\nconnection: keep-alive\r\n" in first
        await stream.send_all(b"GET /b HTTP/1.0\r\n\r\n")
        rest = bytearray()
        while chunk := await stream.receive_some(65536):
            rest += chunk
    assert b'"path":"/b"' in rest and b"\r\nconnection: close\r\n" in rest
    assert server.statistics().connections_total == 1


async def test_http_10_stream_is_delimited_by_close(start_server):
    async def handler(request: Request) -> Response:
        async def parts():
            yield b"one,"
            yield b"two"

        return Response(200, stream=parts())

    server = await start_server(handler)
    data = await raw_exchange(server.port, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head and b"content-length" not in head
    assert b"connection: close" in head
    assert body == b"one,two"


async def test_connection_close_from_the_client_is_honoured(start_server, connect):
    server = await start_server(echo)
    client = await connect(server)
    response, _ = await client.request("GET", "/", headers=[("connection", "close")])
    assert header(response, b"connection") == b"close"
    assert await client.read_until_eof() == b""
    await client.aclose()
    await wait_connections_closed(server)


# -- errors -------------------------------------------------------------------------------


async def test_malformed_request_gets_400_and_the_server_goes_on(start_server, connect):
    server = await start_server(echo)
    for garbage in (b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n",
                    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"):
        data = await raw_exchange(server.port, garbage)
        [(response, body)] = parse_responses(data, ["GET"])
        assert response.status_code == 400
        assert header(response, b"connection") == b"close"
        assert error_message(body)
    client = await connect(server)
    response, _ = await client.request("GET", "/")
    assert response.status_code == 200


async def test_unsupported_http_version_is_refused(start_server):
    server = await start_server(echo)
    data = await raw_exchange(server.port, b"GET / HTTP/2.0\r\nHost: t\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 505 ")


async def test_handler_failure_is_a_500_in_openai_shape_and_is_logged(start_server, connect, caplog):
    async def handler(request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("kaput")
        return Response(200, body=b"fine")

    server = await start_server(handler)
    client = await connect(server)
    with caplog.at_level(logging.ERROR, logger="runestone.http"):
        response, body = await client.request("GET", "/boom")
    assert response.status_code == 500
    assert orjson.loads(body) == {
        "error": {"message": "internal server error", "type": "server_error", "param": None, "code": None}}
    [record] = [r for r in caplog.records if r.name == "runestone.http"]
    assert record.exc_info is not None and "kaput" in str(record.exc_info[1])
    response, body = await client.request("GET", "/fine")
    assert response.status_code == 200 and body == b"fine"


async def test_stream_failing_midway_truncates_the_body(start_server, connect, caplog):
    closed = []

    async def handler(request: Request) -> Response:
        async def parts():
            try:
                yield b"partial"
                raise RuntimeError("upstream broke")
            finally:
                closed.append(True)

        return Response(200, stream=parts())

    server = await start_server(handler)
    client = await connect(server)
    await client.send(h11.Request(method="GET", target="/", headers=[("host", "t")]), h11.EndOfMessage())
    with caplog.at_level(logging.ERROR, logger="runestone.http"):
        assert isinstance(await client.next_event(), h11.Response)
        assert (await client.next_event()).data == b"partial"
        with pytest.raises(h11.RemoteProtocolError, match="incomplete chunked read"):
            await client.next_event()
    await client.aclose()
    assert closed == [True]
    assert any("upstream broke" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    await wait_connections_closed(server)


async def test_websocket_accept_for_a_plain_request_is_a_500(start_server, connect, caplog):
    async def session(ws):
        raise AssertionError("never called")  # pragma: no cover

    async def handler(request: Request):
        return WebSocketAccept(session)

    server = await start_server(handler)
    client = await connect(server)
    with caplog.at_level(logging.ERROR, logger="runestone.http"):
        response, body = await client.request("GET", "/")
    assert response.status_code == 500
    assert error_message(body, "server_error") == "internal server error"
    assert any("not a Response" in r.getMessage() for r in caplog.records)


async def test_invalid_response_header_becomes_a_500(start_server, connect, caplog):
    async def handler(request: Request) -> Response:
        return Response(200, [("x-injected", "a\r\nset-cookie: evil")], b"")

    server = await start_server(handler)
    client = await connect(server)
    with caplog.at_level(logging.ERROR, logger="runestone.http"):
        response, _ = await client.request("GET", "/")
    assert response.status_code == 500
    assert header(response, b"set-cookie") is None


@pytest.mark.parametrize("bad", [
    ("x-injected", "a\nset-cookie: evil"),
    (b"x-injected", b"a\rset-cookie: evil"),
    ("x-evil\r\nset-cookie", "evil"),
    (b"set-cookie: evil\r\nx", b"1"),
    (b"x-colon:", b"1"),
    (b"", b"no name"),
])
async def test_a_header_that_would_split_the_response_is_a_500_also_after_a_good_one(start_server, connect, caplog, bad):
    # The same name is first sent with a clean value, so that a name the server has seen is still checked.
    answers = iter([[(bad[0], "clean")], [bad]])

    async def handler(request: Request) -> Response:
        return Response(200, next(answers), b"ok")

    server = await start_server(handler)
    client = await connect(server)
    with caplog.at_level(logging.ERROR, logger="runestone.http"):
        first, _ = await client.request("GET", "/")
        if first.status_code == 200:  # the name alone was fine
            second, body = await client.request("GET", "/")
        else:
            second, body = first, b""
    assert second.status_code == 500
    assert header(second, b"set-cookie") is None
    assert all(name in (b"content-type", b"content-length", b"date", b"server", b"connection")
               for name, _ in second.headers)


async def test_handler_headers_of_framing_names_are_dropped_in_any_case(start_server, connect):
    async def handler(request: Request) -> Response:
        return Response(200, [("Content-Length", "999"), (b"TRANSFER-ENCODING", b"chunked"),
                              (b"connection", b"upgrade"), ("x-kept", "yes"), (b"X-Bytes", b"1")], b"body")

    server = await start_server(handler)
    client = await connect(server)
    for _ in range(2):
        response, body = await client.request("GET", "/")
        assert (response.status_code, body) == (200, b"body")
        assert header(response, b"content-length") == b"4"
        assert header(response, b"transfer-encoding") is None
        assert header(response, b"connection") == b"keep-alive"
        assert (header(response, b"x-kept"), header(response, b"x-bytes")) == (b"yes", b"1")


async def test_prebuilt_header_lines_are_written_as_they_are_and_a_bare_line_feed_in_them_is_a_500(start_server,
                                                                                                   connect):
    from runestone.http import HEAD_LINES

    block = b"x-ratelimit-limit-requests: 10\r\nx-ratelimit-remaining-requests: 9\r\n"
    answers = iter([[(b"x-before", b"1"), (HEAD_LINES, block), (b"x-after", b"2")],
                    [(HEAD_LINES, b"x-one: 1\nset-cookie: evil\r\n")]])

    async def handler(request: Request) -> Response:
        return Response(200, next(answers), b"ok")

    server = await start_server(handler)
    client = await connect(server)
    response, body = await client.request("GET", "/")
    assert (response.status_code, body) == (200, b"ok")
    assert [(n, v) for n, v in response.headers if n.startswith(b"x-")] == [
        (b"x-before", b"1"), (b"x-ratelimit-limit-requests", b"10"), (b"x-ratelimit-remaining-requests", b"9"),
        (b"x-after", b"2")]
    second, _ = await client.request("GET", "/")
    assert second.status_code == 500
    assert header(second, b"set-cookie") is None


async def test_a_header_block_is_checked_when_made_and_written_beside_headers_seen_before_and_new(start_server,
                                                                                                   connect):
    from runestone.http import header_block

    block = header_block(((b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")))
    for bad in ((b"x-a", b"1\r\nset-cookie: evil"), (b"x:b", b"1"), (b"Content-Length", b"9"), (b"", b"1")):
        with pytest.raises(ValueError):
            header_block((bad,))

    async def handler(request: Request) -> Response:
        # A name written before, a block, a str pair, a new name each time, and a dropped framing name.
        return Response(200, [(b"x-seen", b"1"), block, ("x-str", "s"), (request.path[1:].encode(), b"v"),
                              (b"connection", b"close")], b"ok")

    server = await start_server(handler)
    client = await connect(server)
    for path in ("/x-first", "/x-second", "/x-first"):
        response, body = await client.request("GET", path)
        assert (response.status_code, body) == (200, b"ok")
        assert [(n, v) for n, v in response.headers if n not in (b"date", b"server", b"content-length")] == [
            (b"x-seen", b"1"), (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
            (b"x-str", b"s"), (path[1:].encode(), b"v"), (b"connection", b"keep-alive")]


# -- limits -------------------------------------------------------------------------------


async def test_too_long_request_line_is_400(start_server):
    server = await start_server(echo, max_request_line=64)
    data = await raw_exchange(server.port, b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: t\r\n\r\n")
    [(response, body)] = parse_responses(data, ["GET"])
    assert response.status_code == 400
    assert error_message(body) == "request line exceeds the limit of 64 bytes"


async def test_too_many_headers_is_431(start_server):
    server = await start_server(echo, max_headers=5)
    headers = b"".join(b"X-%d: v\r\n" % i for i in range(10))
    data = await raw_exchange(server.port, b"GET / HTTP/1.1\r\n" + headers + b"\r\n")
    [(response, body)] = parse_responses(data, ["GET"])
    assert response.status_code == 431
    assert error_message(body) == "request has more than 5 headers"


async def test_too_large_headers_is_431(start_server):
    server = await start_server(echo, max_header_bytes=256)
    data = await raw_exchange(server.port, b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 300 + b"\r\n\r\n")
    [(response, body)] = parse_responses(data, ["GET"])
    assert response.status_code == 431
    assert error_message(body) == "request headers exceed the limit of 256 bytes"


@pytest.mark.parametrize("extra", [0, 1], ids=["at-the-limit", "one-byte-over"])
async def test_the_header_size_limit_counts_each_line_as_name_value_and_four_bytes(start_server, extra):
    # As counted: "host: t" 4 + 1 + 4 bytes, "connection: close" 10 + 5 + 4, "x-big: b..." 5 + n + 4.
    server = await start_server(echo, max_header_bytes=256)
    n = 256 - 9 - 19 - 9 + extra
    data = await raw_exchange(server.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Big: "
                              + b"b" * n + b"\r\n\r\n")
    [(response, body)] = parse_responses(data, ["GET"])
    assert response.status_code == (200 if not extra else 431)


async def test_never_ending_header_line_is_cut_off_with_431(start_server):
    server = await start_server(echo, max_header_bytes=1024)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nX-Endless: ")
        sent = 0
        with trio.move_on_after(5):
            try:
                while sent < 4 * 1024 * 1024:
                    await stream.send_all(b"z" * 16384)
                    sent += 16384
            except trio.BrokenResourceError:
                pass
        data = bytearray()
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    assert sent < 4 * 1024 * 1024
    assert data.startswith(b"HTTP/1.1 431 ")


async def test_content_length_over_the_limit_is_413_before_reading_the_body(start_server, connect):
    called = []

    async def handler(request: Request) -> Response:
        called.append(request)
        return Response(200)

    server = await start_server(handler, max_body_bytes=100)
    client = await connect(server)
    await client.send(h11.Request(method="POST", target="/", headers=[
        ("host", "t"), ("content-length", "1000"), ("expect", "100-continue")]))
    response, body = await client.read_response()  # would fail on a 100 Continue first
    assert response.status_code == 413
    assert error_message(body) == "request body exceeds the limit of 100 bytes"
    assert header(response, b"connection") == b"close"
    assert called == []


async def test_chunked_body_over_the_limit_is_413(start_server, connect):
    server = await start_server(echo, max_body_bytes=100)
    client = await connect(server)
    await client.send(h11.Request(method="POST", target="/", headers=[("host", "t"), ("transfer-encoding", "chunked")]))
    for _ in range(3):
        await client.send(h11.Data(data=b"y" * 60))
    response, body = await client.read_response()
    assert response.status_code == 413
    assert error_message(body) == "request body exceeds the limit of 100 bytes"


async def test_body_too_large_is_catchable_by_the_handler(start_server, connect):
    async def handler(request: Request) -> Response:
        try:
            await request.body()
        except BodyTooLarge as error:
            return Response.json({"caught": error.message}, status=413)
        return Response(200)

    server = await start_server(handler, max_body_bytes=10)
    client = await connect(server)
    await client.send(h11.Request(method="POST", target="/", headers=[("host", "t"), ("transfer-encoding", "chunked")]),
                      h11.Data(data=b"0123456789abcdef"))
    response, body = await client.read_response()
    assert response.status_code == 413 and orjson.loads(body)["caught"].startswith("request body exceeds")
    assert header(response, b"connection") == b"close"


async def test_over_max_connections_gets_503(start_server, connect):
    server = await start_server(echo, max_connections=1)
    first = await connect(server)
    response, _ = await first.request("GET", "/")
    assert response.status_code == 200
    data = await raw_exchange(server.port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    [(refused, body)] = parse_responses(data, ["GET"])
    assert refused.status_code == 503
    assert error_message(body, "server_error")
    assert server.statistics().connections_refused == 1
    response, _ = await first.request("GET", "/")
    assert response.status_code == 200


# -- timeouts (virtual time) -------------------------------------------------------------


async def test_slow_request_head_gets_408(start_server, autojump_clock):
    server = await start_server(echo, header_timeout=10)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n")
        start = trio.current_time()
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
        elapsed = trio.current_time() - start
    [(response, body)] = parse_responses(bytes(data), ["GET"])
    assert response.status_code == 408
    assert error_message(body) == "request head not received within 10 seconds"
    assert 10 <= elapsed < 11


async def test_slow_body_gets_408(start_server, connect, autojump_clock):
    server = await start_server(echo, body_timeout=5, header_timeout=60)
    client = await connect(server)
    await client.send(h11.Request(method="POST", target="/", headers=[("host", "t"), ("content-length", "10")]),
                      h11.Data(data=b"abc"))
    start = trio.current_time()
    response, body = await client.read_response()
    assert response.status_code == 408
    assert error_message(body) == "no request body data received for 5 seconds"
    assert 5 <= trio.current_time() - start < 6


async def test_idle_keep_alive_connection_is_closed_silently(start_server, connect, autojump_clock):
    server = await start_server(echo, keepalive_timeout=30)
    client = await connect(server)
    await client.request("GET", "/")
    start = trio.current_time()
    assert await client.read_until_eof() == b""
    assert 30 <= trio.current_time() - start < 31
    await wait_connections_closed(server)


async def test_client_not_reading_is_dropped_after_the_write_timeout(start_server, autojump_clock):
    produced = 0
    closed = trio.Event()

    async def handler(request: Request) -> Response:
        async def flood():
            nonlocal produced
            try:
                while produced < 2000:
                    produced += 1
                    yield b"x" * 65536
            finally:
                closed.set()

        return Response(200, stream=flood())

    server = await start_server(handler, write_timeout=7)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    stream.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    start = trio.current_time()
    await closed.wait()
    assert produced < 2000
    assert trio.current_time() - start >= 7
    await wait_connections_closed(server)
    stream.socket.close()


# -- client going away -----------------------------------------------------------------------


async def test_client_disconnecting_mid_stream_closes_the_producer(start_server, connect):
    started = trio.Event()
    closed = trio.Event()
    outcome = []

    async def handler(request: Request) -> Response:
        async def events():
            try:
                yield b"data: first\n\n"
                started.set()
                await trio.sleep_forever()
            except BaseException as exc:
                outcome.append(type(exc))
                raise
            finally:
                closed.set()

        return Response(200, [("content-type", "text/event-stream")], stream=events())

    server = await start_server(handler)
    client = await connect(server)
    await client.send(h11.Request(method="GET", target="/", headers=[("host", "t")]), h11.EndOfMessage())
    assert isinstance(await client.next_event(), h11.Response)
    assert (await client.next_event()).data == b"data: first\n\n"
    await started.wait()
    await client.aclose()
    with trio.fail_after(5):
        await closed.wait()
    assert outcome == [trio.Cancelled]
    await wait_connections_closed(server)
    assert server.statistics().requests_in_flight == 0


async def test_client_disconnecting_during_the_body_is_not_an_error(start_server, caplog):
    seen = []

    async def handler(request: Request) -> Response:
        try:
            await request.body()
        except Exception as exc:
            seen.append(type(exc).__name__)
            raise
        return Response(200)

    server = await start_server(handler)
    with caplog.at_level(logging.ERROR, logger="runestone.http"):
        data = await raw_exchange_half_closed(server.port, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
        await wait_connections_closed(server)
    assert data == b""
    assert seen == ["ClientDisconnected"]
    assert not [r for r in caplog.records if r.name == "runestone.http"]


async def raw_exchange_half_closed(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        await stream.send_eof()
        received = bytearray()
        while chunk := await stream.receive_some(65536):
            received += chunk
    return bytes(received)


# -- graceful stop --------------------------------------------------------------------------


async def test_request_stop_lets_in_flight_streams_finish_and_refuses_new_connections(nursery, connect):
    release = trio.Event()
    returned = trio.Event()

    async def handler(request: Request) -> Response:
        if request.path == "/quick":
            return Response(200, body=b"quick")

        async def parts():
            yield b"before"
            await release.wait()
            yield b"after"

        return Response(200, stream=parts())

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        await serve_http(handler, "127.0.0.1", 0, task_status=task_status)
        returned.set()

    server = await nursery.start(run)
    streaming = await connect(server)
    idle = await connect(server)
    assert (await idle.request("GET", "/quick"))[1] == b"quick"
    await streaming.send(h11.Request(method="GET", target="/stream", headers=[("host", "t")]), h11.EndOfMessage())
    assert isinstance(await streaming.next_event(), h11.Response)
    assert (await streaming.next_event()).data == b"before"

    server.request_stop()
    assert server.statistics().stopping
    assert await idle.read_until_eof() == b""
    await idle.aclose()
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", server.port)
    assert not returned.is_set()

    release.set()
    assert (await streaming.next_event()).data == b"after"
    assert isinstance(await streaming.next_event(), h11.EndOfMessage)
    assert await streaming.read_until_eof() == b""
    await streaming.aclose()
    with trio.fail_after(5):
        await returned.wait()
    assert server.statistics().connections_open == 0


async def test_request_stop_cancels_what_outlives_the_drain_timeout(nursery, connect, autojump_clock):
    returned = trio.Event()
    cancelled = []

    async def handler(request: Request) -> Response:
        async def parts():
            try:
                yield b"forever"
                await trio.sleep_forever()
            except trio.Cancelled:
                cancelled.append(trio.current_time())
                raise

        return Response(200, stream=parts())

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        await serve_http(handler, "127.0.0.1", 0, limits=Limits(drain_timeout=3), task_status=task_status)
        returned.set()

    server = await nursery.start(run)
    client = await connect(server)
    await client.send(h11.Request(method="GET", target="/", headers=[("host", "t")]), h11.EndOfMessage())
    assert isinstance(await client.next_event(), h11.Response)
    assert (await client.next_event()).data == b"forever"
    stop_at = trio.current_time()
    server.request_stop()
    with pytest.raises(h11.RemoteProtocolError):
        await client.next_event()
    await returned.wait()
    assert len(cancelled) == 1 and 3 <= cancelled[0] - stop_at < 4


@pytest.mark.parametrize("head, why", [
    (b"GET / HTTP/1.1\r\n\r\n", b"needs a Host header"),
    (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", b"needs a Host header"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"only one Host header"),
    (b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", b"only one Host header"),
])
async def test_http_11_without_exactly_one_host_is_400_and_not_served(start_server, head, why):
    seen = []

    async def handler(request: Request) -> Response:
        seen.append(request)
        return Response(200, body=b"served")

    server = await start_server(handler)
    data = await raw_exchange(server.port, head)
    [(response, body)] = parse_responses(data, ["GET"])
    assert response.status_code == 400 and header(response, b"connection") == b"close"
    assert why in body
    assert seen == []


async def test_a_closed_connection_is_freed_at_once_not_left_to_the_collector(start_server, collector_off):
    # httptools' parser holds the connection's bound callbacks: the connection lets go of it when it ends,
    # so that a client that sends one request per connection leaves no reference cycle behind.
    from runestone.http._connection import _Connection

    server = await start_server(echo)
    request = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    for _ in range(10):
        assert b" 200 " in await raw_exchange(server.port, request)
    await trio.testing.wait_all_tasks_blocked()  # each server task ends just after its client saw the close
    # (the accept loop still holds the last connection it accepted until the next one: that is not garbage)
    left = collector_off(_Connection)
    assert left == 0, f"{left} connection(s) were left for the collector"
