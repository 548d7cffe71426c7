"""Clients that leave in the middle of a stream leave nothing behind in the gateway.

400 clients each ask for a long stream, read its first chunk and close, against a real gateway and fake
upstream on loopback: 100 to warm the gateway up, then two traced rounds of 150. Afterwards every table that
tracks a request is empty, and what the second round left (tracemalloc's blocks allocated by runestone code,
the fake upstream's own bookkeeping aside, and live objects by type) is bounded per client, not by a time.
SQLite's memory, which tracemalloc does not see, is tested in ``tests/telemetry/test_ledger_memory.py``; the
bench ``scripts/bench-memory`` runs 20,000 such clients against real processes and prints the gateway's RSS.

The clock is a MockClock. After the clients the test lets 20 s pass, beyond every deadline a request armed
(its timeouts are 5 s here): trio keeps a scope's deadline in its heap, with the scope, until the deadline
would have expired or the heap is pruned, so what is left after that is residue.
"""

from __future__ import annotations

from runestone.telemetry.messages import Flush, Summary
import gc
import tracemalloc
from collections import Counter

import httpx
import orjson
import pytest
import trio
import trio.testing

from gatewaytest import provider_toml

#: Clients per traced round (there are two, after the warm-up).
CLIENTS = 150
WARMUP = 100
#: What the second round may leave per client, at most: blocks and bytes allocated by runestone code and
#: still held, at sites holding at least ``OBJECTS_PER_CLIENT`` more blocks per client (measured: 0.3 and
#: 20, CPython's free lists keeping blocks that tracemalloc still lists), and live objects of any one
#: request-scoped type (measured: 0). One object kept per request would be at least 1 block, 50 bytes and
#: 1 object per client.
BLOCKS_PER_CLIENT = 1
BYTES_PER_CLIENT = 64
OBJECTS_PER_CLIENT = 0.05
#: Where the types of what a request allocates come from (the threads of trio's thread cache, which the
#: ledger uses, come and go on their own and are left out).
REQUEST_MODULES = ("runestone", "trio", "outcome", "httptools", "orjson", "builtins")
REQUEST_BUILTINS = frozenset({"coroutine", "async_generator", "frame", "traceback", "cell", "function", "method",
                              "dict", "set", "bytearray", "BaseExceptionGroup", "ExceptionGroup", "GeneratorExit"})
TIMEOUTS = "[server]\nhost = \"127.0.0.1\"\nport = 0\nrequest_timeout_ms = 5000\nheader_timeout_ms = 5000\n" \
           "keepalive_timeout_ms = 5000\n"
BODY = orjson.dumps({"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "long"}]})
REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
           b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY))


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0.01)


async def _leave_mid_stream(port: int) -> None:
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    async with sock:
        await sock.send_all(REQUEST)
        seen = b""
        with trio.fail_after(5):
            while b"data: " not in seen:
                data = await sock.receive_some(65536)
                assert data, seen
                seen += data
        assert seen.startswith(b"HTTP/1.1 200"), seen[:200]


async def _clients(port: int, n: int) -> None:
    limit = trio.CapacityLimiter(50)

    async def one() -> None:
        async with limit:
            await _leave_mid_stream(port)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)


async def _settle(gw, upstream_port: int, started: int) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(1000):
            streams = (await http.get(f"http://127.0.0.1:{upstream_port}/_fake/stats")).json()["streams"]
            if streams["cancelled"] == started:
                break
            await trio.sleep(0.1)
    assert streams == {"started": started, "finished": 0, "cancelled": started}
    await trio.sleep(20)  # past every deadline a request armed (all 5 s)
    await gw.app.registry.whereis("telemetry_handler").call(Flush())


_FILTERS = [
    tracemalloc.Filter(True, "*/runestone/*", all_frames=True),
    # The fake upstream keeps a timestamp per cancelled stream, by design (its stats); not the gateway's.
    tracemalloc.Filter(False, "*/runestone/providers/fake_server.py", all_frames=True),
    tracemalloc.Filter(False, __file__, all_frames=True),
]


def _live_objects() -> Counter:
    """Objects the garbage collector tracks, by request-scoped type: what a request leaving something keeps."""
    gc.collect()
    counts: Counter = Counter()
    for o in gc.get_objects():
        t = type(o)
        name = type.__dict__["__module__"].__get__(t)  # a class may shadow __module__ (a getset descriptor)
        module = name.partition(".")[0] if isinstance(name, str) else ""
        if module in REQUEST_MODULES and (module != "builtins" or t.__qualname__ in REQUEST_BUILTINS):
            counts[f"{name}.{t.__qualname__}"] += 1
    return counts


def _runestone(snapshot: tracemalloc.Snapshot) -> tracemalloc.Snapshot:
    return snapshot.filter_traces(_FILTERS)


async def test_clients_leaving_mid_stream_leave_no_residue(clock, gateway_factory, fake_factory):
    upstream, _ = await fake_factory(chunks=200, chunk_delay_ms=50, text="word " * 100)
    gw = await gateway_factory(TIMEOUTS + provider_toml(
        "up", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1", api_key="k", models=["gpt-4o-mini"],
        timeout_ms=5000, connect_timeout_ms=5000))
    app = gw.app
    await _clients(gw.port, WARMUP)
    await _settle(gw, upstream.port, WARMUP)
    tracemalloc.start(10)
    try:
        # A first traced round lets what is bounded reach its bound (containers grown to the peak number of
        # connections, the latency windows); the second round shows what each client leaves.
        await _clients(gw.port, CLIENTS)
        await _settle(gw, upstream.port, WARMUP + CLIENTS)
        objects = _live_objects()
        middle = _runestone(tracemalloc.take_snapshot())
        await _clients(gw.port, CLIENTS)
        await _settle(gw, upstream.port, WARMUP + 2 * CLIENTS)
        grew = _live_objects() - objects
        end = _runestone(tracemalloc.take_snapshot())
    finally:
        tracemalloc.stop()

    assert app.inflight.requests == {}
    assert app.telemetry.in_flight == {"up": 0}
    server = app.server.statistics()
    assert (server.connections_open, server.requests_in_flight) == (0, 0)
    assert server.requests_total == WARMUP + 2 * CLIENTS
    summary = await app.registry.whereis("telemetry_handler").call(Summary())
    # Every client counted, as the 499 it was.
    assert (summary.requests, summary.errors) == (WARMUP + 2 * CLIENTS, WARMUP + 2 * CLIENTS)
    # Where a per-client residue would show: an allocation site whose live blocks grow with the clients.
    # Sites holding one or two more blocks are containers that grew to a new peak of connections at once.
    stats = [s for s in end.compare_to(middle, "traceback") if s.count_diff >= CLIENTS * OBJECTS_PER_CLIENT]
    blocks = sum(s.count_diff for s in stats)
    grown = sum(s.size_diff for s in stats)
    top = sorted(stats, key=lambda s: -s.count_diff)[:5]
    assert blocks < CLIENTS * BLOCKS_PER_CLIENT and grown < CLIENTS * BYTES_PER_CLIENT, "\n".join(
        f"{s.size_diff} B in {s.count_diff} blocks:\n" + "\n".join(s.traceback.format()[-8:]) for s in top)
    assert not [t for t, n in grew.items() if n >= CLIENTS * OBJECTS_PER_CLIENT], grew.most_common(5)
