"""Random bytes thrown at the HTTP server never crash it nor leave a connection behind."""

from __future__ import annotations

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runestone.http.server import Request, Response, serve_http

_VALID = (
    b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
    b"Expect: 100-continue\r\n\r\nhelloGET / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\n"
)

# Mutations of a valid pipelined exchange find far more parser paths than uniform noise.
_mutated = st.tuples(
    st.integers(0, len(_VALID)), st.integers(0, 12), st.binary(max_size=12)
).map(lambda cut: _VALID[: cut[0]] + cut[2] + _VALID[cut[0] + cut[1]:])
_tokens = st.lists(
    st.sampled_from([
        b"GET ", b"POST ", b"HEAD ", b"/", b"/a?b", b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", b"Host: t\r\n",
        b"Content-Length: 3\r\n", b"Content-Length: -1\r\n", b"Transfer-Encoding: chunked\r\n",
        b"Connection: close\r\n", b"Connection: Upgrade\r\nUpgrade: websocket\r\n", b"Expect: 100-continue\r\n",
        b"\r\n", b"abc", b"5\r\nhello\r\n", b"0\r\n\r\n", b"ffffffffffffffff\r\n", b"\x00", b":", b" ",
    ]),
    max_size=30,
).map(b"".join)
_payloads = st.one_of(st.binary(max_size=600), _mutated, _tokens)


async def _handler(request: Request) -> Response:
    if request.path == "/":
        async def parts():
            async for piece in request.iter_body():
                yield piece

        return Response(200, stream=parts())
    return Response(200, body=await request.body())


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=_payloads, split=st.integers(0, 700))
async def test_random_bytes_never_crash_the_server_or_leak_connections(payload: bytes, split: int) -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_http, _handler, "127.0.0.1", 0)
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                try:
                    # two writes, so that requests also arrive cut at arbitrary points
                    await stream.send_all(payload[:split])
                    await trio.testing.wait_all_tasks_blocked()
                    await stream.send_all(payload[split:])
                    await stream.send_eof()
                    while await stream.receive_some(65536):
                        pass
                except trio.BrokenResourceError:
                    pass  # the server may refuse and close before reading everything
            while server.statistics().connections_open:
                await trio.testing.wait_all_tasks_blocked()
                if server.statistics().connections_open:
                    await trio.sleep(0.001)
        statistics = server.statistics()
        assert statistics.requests_in_flight == 0
        # the server still answers
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(b"GET /ok HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := await stream.receive_some(65536):
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        nursery.cancel_scope.cancel()
