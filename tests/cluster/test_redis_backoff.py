"""The client's reconnect schedule on a MockClock: while Redis cannot be reached it tries again with a
capped exponential backoff, so it never hammers the server and never waits longer than ``backoff_max``
between attempts (shared operation resumes within about a second of Redis coming back)."""

import pytest
import trio
import trio.testing

from runestone.cluster import redis as redis_module
from runestone.cluster.redis import RedisClient, RedisUnavailable


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def test_backoff_is_capped_and_bounded(monkeypatch, clock):
    attempts: list[float] = []

    async def refused(address):
        attempts.append(trio.current_time())
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(redis_module._Wire, "open", staticmethod(refused))
    client = RedisClient("redis://127.0.0.1:1/0", backoff_min=0.05, backoff_max=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await trio.sleep(30)
        assert client.state == "down" and "refused" in client.statistics().last_error
        with pytest.raises(RedisUnavailable):
            await client.execute("PING")
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert gaps[:5] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8])
    assert max(gaps) == pytest.approx(1.0)  # capped
    assert len(attempts) <= 35  # about one a second once capped: never a tight loop


class _ScriptedRedis:
    """An in-memory Redis for the client (``_Wire.open`` replaced): answers PING/GET/SET, or, while
    ``silent``, reads and answers nothing (a stopped server)."""

    def __init__(self, nursery) -> None:
        self.nursery = nursery
        self.silent = False
        self.connections = 0

    async def open(self, address):
        import hiredis

        client_side, server_side = trio.testing.memory_stream_pair()
        self.connections += 1
        self.nursery.start_soon(self._serve, server_side, hiredis.Reader())
        wire = redis_module._Wire(client_side)
        with trio.fail_after(1.0):
            await client_side.send_all(b"*1\r\n$4\r\nPING\r\n")
            assert await wire.read() == b"PONG"
        return wire

    async def _serve(self, stream, reader) -> None:
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                reader.feed(data)
                while (command := reader.gets()) is not False:
                    if self.silent:
                        continue
                    verb = command[0].upper()
                    await stream.send_all(b"+PONG\r\n" if verb == b"PING" else b"$1\r\nv\r\n" if verb == b"GET"
                                          else b"+OK\r\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def test_stalled_connection_refuses_then_is_replaced(monkeypatch, clock):
    async with trio.open_nursery() as nursery:
        server = _ScriptedRedis(nursery)
        monkeypatch.setattr(redis_module._Wire, "open", staticmethod(server.open))
        client = RedisClient("redis://127.0.0.1:1/0", timeout=0.25, ping_interval=1.0, stall_reconnect=2.0,
                             connect_timeout=1.0, backoff_max=1.0)
        await nursery.start(client.run)
        await client.wait_up()
        assert await client.execute("GET", "k") == b"v"
        server.silent = True
        started = trio.current_time()
        with pytest.raises(redis_module.RedisTimeout):
            await client.execute("GET", "k")
        assert trio.current_time() - started == pytest.approx(0.25)  # the call's own deadline, no longer
        assert client.state == "stalled"
        with pytest.raises(RedisUnavailable) as err:
            await client.execute("GET", "k")  # refused at once: nobody queues behind a stall
        assert not isinstance(err.value, redis_module.RedisTimeout)
        await trio.sleep(3.5)  # past stall_reconnect: the silent connection is given up
        assert client.statistics().disconnects == 1 and client.state != "up"
        server.silent = False
        with trio.fail_after(5):  # backoff_max + connect_timeout
            await client.wait_up()
        assert await client.execute("GET", "k") == b"v"
        assert server.connections >= 2
        nursery.cancel_scope.cancel()
