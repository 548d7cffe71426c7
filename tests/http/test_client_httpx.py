"""HttpxTransport against a scripted loopback server, and the ``make_transport`` switch.

The httpx transport must behave like the fast one at the seam: same response
interface, same error tree, same default request headers.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from runestone.http.client import FastTransport, PoolLimits, Timeouts, Transport, make_transport
from runestone.http.errors import ConnectError, LocalProtocolError, ReadTimeout, RemoteProtocolError
from runestone.http.httpx_transport import HttpxTransport

Handler = Callable[[trio.SocketStream, list[bytes]], Awaitable[None]]


async def read_request(stream: trio.SocketStream) -> bytes:
    """One whole request (head and Content-Length body), or b"" at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            while len(body) < int(line[15:]):
                body += await stream.receive_some(65536)
    return data[: len(head) + 4] + body


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[str, list[bytes]]]:
    """Serve ``handler(stream, seen_requests)`` on a loopback port; yields the base URL and the requests seen."""
    seen: list[bytes] = []

    async def on_connection(stream: trio.SocketStream) -> None:
        try:
            await handler(stream, seen)
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, on_connection, 0, host="127.0.0.1"))
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}", seen
        nursery.cancel_scope.cancel()


async def echo_chunked(stream: trio.SocketStream, seen: list[bytes]) -> None:
    while request := await read_request(stream):
        seen.append(request)
        body = request.partition(b"\r\n\r\n")[2]
        await stream.send_all(b"HTTP/1.1 201 Created\r\nX-Reply: yes\r\nTransfer-Encoding: chunked\r\n\r\n")
        await stream.send_all(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))


async def test_round_trip_through_httpx() -> None:
    async with serving(echo_chunked) as (url, seen), HttpxTransport() as transport:
        for _ in range(2):
            async with transport.stream("POST", url + "/v1/chat", [("Authorization", "Bearer k")], b"{}") as response:
                assert response.status == 201
                assert response.header(b"X-Reply") == b"yes"
                assert (b"transfer-encoding", b"chunked") in response.headers
                assert await response.read() == b"{}"
    head = seen[0].lower()
    for line in (b"authorization: bearer k", b"user-agent: runestone/0.1", b"accept-encoding: identity"):
        assert line in head
    assert len(seen) == 2


async def test_httpx_streams_chunks_as_they_arrive(autojump_clock: trio.testing.MockClock) -> None:
    first_seen = trio.Event()

    async def two_events(stream: trio.SocketStream, seen: list[bytes]) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n")
        await first_seen.wait()
        await stream.send_all(b"3\r\ntwo\r\n0\r\n\r\n")

    async with serving(two_events) as (url, _), HttpxTransport() as transport:
        chunks = []
        with trio.fail_after(5):
            async with transport.stream("GET", url, []) as response:
                async for chunk in response:
                    chunks.append(chunk)
                    first_seen.set()
    assert chunks == [b"one", b"two"]


async def test_httpx_errors_map_onto_the_transport_error_tree(autojump_clock: trio.testing.MockClock) -> None:
    async def misbehaves(stream: trio.SocketStream, seen: list[bytes]) -> None:
        request = await read_request(stream)
        if b"/garbage" in request:
            await stream.send_all(b"HTTP/1.1 abc\r\n\r\n")
        await trio.sleep_forever()

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()[1]
    probe.close()
    async with serving(misbehaves) as (url, _), HttpxTransport(timeouts=Timeouts(read=5)) as transport:
        cases = [
            (f"http://127.0.0.1:{closed_port}/", ConnectError),
            (url + "/silent", ReadTimeout),
            (url + "/garbage", RemoteProtocolError),
            ("ftp://127.0.0.1/", LocalProtocolError),
        ]
        for target, error in cases:
            with pytest.raises(error):
                async with transport.stream("GET", target, []):
                    pass


def test_http2_without_h2_fails_at_construction() -> None:
    try:
        import h2  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="h2"):
            HttpxTransport(http2=True)
    else:
        pytest.skip("h2 is installed")


async def test_make_transport_picks_the_implementation_by_name() -> None:
    fast = make_transport(limits=PoolLimits(max_connections=3))
    assert isinstance(fast, FastTransport)
    assert isinstance(make_transport("fast"), FastTransport)
    slow = make_transport("httpx", timeouts=Timeouts(read=1))
    assert isinstance(slow, HttpxTransport)
    for transport in (fast, slow):
        assert isinstance(transport, Transport)
        await transport.aclose()
    with pytest.raises(ValueError, match="unknown transport 'h3'"):
        make_transport("h3")
