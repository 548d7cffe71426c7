"""Fixtures for the HTTP server's tests: a server started on 127.0.0.1:0 and a strict h11 client."""

from __future__ import annotations

import gc
import threading
from functools import partial

import h11
import pytest
import trio

from runestone.http.server import HttpServer, Limits, serve_http


class H11Client:
    """A strict HTTP/1.1 client over a real socket: h11 checks every byte the server sends."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send(self, *events: h11.Event) -> None:
        data = b"".join(self.conn.send(event) or b"" for event in events)
        await self.stream.send_all(data)

    async def next_event(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(65536))

    async def read_response(self) -> tuple[h11.Response, bytes]:
        """The next final response and its whole body (interim 1xx responses are skipped)."""
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Response):
                break
            assert isinstance(event, h11.InformationalResponse), event
        body = bytearray()
        while True:
            part = await self.next_event()
            if isinstance(part, h11.EndOfMessage):
                return event, bytes(body)
            assert isinstance(part, h11.Data), part
            body += part.data

    async def request(self, method: str = "GET", target: str = "/", headers=(), body: bytes | None = None):
        """Send one request and return ``(response, body)``; prepares the next cycle if kept alive."""
        headers = [("host", "test"), *headers]
        if body is not None and not any(name.lower() in ("content-length", "transfer-encoding")
                                        for name, _ in headers):
            headers.append(("content-length", str(len(body))))
        events = [h11.Request(method=method, target=target, headers=headers)]
        if body:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        await self.send(*events)
        response = await self.read_response()
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return response

    async def read_until_eof(self) -> bytes:
        data = bytearray()
        while chunk := await self.stream.receive_some(65536):
            data += chunk
        return bytes(data)

    async def aclose(self) -> None:
        await self.stream.aclose()


HANG_GUARD_SECONDS = 120.0


@pytest.fixture
async def hang_guard(nursery):
    """Fail a test that has not finished after HANG_GUARD_SECONDS of real time.

    Real time, from a thread: under the autojump clock a trio timer would fire at once.
    A server regression then fails its test instead of hanging the run. (pytest-trio
    only runs trio fixtures a test asks for by name, not through usefixtures/autouse:
    the other fixtures here depend on this one.)
    """
    token = trio.lowlevel.current_trio_token()
    expired = trio.Event()
    timer = threading.Timer(HANG_GUARD_SECONDS, lambda: token.run_sync_soon(expired.set))
    timer.daemon = True

    async def guard() -> None:
        await expired.wait()
        raise TimeoutError(f"test still running after {HANG_GUARD_SECONDS:g} s of real time")

    nursery.start_soon(guard)
    timer.start()
    yield
    timer.cancel()


@pytest.fixture
def start_server(nursery, hang_guard):
    """``await start_server(handler, **limits)`` -> a running HttpServer, stopped with the test."""

    async def start(handler, **limits) -> HttpServer:
        return await nursery.start(partial(serve_http, handler, "127.0.0.1", 0, limits=Limits(**limits)))

    return start


@pytest.fixture
async def connect(hang_guard):
    """``await connect(server)`` -> an H11Client on a fresh connection, closed with the test."""
    clients: list[H11Client] = []

    async def open_client(server: HttpServer) -> H11Client:
        client = H11Client(await trio.open_tcp_stream("127.0.0.1", server.port))
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        await trio.aclose_forcefully(client.stream)


@pytest.fixture
def collector_off():
    """The cycle collector off for the test (as it was again after it), after one collection; yields
    ``left(cls)``: how many instances of ``cls`` a collection would free now (those only a reference cycle
    keeps)."""
    def count(cls: type) -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, cls))

    def left(cls: type) -> int:
        before = count(cls)
        gc.collect()
        return before - count(cls)

    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield left
    finally:
        if was:
            gc.enable()
