"""A client that goes away cancels its upstream request at once, whatever the provider type.

The fake upstream paces its stream with ``chunk_delay_ms`` and records, on the shared trio clock, when it
noticed its client (the gateway) leave. The clock is a MockClock that only moves when every task has been
idle for a while: if the gateway noticed the disconnect only on its next write, the upstream's next chunk
delay would have to pass first and the recorded time would be at least that much later.
"""

from __future__ import annotations

import functools

import httpx
import orjson
import pytest
import trio
import trio.testing

from gatewaytest import provider_toml

CHUNK_DELAY = 0.25


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0.01)


async def _stats(port: int) -> dict:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"http://127.0.0.1:{port}/_fake/stats")).json()


async def _wait_for(port: int, predicate) -> dict:
    for _ in range(200):
        stats = await _stats(port)
        if predicate(stats):
            return stats
        await trio.sleep(0.005)
    raise AssertionError(f"the upstream never got there: {stats}")


async def _open_stream_and_leave(port: int, model: str) -> float:
    """Start a streamed chat on a raw socket, read until the first content chunk, close; the close time."""
    body = orjson.dumps({"model": model, "stream": True, "messages": [{"role": "user", "content": "a long answer"}]})
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    await sock.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(body), body))
    seen = b""
    with trio.fail_after(5):
        while b'"content":"a' not in seen.replace(b": ", b":"):
            data = await sock.receive_some(65536)
            assert data, seen
            seen += data
    assert seen.startswith(b"HTTP/1.1 200")
    await sock.aclose()
    return trio.current_time()


@pytest.mark.parametrize("ptype, model", [("openai", "gpt-4o-mini"), ("anthropic", "claude-haiku-4-5")])
async def test_client_leaving_mid_stream_closes_the_upstream_at_once(clock, gateway_factory, fake_factory, ptype,
                                                                      model):
    upstream, _ = await fake_factory(chunks=40, chunk_delay_ms=CHUNK_DELAY * 1000, text="a long answer " * 10)
    base = f"http://127.0.0.1:{upstream.port}" + ("/v1" if ptype == "openai" else "")
    gw = await gateway_factory(provider_toml("up", ptype, base_url=base, api_key="k", models=[model]))
    left_at = await _open_stream_and_leave(gw.port, model)
    stats = await _wait_for(upstream.port, lambda s: s["streams"]["cancelled"] >= 1)
    assert stats["streams"] == {"started": 1, "finished": 0, "cancelled": 1}
    assert 0 <= stats["cancelled_at"][0] - left_at < 0.1
    # The gateway is fine afterwards: the next stream on the same upstream completes.
    async with httpx.AsyncClient(base_url=gw.v1, timeout=60) as http:
        r = await http.post("/chat/completions", json={"model": model, "stream": True,
                                                       "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    stats = await _stats(upstream.port)
    assert stats["streams"] == {"started": 2, "finished": 1, "cancelled": 1}


async def test_many_clients_leaving_cancel_every_upstream_stream(clock, gateway_factory, fake_factory):
    upstream, _ = await fake_factory(chunks=40, chunk_delay_ms=CHUNK_DELAY * 1000, text="a long answer " * 10)
    gw = await gateway_factory(provider_toml("up", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1",
                                             api_key="k", models=["gpt-4o-mini"]))
    left: list[float] = []

    async def one():
        left.append(await _open_stream_and_leave(gw.port, "gpt-4o-mini"))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)
    stats = await _wait_for(upstream.port, lambda s: s["streams"]["cancelled"] >= 20)
    assert stats["streams"] == {"started": 20, "finished": 0, "cancelled": 20}
    assert max(stats["cancelled_at"]) - max(left) < 0.1
    assert gw.app.inflight.requests == {}


@pytest.mark.parametrize("stream", [False, True])
async def test_client_leaving_before_the_first_byte_closes_the_upstream(clock, gateway_factory, nursery, stream):
    closed: list[float] = []

    async def silent_upstream(conn: trio.SocketStream) -> None:
        # Reads the request, never answers, and notes when the gateway closes the connection.
        while await conn.receive_some(65536):
            pass
        closed.append(trio.current_time())

    listeners = await nursery.start(functools.partial(trio.serve_tcp, silent_upstream, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    gw = await gateway_factory(provider_toml("up", "openai", base_url=f"http://127.0.0.1:{port}/v1", api_key="k",
                                             models=["gpt-4o-mini"]))
    body = orjson.dumps({"model": "gpt-4o-mini", "stream": stream, "messages": [{"role": "user", "content": "x"}]})
    sock = await trio.open_tcp_stream("127.0.0.1", gw.port)
    await sock.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(body), body))
    await trio.sleep(1)
    await sock.aclose()
    left_at = trio.current_time()
    await trio.sleep(5)  # the provider's timeout_ms is 60 s: only the client leaving can close it this soon
    assert closed and closed[0] - left_at < 0.1
