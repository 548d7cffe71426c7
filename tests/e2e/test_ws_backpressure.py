"""Backpressure on /v1/ws: a client that does not read holds its streams back, in bounded memory.

The client end here is a stand-in for the WebSocket whose ``send_message`` blocks until the test lets
it through, the way a socket blocks on a client that stopped reading (a real socket would hide the
effect behind megabytes of kernel buffers). Everything else is the live gateway: the connection logic,
the Gateway and a fake provider whose stream would end in 10 s (1,000 chunks, 10 ms apart) if nothing
held it back. The clock is a MockClock, so "a minute later" costs nothing.
"""

import orjson
import trio
import trio_websocket

from gatewaytest import provider_toml
from runestone.front.api import Caller
from runestone.front.ws import MessageConnection, serve_connection

CHUNKS = 1000


class HeldSocket:
    """The connection's WebSocket: messages in through ``inbox``, out only while ``open`` is set."""

    def __init__(self) -> None:
        self.inbox, self._inbox = trio.open_memory_channel(16)
        self.open = trio.Event()
        self.sent: list[dict] = []

    async def get_message(self):
        try:
            return await self._inbox.receive()
        except trio.EndOfChannel:
            raise trio_websocket.ConnectionClosed(None) from None

    async def send_message(self, text: str) -> None:
        await self.open.wait()
        self.sent.append(orjson.loads(text))

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        await self.inbox.aclose()


async def _connect(nursery, gw, sock: HeldSocket) -> MessageConnection:
    routes = gw.app.ws_routes
    conn = MessageConnection(sock, max_message_bytes=1 << 20, queue_size=routes.queue_size)
    nursery.start_soon(serve_connection, conn, Caller(None, False, "t"), routes._client, "a key", routes.dispatch,
                       routes.connections)
    return conn


def _chat(sid) -> str:
    return orjson.dumps({"type": "chat", "id": sid, "request": {
        "model": "fake-model", "messages": [{"role": "user", "content": "tell me everything"}]}}).decode()


async def test_a_client_that_does_not_read_holds_its_stream_back(gateway_factory, autojump_clock, nursery):
    gw = await gateway_factory(provider_toml("fake", "fake", models=["fake-model"], chunks=CHUNKS, chunk_delay_ms=10))
    slow, quick = HeldSocket(), HeldSocket()
    quick.open.set()
    slow_conn = await _connect(nursery, gw, slow)
    await _connect(nursery, gw, quick)
    await slow.inbox.send(_chat("held"))
    await quick.inbox.send(_chat("free"))
    await trio.sleep(60)  # six times what the stream needs

    # The reading client got its whole stream meanwhile ...
    assert quick.sent[-1]["type"] == "done" and len(quick.sent) > CHUNKS
    # ... while the other's is still open upstream, with exactly a queue's worth waiting in memory.
    stats = slow_conn.statistics()
    assert stats.queued == stats.queue_capacity == gw.app.ws_routes.queue_size
    assert slow.sent == []
    assert gw.app.telemetry.in_flight.get("fake") == 1
    assert len(gw.app.inflight.requests) == 1

    slow.open.set()
    while not slow.sent or slow.sent[-1]["type"] == "chunk":
        await trio.sleep(1)
    assert slow.sent[-1]["type"] == "done"
    assert [m["type"] for m in slow.sent].count("chunk") == len(quick.sent) - 1
    assert gw.app.telemetry.in_flight.get("fake") == 0


async def test_cancel_reaches_a_stream_blocked_on_a_full_queue(gateway_factory, autojump_clock, nursery):
    gw = await gateway_factory(provider_toml("fake", "fake", models=["fake-model"], chunks=CHUNKS, chunk_delay_ms=10))
    slow = HeldSocket()
    conn = await _connect(nursery, gw, slow)
    await slow.inbox.send(_chat("held"))
    await trio.sleep(5)
    assert conn.statistics().queued == conn.statistics().queue_capacity
    await slow.inbox.send(orjson.dumps({"type": "cancel", "id": "held"}).decode())
    await trio.sleep(0.1)
    # The upstream stream is closed although not one message could be written yet.
    assert gw.app.telemetry.in_flight.get("fake") == 0 and not gw.app.inflight.requests
    slow.open.set()
    while not slow.sent or slow.sent[-1]["type"] == "chunk":
        await trio.sleep(1)
    assert slow.sent[-1] == {"type": "error", "id": "held", "status": 499, "error": slow.sent[-1]["error"]}
    assert slow.sent[-1]["error"]["code"] == "cancelled"
    # The queue's worth, the one the writer held when the socket blocked, and the end.
    assert len(slow.sent) == conn.statistics().queue_capacity + 2
