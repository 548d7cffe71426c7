"""``MockTransport(handler)``: the seam's test double answers in process and keeps the seam's promises.

What a provider adapter relies on from a real transport holds here too: the request arrives as sent, the
response's header names come lowercased, the body is read chunk by chunk, ``Timeouts.read`` and the exchange's
``deadline`` (moved by ``set_deadline``) bound every wait, a closed transport refuses requests and
``aclose(abort_in_use=True)`` fails the reads still running. Time is trio's, so under ``MockClock`` the
timeouts take no time.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from runestone.http import (
    ConnectError,
    MockRequest,
    MockResponse,
    MockTransport,
    ReadTimeout,
    RemoteProtocolError,
    Timeouts,
    Transport,
    TransportError,
)


async def test_the_handler_sees_the_request_and_its_answer_is_the_response() -> None:
    def handler(request: MockRequest) -> MockResponse:
        assert request.method == "POST"
        assert request.url == "https://api.example.test/v1/chat?x=1"
        assert request.header(b"Authorization") == b"Bearer k"
        assert request.headers == ((b"authorization", b"Bearer k"), (b"x-trace", b"t1"))
        assert request.json() == {"q": 1}
        return MockResponse(201, [("X-Upstream", "yes"), (b"Content-Type", b"application/json")], b'{"a": 1}')

    transport = MockTransport(handler)
    assert isinstance(transport, Transport)
    async with transport.stream("POST", "https://api.example.test/v1/chat?x=1",
                                [(b"authorization", b"Bearer k"), ("X-Trace", "t1")], b'{"q": 1}') as response:
        assert response.status == 201
        assert response.headers == [(b"x-upstream", b"yes"), (b"content-type", b"application/json")]
        assert response.header(b"X-UPSTREAM") == b"yes"
        assert await response.read() == b'{"a": 1}'
    [seen] = transport.requests
    assert (seen.method, seen.body, seen.timeouts, seen.deadline) == ("POST", b'{"q": 1}', Timeouts(), None)


async def test_an_async_body_is_read_chunk_by_chunk_as_it_comes_and_empty_chunks_are_skipped() -> None:
    produced = []

    async def events():
        for item in (b"data: 1\n\n", b"", b"data: 2\n\n"):
            produced.append(item)
            yield item

    transport = MockTransport(lambda request: MockResponse(200, [], events()))
    async with transport.stream("GET", "http://up.test/", []) as response:
        first = await response.__anext__()
        assert first == b"data: 1\n\n" and produced == [b"data: 1\n\n"]  # nothing read ahead
        assert [chunk async for chunk in response] == [b"data: 2\n\n"]


async def test_a_list_body_gives_its_chunks_and_an_async_handler_is_awaited() -> None:
    async def handler(request: MockRequest) -> MockResponse:
        await trio.sleep(0)
        return MockResponse(200, body=[b"a", b"b"])

    async with MockTransport(handler).stream("GET", "http://up.test/", []) as response:
        assert [chunk async for chunk in response] == [b"a", b"b"]
    async with MockTransport(lambda request: MockResponse.json({"ok": True})).stream("GET", "http://up.test/",
                                                                                     []) as response:
        assert response.header(b"content-type") == b"application/json"
        assert await response.read() == b'{"ok":true}'


async def test_a_transport_error_from_the_handler_surfaces_on_entry() -> None:
    def handler(request: MockRequest) -> MockResponse:
        raise ConnectError("cannot connect to http://up.test:80: refused")

    with pytest.raises(ConnectError, match="refused"):
        async with MockTransport(handler).stream("GET", "http://up.test/", []):
            pass


async def test_a_handler_that_answers_something_else_is_a_clear_type_error() -> None:
    with pytest.raises(TypeError, match="not a MockResponse"):
        async with MockTransport(lambda request: b"oops").stream("GET", "http://up.test/", []):
            pass


async def test_the_deadline_bounds_the_wait_for_the_head(autojump_clock) -> None:
    async def slow(request: MockRequest) -> MockResponse:
        await trio.sleep(100)
        return MockResponse()

    transport = MockTransport(slow, timeouts=Timeouts(read=60))
    start = trio.current_time()
    with pytest.raises(ReadTimeout, match="deadline passed"):
        async with transport.stream("GET", "http://up.test/", [], deadline=start + 5):
            pass
    assert trio.current_time() - start == pytest.approx(5)
    with pytest.raises(ReadTimeout, match="sent nothing for 60 s"):
        async with transport.stream("GET", "http://up.test/", []):
            pass


async def test_the_read_timeout_bounds_each_gap_between_chunks_not_the_whole_body(autojump_clock) -> None:
    async def paced():
        for pause in (3, 3, 3, 30):
            await trio.sleep(pause)
            yield b"x"

    transport = MockTransport(lambda request: MockResponse(200, [], paced()))
    async with transport.stream("GET", "http://up.test/", [], timeouts=Timeouts(read=10)) as response:
        assert [await response.__anext__() for _ in range(3)] == [b"x", b"x", b"x"]  # 9 s in all, 3 s per gap
        with pytest.raises(ReadTimeout, match="sent nothing for 10 s"):
            await response.__anext__()
        with pytest.raises(TransportError, match="closed before its body was read"):
            await response.__anext__()  # as on a real connection closed at its timeout


async def test_set_deadline_moves_the_bound_of_the_body_reads(autojump_clock) -> None:
    async def paced():
        await trio.sleep(4)
        yield b"one"
        await trio.sleep(4)
        yield b"two"

    transport = MockTransport(lambda request: MockResponse(200, [], paced()))
    start = trio.current_time()
    async with transport.stream("GET", "http://up.test/", [], deadline=start + 1) as response:
        response.set_deadline(None)  # lifted: only the read timeout (60 s) bounds the reads
        assert await response.__anext__() == b"one"
        response.set_deadline(trio.current_time() + 2)
        with pytest.raises(ReadTimeout, match="deadline passed"):
            await response.__anext__()
    assert trio.current_time() - start == pytest.approx(6)


async def test_closing_the_response_closes_its_body_generator() -> None:
    closed = trio.Event()

    async def endless():
        try:
            while True:
                yield b"x"
        finally:
            closed.set()

    async with MockTransport(lambda request: MockResponse(200, [], endless())).stream("GET", "http://up.test/",
                                                                                      []) as response:
        assert await response.__anext__() == b"x"
    assert closed.is_set()


async def test_aclose_refuses_new_requests_and_with_abort_fails_the_reads_in_progress() -> None:
    waiting = trio.Event()

    async def endless():
        yield b"first"
        waiting.set()
        await trio.sleep_forever()

    transport = MockTransport(lambda request: MockResponse(200, [], endless()))
    failures = []

    async def reader() -> None:
        async with transport.stream("GET", "http://up.test/", []) as response:
            try:
                async for _ in response:
                    pass
            except RemoteProtocolError as exc:
                failures.append(str(exc))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await waiting.wait()
            await transport.aclose(abort_in_use=True)
    assert failures == ["the connection to http://up.test was closed by its transport"]
    with pytest.raises(TransportError, match="the transport is closed"):
        async with transport.stream("GET", "http://up.test/", []):
            pass


async def test_a_transport_used_as_a_context_manager_is_closed_on_exit() -> None:
    async with MockTransport(lambda request: MockResponse()) as transport:
        async with transport.stream("GET", "http://up.test/", []) as response:
            assert await response.read() == b""
    with pytest.raises(TransportError, match="closed"):
        async with transport.stream("GET", "http://up.test/", []):
            pass
