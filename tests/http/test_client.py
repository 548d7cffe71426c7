"""FastTransport against scripted HTTP/1.1 servers on real loopback sockets.

Each test server is a few lines of raw trio code playing one behaviour (keep-alive,
closing idle connections, chunked or close-delimited bodies, never answering...),
so the client is checked against exactly the wire traffic a test describes.
"""

from __future__ import annotations

import gc
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import attrs
import pytest
import trio
import trustme

from runestone.http.client import (
    FastTransport,
    PoolLimits,
    PreparedHeaders,
    Timeouts,
    UpstreamResponse,
    prepared_headers,
)
from runestone.http.errors import (
    ConnectError,
    ConnectTimeout,
    LocalProtocolError,
    PoolTimeout,
    ReadTimeout,
    RemoteProtocolError,
    TransportError,
    TransportTimeout,
    WriteTimeout,
)


class Peer:
    """The server side of one accepted connection, with just enough HTTP to read requests."""

    def __init__(self, stream: trio.abc.Stream, server: Server) -> None:
        self.stream = stream
        self.server = server
        self.buffer = b""

    async def read_request(self) -> tuple[bytes, bytes] | None:
        """The next request's head and body, or None at EOF."""
        while b"\r\n\r\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.buffer += data
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            rest += await self.stream.receive_some(65536)
        self.buffer = rest[length:]
        self.server.requests.append(head)
        return head, rest[:length]

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def respond(self, body: bytes = b"hello", extra: bytes = b"") -> None:
        await self.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body))

    async def wait_eof(self) -> None:
        """Return when the client closes its side; fail if it sends more instead."""
        data = await self.stream.receive_some(65536)
        assert data == b"", data


