"""``stream(deadline=...)``: one time on trio's clock bounds every wait of an exchange, in both transports.

The gateway gives each attempt and each request one deadline; the transport keeps it without a cancel scope
(the fast one through the same keeper as its read timeouts), so the caller needs none around the exchange.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing

from runestone.http.client import FastTransport, PoolLimits, Timeouts, make_transport
from runestone.http.errors import PoolTimeout, ReadTimeout

KINDS = ["fast", "httpx"]
SLOW = Timeouts(read=60, pool=30)


@asynccontextmanager
async def serving(handler: Callable[[trio.SocketStream], Awaitable[None]]) -> AsyncIterator[str]:
    async def on_connection(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, on_connection, 0, host="127.0.0.1"))
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/"
        nursery.cancel_scope.cancel()


async def read_head(stream: trio.SocketStream) -> bool:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return False
        data += chunk
    return True


async def silent(stream: trio.SocketStream) -> None:
    await read_head(stream)
    await trio.sleep_forever()


async def one_chunk_then(pause: float, stream: trio.SocketStream) -> None:
    await read_head(stream)
    await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n")
    await trio.sleep(pause)
    await stream.send_all(b"3\r\ntwo\r\n0\r\n\r\n")


@pytest.mark.parametrize("kind", KINDS)
async def test_the_deadline_ends_the_wait_for_the_head_before_the_read_timeout(
    autojump_clock: trio.testing.MockClock, kind: str
) -> None:
    async with serving(silent) as url, make_transport(kind, timeouts=SLOW) as transport:
        start = trio.current_time()
        with pytest.raises(ReadTimeout, match="deadline passed"):
            async with transport.stream("GET", url, [], deadline=start + 2):
                pass
        assert trio.current_time() - start == pytest.approx(2)


@pytest.mark.parametrize("kind", KINDS)
async def test_set_deadline_bounds_the_body_reads_that_follow(autojump_clock: trio.testing.MockClock, kind: str) -> None:
    async with serving(partial(one_chunk_then, 100)) as url, make_transport(kind, timeouts=SLOW) as transport:
        async with transport.stream("GET", url, []) as response:
            assert await response.__anext__() == b"one"
            start = trio.current_time()
            response.set_deadline(start + 3)
            with pytest.raises(ReadTimeout, match="deadline passed"):
                await response.__anext__()
            assert trio.current_time() - start == pytest.approx(3)


@pytest.mark.parametrize("kind", KINDS)
async def test_set_deadline_none_lifts_the_exchange_deadline_for_the_body(
    autojump_clock: trio.testing.MockClock, kind: str
) -> None:
    async with serving(partial(one_chunk_then, 5)) as url, make_transport(kind, timeouts=SLOW) as transport:
        async with transport.stream("GET", url, [], deadline=trio.current_time() + 1) as response:
            response.set_deadline(None)
            assert b"".join([chunk async for chunk in response]) == b"onetwo"


async def test_a_pooled_connection_does_not_keep_the_deadline_of_its_last_exchange(
    autojump_clock: trio.testing.MockClock,
) -> None:
    answered = 0

    async def second_answer_is_slow(stream: trio.SocketStream) -> None:
        nonlocal answered
        while await read_head(stream):
            if answered:
                await trio.sleep(7)
            answered += 1
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with serving(second_answer_is_slow) as url, FastTransport(timeouts=SLOW) as transport:
        async with transport.stream("GET", url, [], deadline=trio.current_time() + 5) as response:
            assert await response.read() == b"ok"
        await trio.sleep(10)
        async with transport.stream("GET", url, []) as response:
            assert await response.read() == b"ok"
        assert transport.statistics().origins[0].open == 1


async def test_the_deadline_bounds_the_wait_for_a_pool_slot(autojump_clock: trio.testing.MockClock) -> None:
    limits = PoolLimits(max_connections=1)
    async with serving(silent) as url, FastTransport(limits=limits, timeouts=SLOW) as transport:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(transport.stream("GET", url, []).__aenter__))  # holds the only slot
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            with pytest.raises(PoolTimeout, match="deadline passed"):
                async with transport.stream("GET", url, [], deadline=start + 1):
                    pass
            assert trio.current_time() - start == pytest.approx(1)
            nursery.cancel_scope.cancel()


async def test_set_deadline_ends_a_read_already_waiting(autojump_clock: trio.testing.MockClock) -> None:
    # The gateway's graceful stop lowers the deadline of streams whose read is waiting on a silent upstream.
    async with serving(partial(one_chunk_then, 1000)) as url, FastTransport(timeouts=SLOW) as transport:
        async with transport.stream("GET", url, []) as response:
            assert await response.__anext__() == b"one"
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                async def lower_soon() -> None:
                    await trio.sleep(1)
                    response.set_deadline(trio.current_time() + 2)

                nursery.start_soon(lower_soon)
                with pytest.raises(ReadTimeout):
                    await response.__anext__()
            assert 3 <= trio.current_time() - started < 10