@attrs.define
class Server:
    port: int = 0
    connections: int = 0
    requests: list[bytes] = attrs.Factory(list)
    scheme: str = "http"

    def url(self, path: str = "/") -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    @property
    def origin(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"


Handler = Callable[[Peer], Awaitable[None]]


@asynccontextmanager
async def serving(handler: Handler, *, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    server = Server(scheme="https" if ssl_context else "http")

    async def on_connection(stream: trio.SocketStream) -> None:
        server.connections += 1
        peer_stream: trio.abc.Stream = stream
        if ssl_context is not None:
            peer_stream = trio.SSLStream(stream, ssl_context, server_side=True)
        try:
            await handler(Peer(peer_stream, server))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(peer_stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, on_connection, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()


async def keep_alive(peer: Peer) -> None:
    while await peer.read_request() is not None:
        await peer.respond()


async def get(transport: FastTransport, url: str, **kw: object) -> tuple[UpstreamResponse, bytes]:
    async with transport.stream("GET", url, [], **kw) as response:
        return response, await response.read()


# pooling


async def test_sequential_requests_share_one_connection() -> None:
    async with serving(keep_alive) as server, FastTransport() as transport:
        for _ in range(5):
            response, body = await get(transport, server.url("/v1/models"))
            assert (response.status, body) == (200, b"hello")
        assert server.connections == 1
        stats = transport.statistics().origin(server.origin)
        assert stats is not None
        assert (stats.open, stats.idle, stats.in_use, stats.waiting) == (1, 1, 0, 0)


async def test_a_finished_response_is_freed_at_once_not_left_to_the_collector(collector_off) -> None:
    # httptools' parser holds its response's bound callbacks: unless aclose() lets go of the parser, every
    # response is a reference cycle (with its headers and chunks) that only a collection frees.
    from runestone.http._response import _FastResponse

    async with serving(keep_alive) as server, FastTransport() as transport:
        for _ in range(20):
            response, body = await get(transport, server.url("/v1/models"))
            assert body == b"hello"
        for _ in range(5):
            async with transport.stream("GET", server.url("/"), []) as response:
                assert b"".join([chunk async for chunk in response]) == b"hello"
        del response
        assert sum(1 for o in gc.get_objects() if isinstance(o, _FastResponse)) == 0
        assert collector_off(_FastResponse) == 0


@pytest.mark.parametrize("prepare", [list, prepared_headers], ids=["list", "prepared"])
async def test_request_head_carries_host_length_agent_and_caller_headers(prepare) -> None:
    async with serving(keep_alive) as server, FastTransport() as transport:
        headers = prepare([("Authorization", "Bearer k"), (b"X-Trace", b"7"), ("content-length", "999")])
        assert isinstance(headers, PreparedHeaders) is (prepare is prepared_headers)
        for _ in range(2):  # prepared once, sent as they are each time
            async with transport.stream("POST", server.url("/v1/chat?x=1"), headers, b'{"a":1}') as response:
                assert await response.read() == b"hello"
        async with transport.stream("POST", server.url("/e"), prepare([("User-Agent", "sdk/2"), ("Host", "api.test")])):
            pass
    first, again, second = server.requests
    assert again == first
    lines = first.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat?x=1 HTTP/1.1"
    assert sorted(lines[1:]) == sorted(
        [
            b"Authorization: Bearer k",
            b"X-Trace: 7",
            b"Host: 127.0.0.1:%d" % server.port,
            b"User-Agent: runestone/0.1",
            b"Content-Length: 7",
        ]
    )
    assert sorted(second.split(b"\r\n")[1:]) == [b"Content-Length: 0", b"Host: api.test", b"User-Agent: sdk/2"]


@pytest.mark.parametrize("idle", [0, 1], ids=["reused-at-once", "reused-after-1s"])
async def test_idle_connection_closed_by_server_is_replaced_by_a_new_one(
    autojump_clock: trio.testing.MockClock, idle: float
) -> None:
    # Reused at once, the request goes out on the closed connection and is resent on a new one; after a while
    # idle, the pool checks the connection first. Either way the caller gets its answer.
    closed = trio.Event()

    async def one_request_per_connection(peer: Peer) -> None:
        await peer.read_request()
        await peer.respond()
        await peer.stream.aclose()
        closed.set()

    async with serving(one_request_per_connection) as server, FastTransport() as transport:
        await get(transport, server.url())
        await closed.wait()
        await trio.sleep(idle)
        response, body = await get(transport, server.url())
        assert (response.status, body) == (200, b"hello")
    assert server.connections == 2
    assert len(server.requests) == 2


async def test_connection_idle_a_while_that_got_stray_bytes_is_not_reused(autojump_clock: trio.testing.MockClock) -> None:
    # A server may send an idle connection a 408 nobody asked for (before closing it): after a while idle,
    # the next request must not take those bytes for its answer.
    sent = trio.Event()

    async def times_out_idle_connections(peer: Peer) -> None:
        if peer.server.connections == 1:
            await peer.read_request()
            await peer.respond(b"first")
            await peer.send(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
            sent.set()
            await keep_alive(peer)
            return
        await keep_alive(peer)

    async with serving(times_out_idle_connections) as server, FastTransport() as transport:
        assert (await get(transport, server.url()))[1] == b"first"
        await sent.wait()
        await trio.sleep(1)
        response, body = await get(transport, server.url())
        assert (response.status, body) == (200, b"hello")
    assert server.connections == 2


async def test_reused_connection_dropped_after_the_request_is_retried_once_on_a_new_one() -> None:
    async def drops_second_request(peer: Peer) -> None:
        if peer.server.connections == 1:
            await peer.read_request()
            await peer.respond(b"first")
            await peer.read_request()
            return  # closes without a response, as a server timing out keep-alive would
        await keep_alive(peer)

    async with serving(drops_second_request) as server, FastTransport() as transport:
        assert (await get(transport, server.url()))[1] == b"first"
        assert (await get(transport, server.url()))[1] == b"hello"
    assert server.connections == 2
    assert len(server.requests) == 3


async def test_new_connection_closed_without_response_is_an_error_not_a_retry() -> None:
    async def hangs_up(peer: Peer) -> None:
        await peer.read_request()

    async with serving(hangs_up) as server, FastTransport() as transport:
        with pytest.raises(RemoteProtocolError, match="before sending a response"):
            await get(transport, server.url())
        assert server.connections == 1
        assert transport.statistics().origins[0].open == 0


# bodies


async def test_chunked_body_is_dechunked_and_the_connection_kept() -> None:
    async def chunked(peer: Peer) -> None:
        while await peer.read_request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await peer.send(b"7\r\n, world\r\n0\r\n\r\n")

    async with serving(chunked) as server, FastTransport() as transport:
        for _ in range(2):
            response, body = await get(transport, server.url())
            assert body == b"hello, world"
            assert response.header(b"Transfer-Encoding") == b"chunked"
    assert server.connections == 1


async def test_close_delimited_body_ends_at_eof_and_the_connection_is_not_pooled() -> None:
    async def until_close(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await peer.send(b"part two")

    async with serving(until_close) as server, FastTransport() as transport:
        assert (await get(transport, server.url()))[1] == b"part one, part two"
        assert transport.statistics().origins[0].open == 0
        await get(transport, server.url())
    assert server.connections == 2


async def test_connection_close_header_keeps_the_connection_out_of_the_pool() -> None:
    async def says_close(peer: Peer) -> None:
        await peer.read_request()
        await peer.respond(extra=b"Connection: close\r\n")
        await peer.wait_eof()

    async with serving(says_close) as server, FastTransport() as transport:
        for _ in range(2):
            assert (await get(transport, server.url()))[1] == b"hello"
        assert transport.statistics().origins[0].open == 0
    assert server.connections == 2


async def test_body_cut_short_is_a_remote_protocol_error() -> None:
    async def truncates(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")

    async with serving(truncates) as server, FastTransport() as transport:
        async with transport.stream("GET", server.url(), []) as response:
            with pytest.raises(RemoteProtocolError, match="before the response body ended"):
                await response.read()
        assert transport.statistics().origins[0].open == 0


async def test_head_204_and_304_have_no_body_and_keep_the_connection() -> None:
    async def no_bodies(peer: Peer) -> None:
        statuses = iter([b"200 OK\r\nContent-Length: 5", b"204 No Content", b"304 Not Modified\r\nContent-Length: 9"])
        while await peer.read_request() is not None:
            await peer.send(b"HTTP/1.1 " + next(statuses, b"200 OK\r\nContent-Length: 2") + b"\r\n\r\n")
            if len(peer.server.requests) == 4:
                await peer.send(b"ok")

    async with serving(no_bodies) as server, FastTransport() as transport:
        for method, status in (("HEAD", 200), ("GET", 204), ("GET", 304)):
            async with transport.stream(method, server.url(), []) as response:
                assert response.status == status
                assert response.header(b"content-length") in (b"5", None, b"9")
                assert await response.read() == b""
        assert (await get(transport, server.url()))[1] == b"ok"
    assert server.connections == 1


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Long-Header: " + b"v" * 300 + b"\r\n\r\nhello world",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
    ],
    ids=["content-length", "chunked-with-extension-and-trailer"],
)
async def test_responses_trickling_in_byte_by_byte_parse_the_same(response: bytes) -> None:
    async def trickles(peer: Peer) -> None:
        while await peer.read_request() is not None:
            for i in range(len(response)):
                await peer.send(response[i : i + 1])
                await trio.sleep(0)

    async with serving(trickles) as server, FastTransport() as transport:
        for _ in range(2):
            response_, body = await get(transport, server.url())
            assert (response_.status, body) == (200, b"hello world")
    assert server.connections == 1


async def test_interim_1xx_responses_are_skipped() -> None:
    async def early_hints(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        await peer.respond(b"final")

    async with serving(early_hints) as server, FastTransport() as transport:
        response, body = await get(transport, server.url())
    assert (response.status, body, response.header(b"link")) == (200, b"final", None)


async def test_streamed_chunks_arrive_before_the_response_ends(autojump_clock: trio.testing.MockClock) -> None:
    first_seen = trio.Event()

    async def sse(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        await peer.send(b"8\r\ndata: 1\n\r\n")
        # The rest is only sent once the client has relayed the first event: a client that
        # buffered until the end would deadlock here and trip the fail_after below.
        await first_seen.wait()
        await peer.send(b"8\r\ndata: 2\n\r\n0\r\n\r\n")

    async with serving(sse) as server, FastTransport() as transport:
        chunks = []
        with trio.fail_after(5):
            async with transport.stream("POST", server.url(), [], b"{}") as response:
                async for chunk in response:
                    chunks.append(chunk)
                    first_seen.set()
        assert chunks == [b"data: 1\n", b"data: 2\n"]
        assert transport.statistics().origins[0].idle == 1


async def test_malformed_status_line_is_a_remote_protocol_error() -> None:
    async def garbage(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 abc OK\r\n\r\n")

    async with serving(garbage) as server, FastTransport() as transport:
        with pytest.raises(RemoteProtocolError, match="malformed response"):
            await get(transport, server.url())
        assert transport.statistics().origins[0].open == 0


async def test_bytes_after_the_response_keep_the_connection_out_of_the_pool() -> None:
    async def trailing_junk(peer: Peer) -> None:
        while await peer.read_request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokjunk")

    async with serving(trailing_junk) as server, FastTransport() as transport:
        for _ in range(2):
            assert (await get(transport, server.url()))[1] == b"ok"
    assert server.connections == 2


# timeouts


async def test_server_that_never_answers_is_a_read_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async def silent(peer: Peer) -> None:
        await peer.read_request()
        await trio.sleep_forever()

    async with serving(silent) as server, FastTransport(timeouts=Timeouts(read=5)) as transport:
        start = trio.current_time()
        with pytest.raises(ReadTimeout):
            await get(transport, server.url())
        assert trio.current_time() - start == pytest.approx(5)
        assert transport.statistics().origins[0].open == 0


async def test_each_request_times_out_on_its_own_read_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async def silent(peer: Peer) -> None:
        await peer.read_request()
        await trio.sleep_forever()

    timed_out_at: dict[float, float] = {}

    async def fetch(transport: FastTransport, url: str, read: float) -> None:
        with pytest.raises(ReadTimeout):
            await get(transport, url, timeouts=Timeouts(read=read))
        timed_out_at[read] = trio.current_time()

    async with serving(silent) as server, FastTransport() as transport:
        async with trio.open_nursery() as nursery:
            # The longer timeout is armed first: the shorter one must still fire on time.
            for read in (10.0, 3.0, 7.0):
                nursery.start_soon(fetch, transport, server.url(), read)
                await trio.sleep(0)
    assert timed_out_at == {read: pytest.approx(read) for read in (10.0, 3.0, 7.0)}


async def test_read_timeout_is_the_gap_between_reads_not_the_whole_body(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow_stream(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(4):
            await trio.sleep(3)
            await peer.send(b"1\r\nx\r\n")
        await trio.sleep_forever()

    async with serving(slow_stream) as server, FastTransport() as transport:
        received = b""
        async with transport.stream("GET", server.url(), [], timeouts=Timeouts(read=4)) as response:
            with pytest.raises(ReadTimeout):
                async for chunk in response:
                    received += chunk
        assert received == b"xxxx"
        assert trio.current_time() == pytest.approx(16)
        assert transport.statistics().origins[0].open == 0


async def test_server_that_never_reads_is_a_write_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async def never_reads(peer: Peer) -> None:
        await trio.sleep_forever()

    async with serving(never_reads) as server, FastTransport(timeouts=Timeouts(write=6)) as transport:
        with pytest.raises(WriteTimeout):
            # Far more than loopback socket buffers hold, so the write has to wait.
            async with transport.stream("POST", server.url(), [], b"x" * 64_000_000):
                pass
        assert trio.current_time() == pytest.approx(6)
        assert transport.statistics().origins[0].open == 0


async def test_connect_timeout_when_the_listener_never_accepts(autojump_clock: trio.testing.MockClock) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    # Fill the accept queue: the kernel then drops further SYNs, so connecting hangs.
    fillers = []
    for _ in range(2):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    try:
        port = listener.getsockname()[1]
        async with FastTransport(timeouts=Timeouts(connect=3)) as transport:
            with pytest.raises(ConnectTimeout):
                await get(transport, f"http://127.0.0.1:{port}/")
            assert trio.current_time() == pytest.approx(3)
            assert transport.statistics().origins[0].open == 0
    finally:
        for s in (listener, *fillers):
            s.close()


async def test_nothing_listening_is_a_connect_error() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    async with FastTransport() as transport:
        with pytest.raises(ConnectError, match="cannot connect"):
            await get(transport, f"http://127.0.0.1:{port}/")


async def test_waiting_for_a_slot_is_bounded_by_the_pool_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async def slow_body(peer: Peer) -> None:
        while await peer.read_request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
            await trio.sleep(10)
            await peer.send(b"ok")

    limits = PoolLimits(max_connections=1)
    async with serving(slow_body) as server, FastTransport(limits=limits, timeouts=Timeouts(pool=2)) as transport:
        async with transport.stream("GET", server.url(), []) as holder:
            with pytest.raises(PoolTimeout):
                await get(transport, server.url())
            assert trio.current_time() == pytest.approx(2)
            assert await holder.read() == b"ok"
        # A waiter is handed the slot as soon as it frees up: here, the same kept-alive connection.
        async with trio.open_nursery() as nursery:
            results: list[bytes] = []

            async def fetch() -> None:
                results.append((await get(transport, server.url(), timeouts=Timeouts(pool=30)))[1])

            nursery.start_soon(fetch)
            nursery.start_soon(fetch)
        assert results == [b"ok", b"ok"]
        assert trio.current_time() == pytest.approx(30)  # 10 s for the holder, then 10 s each
    assert server.connections == 1


def test_timeouts_are_a_family() -> None:
    for error in (ConnectTimeout, ReadTimeout, WriteTimeout, PoolTimeout):
        assert issubclass(error, TransportTimeout)
        assert issubclass(error, TransportError)
    assert issubclass(RemoteProtocolError, TransportError)


# cancellation


async def test_cancelling_while_awaiting_the_head_closes_the_socket(autojump_clock: trio.testing.MockClock) -> None:
    got_request = trio.Event()
    saw_eof = trio.Event()

    async def watches_for_eof(peer: Peer) -> None:
        await peer.read_request()
        got_request.set()
        with trio.fail_after(1):
            await peer.wait_eof()
        saw_eof.set()

    async with serving(watches_for_eof) as server, FastTransport() as transport:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(get, transport, server.url())
            await got_request.wait()
            nursery.cancel_scope.cancel()
        with trio.fail_after(1):
            await saw_eof.wait()
        assert transport.statistics().origins[0].open == 0


async def test_cancelling_mid_body_closes_the_socket(autojump_clock: trio.testing.MockClock) -> None:
    saw_eof = trio.Event()

    async def endless(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\ntick\r\n")
        with trio.fail_after(1):
            await peer.wait_eof()
        saw_eof.set()

    async with serving(endless) as server, FastTransport() as transport:
        with trio.CancelScope() as scope:
            async with transport.stream("GET", server.url(), []) as response:
                async for chunk in response:
                    assert chunk == b"tick"
                    scope.cancel()
        with trio.fail_after(1):
            await saw_eof.wait()
        assert transport.statistics().origins[0].open == 0


async def test_leaving_the_block_before_the_body_ends_closes_the_connection() -> None:
    async def half_now(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf.")
        await peer.wait_eof()

    async with serving(half_now) as server, FastTransport() as transport:
        async with transport.stream("GET", server.url(), []) as response:
            assert await response.__anext__() == b"half."
        assert transport.statistics().origins[0].open == 0


async def test_a_body_already_received_whole_returns_the_connection_even_if_unread() -> None:
    async with serving(keep_alive) as server, FastTransport() as transport:
        for _ in range(2):
            async with transport.stream("GET", server.url(), []) as response:
                assert response.status == 200
        assert transport.statistics().origins[0].idle == 1
    assert server.connections == 1


# pool limits


async def test_idle_connections_expire(autojump_clock: trio.testing.MockClock) -> None:
    limits = PoolLimits(idle_expiry=30)
    async with serving(keep_alive) as server, FastTransport(limits=limits) as transport:
        await get(transport, server.url())
        await trio.sleep(10)
        await get(transport, server.url())
        assert server.connections == 1
        await trio.sleep(31)
        await get(transport, server.url())
    assert server.connections == 2


async def test_idle_connections_of_a_quiet_origin_are_swept(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(keep_alive) as quiet, serving(keep_alive) as busy:
        async with FastTransport(limits=PoolLimits(idle_expiry=30)) as transport:
            await get(transport, quiet.url())
            await trio.sleep(40)
            await get(transport, busy.url())
            stats = transport.statistics()
            assert stats.origin(quiet.origin).open == 0
            assert stats.origin(busy.origin).idle == 1


async def test_only_max_idle_connections_are_kept() -> None:
    both_arrived = trio.Event()
    arrived = 0

    async def answers_when_both_arrived(peer: Peer) -> None:
        nonlocal arrived
        while await peer.read_request() is not None:
            arrived += 1
            if arrived == 2:
                both_arrived.set()
            await both_arrived.wait()
            await peer.respond()

    async with serving(answers_when_both_arrived) as server:
        async with FastTransport(limits=PoolLimits(max_idle=1)) as transport:
            async with trio.open_nursery() as nursery:
                for _ in range(2):
                    nursery.start_soon(get, transport, server.url())
            stats = transport.statistics().origins[0]
            assert (server.connections, stats.open, stats.idle) == (2, 1, 1)


async def test_closed_transport_closes_idle_connections_and_refuses_requests() -> None:
    async with serving(keep_alive) as server:
        transport = FastTransport()
        await get(transport, server.url())
        await transport.aclose()
        assert transport.statistics().origins[0].open == 0
        with pytest.raises(TransportError, match="closed"):
            await get(transport, server.url())


# request validation


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        ("ftp://127.0.0.1/", []),
        ("http:///nohost", []),
        ("http://127.0.0.1:99999/", []),
        ("http://127.0.0.1/a b", []),
        ("http://user:secret@127.0.0.1/", []),
        ("http://127.0.0.1/", [("X-Evil", "a\r\nInjected: 1")]),
        ("http://127.0.0.1/", [("X-Bad\n", "a")]),
        ("http://127.0.0.1/", [("X-Ünicode", "a")]),
    ],
)
async def test_invalid_requests_fail_before_connecting(url: str, headers: list[tuple[str, str]]) -> None:
    async with FastTransport() as transport:
        # Prepared or not, an invalid header fails each request that would send it (preparing them does not).
        for given in (headers, prepared_headers(headers)):
            with pytest.raises(LocalProtocolError):
                async with transport.stream("GET", url, given):
                    pass
        assert all(stats.open == 0 for stats in transport.statistics().origins)


# TLS


@pytest.fixture(scope="module")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


def tls_server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


async def test_https_with_a_trusted_certificate_pools_tls_connections(certificate_authority: trustme.CA) -> None:
    client_context = ssl.create_default_context()
    certificate_authority.configure_trust(client_context)
    async with (
        serving(keep_alive, ssl_context=tls_server_context(certificate_authority)) as server,
        FastTransport(ssl_context=client_context) as transport,
    ):
        for _ in range(3):
            async with transport.stream("POST", server.url("/v1/chat"), [], b"{}") as response:
                assert (response.status, await response.read()) == (200, b"hello")
        assert transport.statistics().origin(server.origin) is not None
    assert server.connections == 1


async def test_https_with_an_untrusted_certificate_is_a_connect_error(certificate_authority: trustme.CA) -> None:
    async with (
        serving(keep_alive, ssl_context=tls_server_context(certificate_authority)) as server,
        FastTransport() as transport,
    ):
        with pytest.raises(ConnectError, match="TLS handshake"):
            await get(transport, server.url())
        assert transport.statistics().origins[0].open == 0


async def test_https_server_that_never_answers_is_a_read_timeout(
    certificate_authority: trustme.CA, autojump_clock: trio.testing.MockClock
) -> None:
    async def silent(peer: Peer) -> None:
        await peer.read_request()
        await trio.sleep_forever()

    client_context = ssl.create_default_context()
    certificate_authority.configure_trust(client_context)
    async with (
        serving(silent, ssl_context=tls_server_context(certificate_authority)) as server,
        FastTransport(ssl_context=client_context, timeouts=Timeouts(read=4)) as transport,
    ):
        with pytest.raises(ReadTimeout):
            await get(transport, server.url())
        assert trio.current_time() == pytest.approx(4)
        assert transport.statistics().origins[0].open == 0


async def test_aclose_aborting_in_use_connections_fails_their_readers(autojump_clock: trio.testing.MockClock) -> None:
    saw_eof = trio.Event()

    async def endless(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\ntick\r\n")
        with trio.fail_after(5):
            await peer.wait_eof()
        saw_eof.set()

    async with serving(endless) as server:
        transport = FastTransport()
        async with transport.stream("GET", server.url(), []) as response:
            assert await response.__anext__() == b"tick"
            async with trio.open_nursery() as nursery:
                failure = []

                async def read_more():
                    try:
                        await response.__anext__()
                    except TransportError as exc:
                        failure.append(exc)

                nursery.start_soon(read_more)
                await trio.sleep(0.1)  # the reader is now waiting for the next chunk
                await transport.aclose(abort_in_use=True)
        assert len(failure) == 1  # a transport error, not a hang or a foreign exception
        with trio.fail_after(1):
            await saw_eof.wait()
        assert transport.statistics().origins[0].open == 0
